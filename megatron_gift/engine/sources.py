"""Where a run's weights come from, settled before any model is built.

``--pretrained-checkpoint`` and ``--reference-load`` each name either a Megatron checkpoint
(Megatron-LM layout, as the trainer and ``megatron_gift.convert`` write) or a local Hugging Face
model directory, which is converted once into the conversion cache. A source with Hugging
Face assets (an HF directory, or a checkpoint with ``hf/``) also sets the ``model`` section's
architecture and, unless given, the tokenizer; its assets travel into the run's checkpoints
so that exports and the RL hand-off find them.
"""

import os
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from megatron_gift.config import check_layer_split, from_container, is_sft, validate
from megatron_gift.core import checkpoint
from megatron_gift.errors import MissingFileError, UserError
from megatron_gift.hf import convert
from megatron_gift.hf.architecture import (MODEL_KEYS, hf_assets, is_hf_directory,
                                           model_section_from_hf)


def check_paths(config: DictConfig) -> None:
    """Every path the run reads exists and is what its flag needs; called before any work.

    ``--load DIR`` without a checkpoint in it is accepted only as the run's own ``--save``
    (a job that resumes itself when restarted), else refused: a mistyped ``--load`` must not
    start a new run.
    """
    data, saved = config.data, config.checkpoint
    for flag, path in (("--train-path", data.train_path), ("--valid-path", data.valid_path),
                       ("--tokenizer", config.model.tokenizer)):
        if path and not os.path.exists(path):
            raise MissingFileError(f"{flag} {path}: no such file or directory")
    reference = None if is_sft(config) else config.gift.reference_load  # beta = inf: unused
    for flag, path in (("--pretrained-checkpoint", saved.pretrained_checkpoint),
                       ("--reference-load", reference)):
        if path and not (is_hf_directory(path) or checkpoint.latest_checkpoint(path)):
            raise MissingFileError(
                f"{flag} {path}: neither a Megatron checkpoint ({checkpoint.TRACKER} or "
                "metadata.json) nor a Hugging Face model directory (config.json)")
    load = saved.load
    if load and checkpoint.latest_checkpoint(load) is None and not checkpoint.iterations(load) \
            and not _same_path(load, saved.save):
        raise MissingFileError(
            f"--load {load}: no checkpoint there ({checkpoint.TRACKER} or metadata.json). "
            "Give the save directory of the run to continue; --pretrained-checkpoint for "
            "initial weights; or --save DIR --load DIR for a job that resumes itself")


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def resolve_model(config: DictConfig, tokenizer_size: int,
                  assets: Optional[str] = None) -> DictConfig:
    """Fill the ``model`` section from the HF config in ``assets`` (default: the pretrained
    checkpoint's, else the resumed run's) and make ``vocab_size`` and ``kv_channels``
    concrete (in place); returns ``config``."""
    assets = assets or hf_assets(model_source(config))
    model = config.model
    if assets is not None:
        model.update(model_section_from_hf(assets))
        if model.tokenizer is None:
            model.tokenizer = assets
    if model.vocab_size is None:
        model.vocab_size = tokenizer_size
    if tokenizer_size > model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer_size} tokens but model.vocab_size is "
                         f"{model.vocab_size}")
    if model.kv_channels is None:
        model.kv_channels = model.hidden_size // model.num_attention_heads
    return check_layer_split(validate(config))


def model_source(config: DictConfig) -> Optional[str]:
    """Where the weights come from: the pretrained checkpoint, else the run to resume."""
    return config.checkpoint.pretrained_checkpoint or config.checkpoint.load


def megatron_checkpoint(source: Optional[str], converter: str = "auto",
                        cache_root: Optional[str] = None) -> Optional[str]:
    """A Megatron checkpoint path for ``source`` (HF directories are converted by
    ``converter`` through the cache)."""
    if source is None:
        return None
    if is_hf_directory(source):
        return convert.cached_conversion(source, cache_root, converter)
    if checkpoint.latest_checkpoint(source) is None:
        raise MissingFileError(f"no checkpoint at {source}: neither a Megatron checkpoint "
                                f"({checkpoint.TRACKER} or metadata.json) nor a Hugging Face "
                                "directory (config.json)")
    return source


def conversion(config: DictConfig, reference_source: Optional[str],
               recorded: Optional[dict] = None) -> dict:
    """``{"converted_from": [HF directories], "converter": "builtin" | "bridge"}`` for the run's
    Hugging Face sources (the pretrained checkpoint, the reference), settled before any work:
    ``--converter bridge`` without Megatron-Bridge fails here. A resumed run keeps its record.
    ``recorded``: the run facts of the checkpoint resumed. Empty when no source is an HF
    directory."""
    hf_sources = [s for s in dict.fromkeys([config.checkpoint.pretrained_checkpoint,
                                            reference_source])
                  if s is not None and is_hf_directory(s)]
    if hf_sources:
        return {"converted_from": hf_sources,
                "converter": convert.pick_converter(config.checkpoint.converter)}
    recorded = recorded or {}
    return {key: recorded[key] for key in ("converted_from", "converter")
            if recorded.get(key) is not None}


def check_reference_matches(student_source: Optional[str], reference_source: Optional[str]) -> None:
    """Refuse a reference whose weights' dtype or model differs from the student's source."""
    if student_source is None or reference_source is None or student_source == reference_source:
        return
    facts = {name: _facts(path) for name, path in (("student", student_source),
                                                  ("reference", reference_source))}
    for key in ("dtype", "vocab_size", "architecture"):
        student, reference = facts["student"][key], facts["reference"][key]
        if student != reference:
            raise UserError(f"the reference checkpoint {reference_source} differs from the "
                             f"student's {student_source} in {key}: {reference} vs {student}")


def copy_assets(source: Optional[str], save_dir: str) -> None:
    """Copy the source's HF assets (config, tokenizer) to ``save_dir/hf``; rank 0 calls it."""
    assets = hf_assets(source)
    if assets is not None:
        convert.copy_assets(assets, save_dir)


def _facts(source: str) -> dict:
    if is_hf_directory(source):
        section = model_section_from_hf(source)
        dtype = str(convert.checkpoint_dtype(convert.weight_files(source))).removeprefix("torch.")
    else:
        directory = checkpoint.latest_checkpoint(source)
        if directory is None:
            raise MissingFileError(f"no checkpoint at {source}")
        config = from_container(checkpoint.run_facts(directory)["config"])
        section = OmegaConf.to_container(config.model)
        dtype = str(torch.bfloat16 if config.training.bf16 else torch.float32).removeprefix("torch.")
    arch = {k: section.get(k) for k in MODEL_KEYS if k not in ("vocab_size", "family", "sliding_window")}
    return {"dtype": dtype, "vocab_size": section.get("vocab_size"), "architecture": arch}
