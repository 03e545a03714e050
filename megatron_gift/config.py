"""Run configuration: NeMo-style YAML sections, Megatron-LM-style flags, one validated object.

Every leaf ``section.key`` has a flag: ``--key-with-dashes`` (``gift.*`` keys are prefixed
``--gift-``, ``gift.reference_load`` is ``--reference-load``); booleans also take ``--no-...``.
Precedence: defaults < ``--config recipe.yaml`` < flags < ``section.key=value`` overrides.
"""

import argparse
import math

from omegaconf import OmegaConf

DEFAULTS = {
    "model": {
        "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 176, "seq_length": 48, "rotary_base": 10000, "norm_epsilon": 1e-5,
        "init_method_std": 0.02, "untie_embeddings_and_output_weights": True,
        "make_vocab_size_divisible_by": 128,
        "tokenizer": None,  # a Hugging Face tokenizer directory; None: the bundled one
        # Set from the HF config when the pretrained checkpoint is a Hugging Face model:
        "family": "llama",  # llama | qwen2 | mistral: the HF architecture of exports
        "kv_channels": None,  # head dim; None: hidden_size / num_attention_heads
        "rope_scaling_factor": None,  # Llama 3.x RoPE scaling factor
        "add_qkv_bias": False,  # Qwen2
        "vocab_size": None,  # the real vocab (the model pads it); None: the tokenizer's
        "sliding_window": None,  # Mistral's attention window: seq_length may not exceed it
    },
    "parallel": {
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": None, "use_distributed_optimizer": False,
    },
    "gift": {"beta": 20.0, "smooth_lambda": 0.0, "reference_load": None},
    "data": {
        # JSONL, Parquet, or a datasets.save_to_disk directory (split: of a DatasetDict)
        "train_path": None, "valid_path": None, "split": "train",
        "prompt_field": "prompt", "response_field": "response",
        "messages_field": "messages",  # chat records: a list of {role, content}
        "text_field": None,  # set for plain next-token training on raw text
        "overlong": "truncate",  # or "reject"
        "malformed": "reject",  # or "skip" (reported in the log)
        "pack": False,  # several samples per sequence, attention kept inside each
        "cache_dir": None,  # None: $MEGATRON_GIFT_CACHE/data, else ~/.cache/megatron_gift/data
    },
    "training": {
        "micro_batch_size": 4, "global_batch_size": 16, "train_iters": 100, "seed": 1234,
        "bf16": False, "eval_interval": 50, "eval_iters": 4,
    },
    "optimizer": {
        "lr": 1e-3, "min_lr": 1e-4, "lr_warmup_iters": 0, "lr_decay_style": "cosine",
        "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.95, "clip_grad": 1.0,
    },
    "checkpoint": {"save": None, "load": None, "pretrained_checkpoint": None, "save_interval": None},
    "logging": {"tensorboard_dir": None, "metrics_file": None, "log_interval": 1, "progress": True},
}
_CHOICES = {"data.overlong": ("truncate", "reject"), "data.malformed": ("reject", "skip"),
            "model.family": ("llama", "qwen2", "mistral"),
            "optimizer.lr_decay_style": ("constant", "linear", "cosine")}


def flag_name(section, key):
    if section == "gift":
        return "--reference-load" if key == "reference_load" else f"--gift-{key.replace('_', '-')}"
    return "--" + key.replace("_", "-")


def parse_config(argv=None, defaults=None):
    """Build the validated config from ``argv`` (default: sys.argv[1:])."""
    base = OmegaConf.merge(OmegaConf.create(DEFAULTS), defaults or {})
    parser = argparse.ArgumentParser(
        description="GIFT post-training on Megatron-Core",
        epilog="Positional overrides: section.key=value (e.g. gift.beta=10).")
    parser.add_argument("--config", help="recipe YAML (sections as in megatron_gift.config)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    for section, keys in DEFAULTS.items():
        for key, default in keys.items():
            kwargs = dict(dest=f"{section}.{key}", default=argparse.SUPPRESS,
                          help=f"{section}.{key} (default {default})")
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _parse_value
            parser.add_argument(flag_name(section, key), **kwargs)
    args = vars(parser.parse_args(argv))
    recipe, overrides = args.pop("config", None), args.pop("overrides")
    config = OmegaConf.merge(OmegaConf.create(DEFAULTS), defaults or {})
    if recipe:
        try:
            config = OmegaConf.merge(config, OmegaConf.load(recipe))
        except FileNotFoundError:
            parser.error(f"recipe not found: {recipe}")
    for key, value in args.items():
        OmegaConf.update(config, key, value)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            parser.error(f"override {override!r} is not section.key=value")
        OmegaConf.update(config, key, _parse_value(value))
    return validate(config)


def validate(config):
    """Check values that need no process group; raise ValueError naming the bad one."""
    unknown = set(OmegaConf.to_container(config)) - set(DEFAULTS)
    for section in DEFAULTS:
        unknown |= {f"{section}.{k}" for k in config[section]} - {
            f"{section}.{k}" for k in DEFAULTS[section]}
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    gift, model, training = config.gift, config.model, config.training
    beta = float(gift.beta)
    if math.isnan(beta) or beta < 0:
        raise ValueError(f"gift.beta (--gift-beta) must be >= 0 (inf for plain SFT), got {beta}")
    if not 0.0 <= float(gift.smooth_lambda) <= 1.0:
        raise ValueError(f"gift.smooth_lambda must be in [0, 1], got {gift.smooth_lambda}")
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(config, key)
        if value not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {value!r}")
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if int(model[key]) <= 0:
            raise ValueError(f"model.{key} must be positive, got {model[key]}")
    window = model.sliding_window
    if window is not None and int(model.seq_length) > int(window):
        raise ValueError(f"model.seq_length={model.seq_length} exceeds the model's sliding "
                         f"attention window {window}; full attention is only exact up to it")
    for key in ("micro_batch_size", "global_batch_size", "train_iters"):
        if int(training[key]) <= 0:
            raise ValueError(f"training.{key} must be positive, got {training[key]}")
    return config


def is_sft(config):
    """beta = inf: plain cross-entropy SFT, no reference model at all."""
    return math.isinf(float(config.gift.beta))


def _parse_value(text):
    """A flag's text as None, int, float (inf included) or str."""
    if text.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
