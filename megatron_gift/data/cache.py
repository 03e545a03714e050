"""On-disk cache of tokenised data: one Arrow IPC file per key, built once per node.

The key covers everything the tokens depend on: the data source (path, size and mtime of each
file), the tokenizer (its full serialisation or vocab, special tokens, chat template) and the
caller's options. Local rank 0 of each node builds a missing entry while the node's other ranks
wait for the file; every rank then memory-maps it. Writes go to a per-process temporary
file that ``os.replace`` moves into place, so nodes that share the file system may race
safely: readers see a whole file or none, and any winner's file is the same.
"""

import hashlib
import json
import os
import socket
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa

from megatron_gift.errors import MissingFileError
from megatron_gift.platform.once import build_once

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_FORMAT = 3  # bump when the stored layout, the encoding of a record or the records read change


def cached_table(cache_dir: str, name: str, key: dict[str, Any],
                 build: Callable[[], pa.Table]) -> tuple[pa.Table, str, bool]:
    """The ``pyarrow.Table`` stored under ``key`` in ``cache_dir`` (``name`` prefixes the file),
    made by ``build()`` on local rank 0 if absent while the node's other ranks wait for the
    file (:mod:`megatron_gift.once`); ``(table, path, built_here)``.
    """
    path = os.path.join(cache_dir, f"{name}-{_digest(key)}.arrow")
    built = build_once(lambda: os.path.exists(path), lambda: _write(path, build()),
                       is_worker=int(os.environ.get("LOCAL_RANK", "0")) == 0,
                       others_wait=_ranks_on_this_node() > 1,
                       marker=f"{path}.{socket.gethostname()}.failed",
                       what=f"tokenising into {path}")
    return pa.ipc.open_file(pa.memory_map(path)).read_all(), path, built


def _ranks_on_this_node() -> int:
    """torchrun's ``LOCAL_WORLD_SIZE``, else ``WORLD_SIZE`` (a one-node launch), else 1."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def cache_key(path: str, tokenizer: "PreTrainedTokenizerBase",
              options: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able key of tokenising ``path`` with ``tokenizer`` under ``options`` (a dict)."""
    return {"format": _FORMAT, "source": _source_identity(path),
            "tokenizer": _tokenizer_identity(tokenizer), "options": options}


def _source_identity(path):
    if not os.path.exists(path):
        raise MissingFileError(f"data file not found: {path}")
    path = os.path.abspath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    stats = [(os.path.relpath(f, path), os.stat(f)) for f in files]
    return {"path": path, "files": [(name, st.st_size, st.st_mtime_ns) for name, st in stats]}


def _tokenizer_identity(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = (backend.to_str() if backend is not None
             else json.dumps(sorted(tokenizer.get_vocab().items())))
    return {"class": type(tokenizer).__name__,
            "vocab": hashlib.sha256(vocab.encode()).hexdigest(),
            "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
            "chat_template": tokenizer.chat_template}


def _digest(key):
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _write(path, table):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
