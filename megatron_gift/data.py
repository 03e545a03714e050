"""SFT data: JSONL or Parquet records -> token sequences with a response-only loss mask, and
the deterministic micro-batch order that a checkpoint can resume.

A prompt/response record becomes ``prompt + response + eos`` with the loss on the response and
the eos; a raw-text record (``text_field``) becomes ``bos + text + eos`` with the loss on every
token. Micro-batches hold ``tokens``, ``labels`` (next tokens, ``-100`` where no loss),
``loss_mask`` and ``position_ids``, each ``[b, s]``.
"""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import torch

IGNORE_INDEX = -100


class SFTDataset:
    """Tokenised records of one file; ``samples[i] = (token ids, loss mask)`` as int arrays."""

    def __init__(self, path, tokenizer, seq_length, *, prompt_field="prompt",
                 response_field="response", text_field=None, overlong="truncate"):
        self.path, self.seq_length = path, seq_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.samples, self.truncated = [], 0
        for line, record in _read_records(path):
            ids, mask = _tokenize(record, line, path, tokenizer, prompt_field, response_field,
                                  text_field)
            if len(ids) > seq_length + 1:
                if overlong == "reject":
                    raise ValueError(
                        f"{path}:{line}: {len(ids)} tokens exceed seq_length + 1 = "
                        f"{seq_length + 1} (data.overlong=reject; use truncate to cut)")
                ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
                self.truncated += 1
            self.samples.append((np.asarray(ids, np.int64), np.asarray(mask, np.bool_)))

    def __len__(self):
        return len(self.samples)

    def batch(self, indices):
        """The micro-batch of ``indices``: dict of ``[b, s]`` tensors (see module doc)."""
        b, s = len(indices), self.seq_length
        tokens = np.full((b, s + 1), self.pad_id, np.int64)
        mask = np.zeros((b, s + 1), np.bool_)
        for row, index in enumerate(indices):
            ids, loss_mask = self.samples[index]
            tokens[row, : len(ids)], mask[row, : len(ids)] = ids, loss_mask
        tokens, mask = torch.from_numpy(tokens), torch.from_numpy(mask)
        return {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": torch.where(mask[:, 1:], tokens[:, 1:], IGNORE_INDEX),
            "loss_mask": mask[:, 1:].float(),
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
        }


def micro_batch_indices(num_samples, consumed_samples, global_batch_size, micro_batch_size,
                        dp_rank, dp_size, seed):
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


def _read_records(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if path.endswith(".parquet"):
        records = enumerate(pq.read_table(path).to_pylist(), start=1)
    else:
        records = _jsonl(path)
    count = 0
    for line, record in records:
        count += 1
        yield line, record
    if count == 0:
        raise ValueError(f"data file has no records: {path}")


def _jsonl(path):
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if text.strip():
                try:
                    yield line, json.loads(text)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line}: not a JSON record ({error})") from None


def _tokenize(record, line, path, tokenizer, prompt_field, response_field, text_field):
    def field(name):
        value = record.get(name) if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}:{line}: record has no non-empty string field {name!r}")
        return value

    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if text_field is not None:
        ids = [tokenizer.bos_token_id] + encode(field(text_field)) + [tokenizer.eos_token_id]
        return ids, [False] + [True] * (len(ids) - 1)
    prompt = encode(field(prompt_field))
    response = encode(field(response_field)) + [tokenizer.eos_token_id]
    return prompt + response, [False] * len(prompt) + [True] * len(response)
