"""SFT data: records -> cached token sequences with a loss mask -> micro-batches, and the
deterministic micro-batch order that a checkpoint can resume.

Records are read and checked by :mod:`megatron_gift.records`, turned into tokens by
:mod:`megatron_gift.formatting`, optionally packed by :mod:`megatron_gift.packing`, and stored
once per node by :mod:`megatron_gift.data_cache`. A micro-batch holds ``[b, s]`` tensors:

* ``tokens`` (int64): the inputs; ``pad`` after the last sample;
* ``labels`` (int64): the next token where it is a training target, else ``-100``;
* ``loss_mask`` (float32): 1.0 where ``labels`` is a target;
* ``position_ids`` (int64): 0 at the start of each sample, counting on into the padding;
* ``segment_ids`` (int64, packed data only): 1, 2, ... per sample of the row, 0 for padding;
  attention stays inside a segment (``pipeline.causal_attention_mask``).

Each sample fills its own positions with its tokens but the last and labels them with its
tokens but the first, so no label crosses a sample boundary.
"""

import json
import os
from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from megatron_gift.data import cache as data_cache
from megatron_gift.data.formatting import encode
from megatron_gift.errors import UserError
from megatron_gift.platform.once import cache_root
from megatron_gift.data.packing import pack as pack_samples
from megatron_gift.data.records import Fields, Malformed, read_examples

IGNORE_INDEX = -100
OVERLONG = ("truncate", "reject")
MALFORMED = ("reject", "skip")
_REPORTED_SKIPS = 5


class SFTDataset:
    """The tokenised samples of one data source, as sequences (one sample each, or packs).

    ``len()`` counts sequences. ``num_records``, ``num_samples``, ``truncated`` (samples cut to
    ``seq_length + 1`` tokens), ``skipped`` (malformed records left out) and
    ``skipped_examples`` (the first few, ``"place: reason"``), ``emptied`` (samples that
    truncation left without a loss token) and ``longest_prompt`` (tokens before the first loss
    token, longest over the emptied samples) describe what was read;
    ``cache_path`` is the cache file and ``built`` whether this process wrote it.
    """

    def __init__(self, path, tokenizer, seq_length, *, prompt_field="prompt",
                 response_field="response", messages_field="messages", text_field=None,
                 split="train", overlong="truncate", malformed="reject", pack=False,
                 cache_dir=None):
        for name, value, choices in (("overlong", overlong, OVERLONG),
                                     ("malformed", malformed, MALFORMED)):
            if value not in choices:
                raise UserError(f"data.{name} must be one of {choices}, got {value!r}")
        self.path, self.seq_length, self.pack = path, seq_length, bool(pack)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        fields = Fields(prompt_field, response_field, messages_field, text_field)
        options = {"split": split, "seq_length": seq_length, "overlong": overlong,
                   "malformed": malformed, "pack": self.pack}
        cache_dir = cache_dir or os.path.join(cache_root(), "data")
        table, self.cache_path, self.built = data_cache.cached_table(
            cache_dir, os.path.basename(os.path.normpath(path)),
            data_cache.cache_key(path, tokenizer, {**options, "fields": asdict(fields)}),
            lambda: _tokenize(path, tokenizer, fields, **options))
        info = json.loads(table.schema.metadata[b"megatron_gift"])
        self.num_records, self.truncated = info["records"], info["truncated"]
        self.skipped, self.skipped_examples = info["skipped"], info["skipped_examples"]
        self.emptied, self.longest_prompt = info["emptied"], info["longest_prompt"]
        ids, mask = (table.column(k).combine_chunks() for k in ("input_ids", "loss_mask"))
        self._offsets, self._ids, self._mask = (
            ids.offsets.to_numpy(), ids.values.to_numpy(), mask.values.to_numpy())
        sequence = table.column("sequence").to_numpy()
        self._starts = np.flatnonzero(np.diff(sequence, prepend=-1, append=-1))
        self.num_samples = len(sequence)

    def __len__(self):
        return len(self._starts) - 1

    @property
    def max_token_id(self) -> int:
        """The largest token id stored (every input and label is one); -1 when empty."""
        return int(self._ids.max()) if len(self._ids) else -1

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)`` of stored sample ``index`` (pack order): int32 and bool ``[n]``."""
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return self._ids[lo:hi], self._mask[lo:hi].astype(np.bool_)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The micro-batch of sequences ``indices``: dict of ``[b, s]`` tensors (module doc)."""
        b, s = len(indices), self.seq_length
        tokens = np.full((b, s), self.pad_id, np.int64)
        labels = np.full((b, s), IGNORE_INDEX, np.int64)
        positions, segments = np.zeros((b, s), np.int64), np.zeros((b, s), np.int64)
        for row, index in enumerate(indices):
            end = 0
            for segment, k in enumerate(range(self._starts[index], self._starts[index + 1]), 1):
                ids, mask = self.sample(k)
                start, end = end, end + len(ids) - 1
                tokens[row, start:end] = ids[:-1]
                labels[row, start:end] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
                positions[row, start:end] = np.arange(end - start)
                segments[row, start:end] = segment
            positions[row, end:] = np.arange(end - start, end - start + s - end)
        batch = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                 "loss_mask": torch.from_numpy(labels != IGNORE_INDEX).float(),
                 "position_ids": torch.from_numpy(positions)}
        if self.pack:
            batch["segment_ids"] = torch.from_numpy(segments)
        return batch


def micro_batch_indices(num_samples: int, consumed_samples: int, global_batch_size: int,
                        micro_batch_size: int, dp_rank: int, dp_size: int,
                        seed: Optional[int]) -> list[list[int]]:
    """Sample indices of this data-parallel rank's micro-batches for the next global batch.

    The order is a seeded permutation per epoch over the whole data set (file order when
    ``seed`` is None), so the position in the data is one number (``consumed_samples``) and
    resuming from it is exact.
    """
    orders, indices = {}, []
    for k in range(consumed_samples, consumed_samples + global_batch_size):
        epoch, offset = divmod(k, num_samples)
        if epoch not in orders:
            orders[epoch] = (np.arange(num_samples) if seed is None else
                             np.random.default_rng([seed, epoch]).permutation(num_samples))
        indices.append(int(orders[epoch][offset]))
    per_rank = global_batch_size // dp_size
    mine = indices[dp_rank * per_rank: (dp_rank + 1) * per_rank]
    return [mine[i: i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def _tokenize(path, tokenizer, fields, *, split, seq_length, overlong, malformed, pack):
    """Every usable record of ``path`` as one Arrow table: ``input_ids`` and ``loss_mask``
    lists, ``sequence`` (the number of the sequence each sample goes to), rows in sequence
    order; counts in the schema metadata."""
    samples, skipped, truncated, records = [], [], 0, 0
    emptied, longest_prompt = 0, 0
    for place, example in read_examples(path, fields, split):
        records += 1
        if not isinstance(example, Malformed):
            try:
                example = encode(example, tokenizer)
            except Malformed as error:
                example = error
            except ValueError as error:
                raise UserError(f"{place}: {error}") from None
        if isinstance(example, Malformed):
            if malformed == "reject":
                raise UserError(f"{place}: {example} (data.malformed=reject; set "
                                 "data.malformed=skip, flag --malformed skip, to leave such "
                                 "records out)")
            skipped.append(f"{place}: {example}")
            continue
        ids, mask = example
        if len(ids) > seq_length + 1:
            if overlong == "reject":
                raise UserError(f"{place}: {len(ids)} tokens exceed seq_length + 1 = "
                                 f"{seq_length + 1} (data.overlong=reject; use truncate to cut)")
            if any(mask[1:]) and not any(mask[1: seq_length + 1]):
                emptied += 1
                longest_prompt = max(longest_prompt, list(mask[1:]).index(True) + 1)
            ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
            truncated += 1
        samples.append((ids, mask))
    if not samples:
        raise UserError(f"{path}: none of its {records} records is usable "
                         f"({len(skipped)} malformed, skipped)")
    bins = (pack_samples([len(ids) - 1 for ids, _ in samples], seq_length) if pack
            else [[i] for i in range(len(samples))])
    order = [i for b in bins for i in b]
    info = {"records": records, "truncated": truncated, "emptied": emptied,
            "longest_prompt": longest_prompt, "skipped": len(skipped),
            "skipped_examples": skipped[:_REPORTED_SKIPS]}
    return pa.table({
        "input_ids": _lists([samples[i][0] for i in order], np.int32),
        "loss_mask": _lists([samples[i][1] for i in order], np.int8),
        "sequence": pa.array(np.repeat(np.arange(len(bins)), [len(b) for b in bins]), pa.int32()),
    }, metadata={"megatron_gift": json.dumps(info)})


def _lists(rows, dtype):
    """An Arrow ``large_list<dtype>`` array of the lists ``rows``."""
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    values = np.concatenate([np.asarray(r, dtype) for r in rows])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
