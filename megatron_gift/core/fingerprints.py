"""Fingerprints of what a run reads: a base or reference checkpoint, and a tokenizer.

A run records them when it starts and checks them when it resumes, so that a base re-converted
in place, a reference swapped for another, or a tokenizer edited since the run started is
refused by name instead of silently changing the run. Checkpoint fingerprints hash metadata and
file sizes only (cheap at 70B); tokenizer fingerprints hash what decides the token ids.
"""

import hashlib
import json
import os
from typing import Any, Optional

from megatron_gift.core.paths import latest_checkpoint

_HF_METADATA = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def source_fingerprint(path: str) -> str:
    """A 16-hex-digit digest of the weights ``path`` names: a Hugging Face directory (its
    config, weight index and weight files' names and sizes) or a Megatron checkpoint root (the
    newest iteration's name, index files, and every file's name and size)."""
    directory = latest_checkpoint(path)
    if directory is None:  # a Hugging Face directory
        directory = path
        texts = [_read(os.path.join(path, name)) for name in _HF_METADATA]
        files = [n for n in os.listdir(path) if n.endswith((".safetensors", ".bin", ".pt"))]
    else:
        texts = [os.path.basename(directory), _read(os.path.join(directory, "metadata.json")),
                 _read(os.path.join(directory, ".metadata"))]
        files = os.listdir(directory)
    sizes = [f"{name}:{os.path.getsize(os.path.join(directory, name))}" for name in sorted(files)
             if os.path.isfile(os.path.join(directory, name))]
    return _digest([*texts, *sizes])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of the token ids ``tokenizer`` (a ``transformers`` tokenizer) gives: its vocab
    and its special tokens. Two tokenizers with the same digest encode text to the same ids."""
    specials = {name: getattr(tokenizer, f"{name}_token_id", None)
                for name in ("bos", "eos", "pad", "unk")}
    return _digest([json.dumps(sorted(tokenizer.get_vocab().items())), json.dumps(specials)])


def _read(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _digest(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
