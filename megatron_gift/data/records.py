"""SFT records: read a JSONL file, a Parquet file or a ``datasets`` directory, and check each
record into one of three kinds of :class:`Example`, each with the place it came from.

* raw text (``text_field`` set): ``Example(text=...)``;
* chat (the record has ``messages_field``): ``Example(messages=[{role, content}, ...])``, with
  at least one assistant turn;
* prompt/response: ``Example(prompt=..., response=...)``; the prompt is a string or, as in
  verl, a list of messages.

A record that fits none of them (a JSONL line that is not UTF-8 or not JSON, a missing or empty
field, a wrong type, a chat with no assistant turn) comes out as a :class:`Malformed` with the
reason; the caller decides whether to reject or skip it. JSONL is UTF-8, a byte-order mark at
its start allowed. Places are ``path:line`` for JSONL (1-based) and ``path row N`` for Parquet
and ``datasets`` (0-based, as ``dataset[N]``).
"""

import codecs
import json
import os
from dataclasses import dataclass
from typing import Iterator, Union

import pyarrow.parquet as pq

from megatron_gift.errors import MissingFileError, UserError


@dataclass(frozen=True)
class Fields:
    """Which record fields hold what (see the module doc)."""

    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    text: str = None


@dataclass(frozen=True)
class Example:
    """One checked record: exactly one of ``text``, ``messages``, ``prompt`` + ``response``."""

    text: str = None
    messages: list = None
    prompt: object = None  # str, or a list of {role, content} messages
    response: str = None


class Malformed(Exception):
    """A record that cannot be trained on; the message says why."""


def read_examples(path: str, fields: Fields,
                  split: str = "train") -> Iterator[tuple[str, Union[Example, Malformed]]]:
    """Yield ``(place, Example or Malformed)`` for every record of ``path``, in file order.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a file without any
    record or a ``datasets`` directory without ``split``.
    """
    count = 0
    for place, record in _read(path, split):
        count += 1
        if isinstance(record, Malformed):
            yield place, record
            continue
        try:
            yield place, _check(record, fields)
        except Malformed as error:
            yield place, error
    if count == 0:
        raise UserError(f"data file has no records: {path}")


def rows(path: str, split: str = "train") -> Iterator[tuple[str, Union[dict, Malformed]]]:
    """``(place, record or Malformed)`` of every record of a JSONL or Parquet file or a
    ``datasets`` directory (``split``), in file order: ``path:line`` or ``path row N``. A line
    that is not JSON or not UTF-8 is a :class:`Malformed`, not an exception."""
    return _read(path, split)


def _read(path, split):
    if os.path.isdir(path):
        return _dataset_rows(path, split)
    if not os.path.isfile(path):
        raise MissingFileError(f"data file not found: {path}")
    return _parquet_rows(path) if path.endswith(".parquet") else _jsonl_lines(path)


def _jsonl_lines(path):
    """``(place, record or Malformed)`` of each non-blank line, each decoded on its own, so
    that a line that is not UTF-8 is one malformed record."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if line == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield f"{path}:{line}", Malformed(
                    f"not UTF-8 text (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of "
                    "the line); save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield f"{path}:{line}", json.loads(text)
            except json.JSONDecodeError as error:
                yield f"{path}:{line}", Malformed(f"not a JSON record ({error})")


def _parquet_rows(path):
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for record in batch.to_pylist():
            yield f"{path} row {row}", record
            row += 1


def _dataset_rows(path, split):
    import datasets

    try:
        data = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise MissingFileError(f"{path} is not a datasets directory (save_to_disk): {error}")
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"{path}: no split {split!r} (it has {sorted(data)}); set data.split")
        data = data[split]
    for row, record in enumerate(data):
        yield f"{path} row {row}", record


def _check(record, fields):
    if not isinstance(record, dict):
        raise Malformed(f"record is a {type(record).__name__}, not an object")
    if fields.text is not None:
        return Example(text=_string(record, fields.text))
    if record.get(fields.messages) is not None:
        return Example(messages=_messages(record[fields.messages], fields.messages))
    prompt = record.get(fields.prompt)
    if isinstance(prompt, list):
        prompt = _messages(prompt, fields.prompt, need_assistant=False)
    else:
        prompt = _string(record, fields.prompt)
    return Example(prompt=prompt, response=_string(record, fields.response))


def _string(record, name):
    value = record.get(name)
    if not isinstance(value, str) or not value.strip():
        raise Malformed(f"record has no non-empty string field {name!r}"
                        + ("" if value is None else f" (got {_short(value)})"))
    return value


def _messages(value, name, need_assistant=True):
    if not isinstance(value, list) or not value:
        raise Malformed(f"field {name!r} is not a non-empty list of messages (got {_short(value)})")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise Malformed(f"{name}[{k}] is not a {{role, content}} object (got {_short(message)})")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise Malformed(f"{name}[{k}] has no string role (got {_short(role)})")
        if not isinstance(content, str) or (role == "assistant" and not content.strip()):
            raise Malformed(f"{name}[{k}] ({role}) has no {'non-empty ' * (role == 'assistant')}"
                            f"string content (got {_short(content)})")
        messages.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise Malformed(f"chat {name!r} has no assistant turn to train on")
    return messages


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
