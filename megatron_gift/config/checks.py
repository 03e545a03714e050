"""Value checks that need no process group: ranges, positivity, mutually exclusive settings.

Types and key names are already enforced by the schema (:mod:`megatron_gift.config.schema`);
these are the facts a type cannot say. Every problem names the key and its flag, and a config
with several problems is refused once, naming them all (:func:`raise_problems`).
"""

import ast
import math
from typing import Callable, Iterable, Sequence, Union

from omegaconf import DictConfig

from megatron_gift.config.schema import LORA_TARGETS, SECTIONS, flag_name, section_fields
from megatron_gift.errors import ConfigError, UserError

_POSITIVE = {"model": ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                       "ffn_hidden_size", "seq_length", "make_vocab_size_divisible_by"),
             "parallel": ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                          "context_parallel_size", "expert_model_parallel_size"),
             "training": ("micro_batch_size", "global_batch_size", "train_iters",
                          "eval_interval", "eval_iters"),
             "precision": ("fp8_amax_history_len",),
             "logging": ("log_interval",)}
_POSITIVE_OR_NONE = {"parallel": ("virtual_pipeline_model_parallel_size",
                                  "expert_tensor_parallel_size"),
                     "model": ("num_moe_experts", "moe_ffn_hidden_size"),
                     "training": ("recompute_num_layers", "exit_interval",
                                  "exit_duration_in_mins"),
                     "checkpoint": ("save_interval",)}
_NON_NEGATIVE = {"optimizer": ("lr", "min_lr", "lr_warmup_iters", "weight_decay", "clip_grad"),
                 "precision": ("fp8_margin", "num_layers_at_start_in_bf16",
                               "num_layers_at_end_in_bf16")}


Refusal = Callable[[DictConfig], None]


def validate(config: DictConfig, refusals: Sequence[Refusal] = ()) -> DictConfig:
    """Check ``config`` (a structured JobConfig); raise one ConfigError naming every bad value.
    ``refusals``: checks of the machine that raise UserError (e.g.
    ``megatron_gift.platform.te.refuse_fp8_without_te``); a config refused anyway also names
    what they refuse, so that one error lists all there is to fix. Returns ``config``."""
    problems = config_problems(config)
    if problems:
        problems += refused(config, refusals)
    raise_problems(problems)
    return config


def config_problems(config: DictConfig) -> list[str]:
    """Every value of ``config`` that cannot work, one message each (empty: none)."""
    problems = [*_choice_problems(config), *_sign_problems(config), *_gift_problems(config.gift),
                *_lora_problems(config)]
    model = config.model
    if model.num_query_groups > 0 and model.num_attention_heads % model.num_query_groups:
        problems.append(f"model.num_attention_heads={model.num_attention_heads} is not a "
                        f"multiple of model.num_query_groups={model.num_query_groups}")
    if model.sliding_window is not None and model.seq_length > model.sliding_window:
        problems.append(f"model.seq_length={model.seq_length} exceeds the model's sliding "
                        f"attention window {model.sliding_window}; full attention is only exact "
                        "up to it (--seq-length)")
    problems += _layout_problems(config)
    if config.gift.head_chunk_tokens is not None and config.gift.head_chunk_tokens < 1:
        problems.append(f"{_name('gift', 'head_chunk_tokens')} must be >= 1, got "
                        f"{config.gift.head_chunk_tokens}")
    problems += _recompute_problems(config.training)
    problems += _precision_problems(config)
    if config.optimizer.min_lr > config.optimizer.lr:
        problems.append(f"optimizer.min_lr={config.optimizer.min_lr} exceeds optimizer.lr="
                        f"{config.optimizer.lr} (--min-lr, --lr)")
    return problems


def refused(config: DictConfig, refusals: Iterable[Refusal]) -> list[str]:
    """The messages of the ``refusals`` that refuse ``config`` (each raises UserError)."""
    messages = []
    for refuse in refusals:
        try:
            refuse(config)
        except UserError as error:
            messages.extend(getattr(error, "problems", None) or [str(error)])
    return messages


def raise_problems(problems: Iterable[str], error: type[UserError] = ConfigError) -> None:
    """Raise ``error`` naming every problem: one problem as it is, several on one line as
    ``N problems: (1) ...; (2) ...``. Nothing when there is none."""
    problems = list(problems)
    if len(problems) == 1:
        raise error(problems[0])
    if problems:
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(problems, 1))
        several = error(f"{len(problems)} problems: {listed}")
        several.problems = problems  # one by one, for a caller that lists more
        raise several


def is_sft(config: DictConfig) -> bool:
    """beta = inf: plain cross-entropy SFT, no reference model at all."""
    return math.isinf(config.gift.beta)


def _name(section: str, key: str) -> str:
    return f"{section}.{key} ({flag_name(section, key)})"


def _choice_problems(config: DictConfig) -> list[str]:
    problems = []
    for section in SECTIONS:
        for f in section_fields(section):
            choices = f.metadata.get("choices")
            value = config[section][f.name]
            if choices and value is not None and value not in choices:
                problems.append(f"{_name(section, f.name)} must be one of {', '.join(choices)}; "
                                f"got {value!r}")
    return problems


def _sign_problems(config: DictConfig) -> list[str]:
    problems = []
    for rule, keys_by_section in (("positive", _POSITIVE), ("positive or unset", _POSITIVE_OR_NONE),
                                  (">= 0", _NON_NEGATIVE)):
        for section, keys in keys_by_section.items():
            for key in keys:
                value = config[section][key]
                bad = (value is not None and value <= 0) if rule == "positive or unset" else (
                    value <= 0 if rule == "positive" else value < 0)
                if bad:
                    problems.append(f"{_name(section, key)} must be {rule}, got {value}")
    return problems


def _gift_problems(gift: DictConfig) -> list[str]:
    problems = []
    if math.isnan(gift.beta) or gift.beta < 0:
        problems.append(f"gift.beta (--gift-beta) must be >= 0 (inf for plain SFT), "
                        f"got {gift.beta}")
    if not 0.0 <= gift.smooth_lambda <= 1.0:
        problems.append(f"gift.smooth_lambda (--gift-smooth-lambda) must be in [0, 1], "
                        f"got {gift.smooth_lambda}")
    return problems + _soft_sft_problems(gift)


def _soft_sft_problems(gift: DictConfig) -> list[str]:
    w, name = gift.soft_sft_weight, _name("gift", "soft_sft_weight")
    if w is None:
        return []
    if math.isnan(w) or not 0.0 <= w <= 1.0:
        return [f"{name} must be in [0, 1], got {w}"]
    if math.isinf(gift.beta):
        return [f"{name} needs a finite gift.beta (--gift-beta; unused by soft SFT, but "
                "beta = inf loads no reference): drop --gift-beta inf"]
    if gift.head == "fused":
        return [f"{name} takes the logits head only: set --gift-head logits"]
    return []


def lora_targets(config: DictConfig) -> tuple[str, ...]:
    """``lora.target_modules`` as a tuple of names."""
    return tuple(t.strip() for t in str(config.lora.target_modules).split(",") if t.strip())


def _lora_problems(config: DictConfig) -> list[str]:
    lora = config.lora
    if lora.rank is None:
        return []
    problems = []
    if lora.rank < 1:
        problems.append(f"{_name('lora', 'rank')} must be >= 1, got {lora.rank}")
    if not 0.0 <= lora.dropout < 1.0:
        problems.append(f"{_name('lora', 'dropout')} must be in [0, 1), got {lora.dropout}")
    unknown = [t for t in lora_targets(config) if t not in LORA_TARGETS]
    if unknown or not lora_targets(config):
        problems.append(f"{_name('lora', 'target_modules')}={lora.target_modules!r}: choose "
                        f"among {', '.join(LORA_TARGETS)}")
    if config.gift.reference_load is not None:
        problems.append(f"{_name('gift', 'reference_load')} does not go with "
                        f"{_name('lora', 'rank')}: LoRA GIFT's reference is the student's own "
                        "base (its adapters off); drop one of them")
    if config.model.num_moe_experts:
        problems.append(f"{_name('lora', 'rank')} does not take a mixture-of-experts model yet")
    if config.precision.fp8_format is not None:
        problems.append(f"{_name('lora', 'rank')} does not take FP8 yet "
                        f"({_name('precision', 'fp8_format')})")
    return problems


def check_layer_split(config: DictConfig) -> DictConfig:
    """The layers split evenly over pipeline x virtual pipeline stages, and the bf16 layers of an
    FP8 run fit in a pipeline stage. Checked once the model section is complete (an HF base
    model sets ``num_layers``); raises one ConfigError naming every problem; returns
    ``config``."""
    raise_problems(layer_split_problems(config))
    return config


def layer_split_problems(config: DictConfig) -> list[str]:
    """The problems :func:`check_layer_split` refuses (empty: none)."""
    parallel, layers = config.parallel, config.model.num_layers
    stages = parallel.pipeline_model_parallel_size * (
        parallel.virtual_pipeline_model_parallel_size or 1)
    if stages <= 0:
        return []  # refused by validate
    problems = []
    if layers % stages:
        problems.append(
            f"model.num_layers={layers} is not divisible by pipeline x virtual pipeline stages = "
            f"{stages} (--num-layers, --pipeline-model-parallel-size, "
            "--virtual-pipeline-model-parallel-size)")
    per_stage = layers // parallel.pipeline_model_parallel_size
    if config.precision.first_last_layers_bf16:
        for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
            if config.precision[key] > per_stage:
                problems.append(f"{_name('precision', key)}={config.precision[key]} exceeds the "
                                f"{per_stage} layers of a pipeline stage")
    return problems + _moe_problems(config)


def moe_layer_freq(text: str) -> Union[int, list[int]]:
    """``model.moe_layer_freq`` as Megatron-Core takes it: ``"2"`` -> 2 (every 2nd layer is
    MoE), ``"[0,1,1]"`` -> ``[0, 1, 1]`` (one entry a layer, 1 for MoE). ValueError otherwise."""
    try:
        value = ast.literal_eval(str(text).strip())
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, (list, tuple)) and value and all(v in (0, 1) for v in value):
        return [int(v) for v in value]
    raise ValueError(f"{_name('model', 'moe_layer_freq')}={text!r} must be an integer >= 1 or "
                     "a list of 0/1 per layer, e.g. [0,1,1,1]")


def _moe_problems(config: DictConfig) -> list[str]:
    """Mixture-of-experts settings that cannot work, once the model section is complete."""
    model, ep = config.model, config.parallel.expert_model_parallel_size
    experts = model.num_moe_experts
    if not experts:
        return ([] if ep == 1 else [
            f"{_name('parallel', 'expert_model_parallel_size')}={ep} needs a mixture-of-experts "
            f"model ({_name('model', 'num_moe_experts')})"])
    problems = []
    if config.parallel.tensor_model_parallel_size > 1 and not config.parallel.sequence_parallel:
        problems.append(f"a mixture-of-experts model at {_name('parallel', 'tensor_model_parallel_size')}"
                        f"={config.parallel.tensor_model_parallel_size} needs "
                        f"{_name('parallel', 'sequence_parallel')} (Megatron-Core's MoE layer "
                        "refuses to train without it)")
    if ep < 1 or experts % ep:
        problems.append(f"{_name('model', 'num_moe_experts')}={experts} is not divisible by "
                        f"{_name('parallel', 'expert_model_parallel_size')}={ep}")
    if not 1 <= model.moe_router_topk <= experts:
        problems.append(f"{_name('model', 'moe_router_topk')}={model.moe_router_topk} must be in "
                        f"[1, {experts}] (the experts)")
    try:
        pattern = moe_layer_freq(model.moe_layer_freq)
    except ValueError as error:
        return problems + [str(error)]
    if isinstance(pattern, list) and len(pattern) != model.num_layers:
        problems.append(f"{_name('model', 'moe_layer_freq')} has {len(pattern)} entries for "
                        f"{model.num_layers} layers")
    return problems


def _layout_problems(config: DictConfig) -> list[str]:
    """Combinations of the parallel section that cannot work (the world size is checked when
    the run starts, the layer split once the model is known)."""
    parallel, seq = config.parallel, config.model.seq_length
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    problems = []
    if parallel.sequence_parallel and tp > 0 and seq % tp:
        problems.append(f"model.seq_length={seq} is not divisible by tensor parallel size {tp}, "
                        "as sequence parallelism needs (--seq-length, --sequence-parallel)")
    if cp > 1 and seq % (2 * cp):
        problems.append(f"model.seq_length={seq} is not divisible by 2 x context parallel size "
                        f"= {2 * cp} (--seq-length, --context-parallel-size)")
    if cp > 1 and config.data.pack:
        problems.append("data.pack (--pack) is not available with context parallelism: packed "
                        "sequences need the local attention layers, CP Transformer Engine's")
    if parallel.sequence_parallel and parallel.tensor_model_parallel_size == 1:
        problems.append(f"{_name('parallel', 'sequence_parallel')} needs "
                        f"{_name('parallel', 'tensor_model_parallel_size')} > 1")
    if parallel.overlap_param_gather and not parallel.use_distributed_optimizer:
        problems.append(f"{_name('parallel', 'overlap_param_gather')} needs "
                        f"{_name('parallel', 'use_distributed_optimizer')}")
    return problems


def _precision_problems(config: DictConfig) -> list[str]:
    """FP8 settings that cannot work together (that Transformer Engine is here is checked when
    the run starts: :func:`megatron_gift.platform.te.refuse_fp8_without_te`, and with the other
    problems of a refused config where it is one of :func:`validate`'s ``refusals``)."""
    precision = config.precision
    if precision.fp8_format is None:
        return _fp8_settings_without_format(precision)
    problems = []
    if not config.training.bf16:
        problems.append(f"{_name('precision', 'fp8_format')}={precision.fp8_format} needs "
                        f"{_name('training', 'bf16')}: FP8 runs the GEMMs of bf16 layers")
    delayed = precision.fp8_recipe == "delayed"
    for key in ("fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo"):
        if not delayed and precision[key] != _default("precision", key):
            problems.append(f"{_name('precision', key)} applies to "
                            f"{_name('precision', 'fp8_recipe')}=delayed only, not "
                            f"{precision.fp8_recipe}")
    if delayed and precision.first_last_layers_bf16:
        problems.append(f"{_name('precision', 'first_last_layers_bf16')} is not available with "
                        f"{_name('precision', 'fp8_recipe')}=delayed (its amax reduction spans "
                        "the whole block): use tensorwise, blockwise or mxfp8")
    if precision.fp8_param_gather and not config.parallel.use_distributed_optimizer:
        problems.append(f"{_name('precision', 'fp8_param_gather')} needs "
                        f"{_name('parallel', 'use_distributed_optimizer')}")
    if precision.reference_fp8_weights and precision.reference_precision != "fp8":
        problems.append(f"{_name('precision', 'reference_fp8_weights')} needs "
                        f"{_name('precision', 'reference_precision')}=fp8")
    if precision.reference_fp8_weights and delayed:
        problems.append(
            f"{_name('precision', 'reference_fp8_weights')} is not available with "
            f"{_name('precision', 'fp8_recipe')}=delayed: the frozen weights are quantized once, "
            "when loaded, before delayed scaling has seen any amax; use tensorwise, blockwise or "
            "mxfp8, or keep the reference's weights bf16")
    return problems


def _fp8_settings_without_format(precision: DictConfig) -> list[str]:
    """Every FP8 setting away from its default needs ``--fp8-format``."""
    return [f"{_name('precision', f.name)}={precision[f.name]} applies to FP8 runs only: set "
            f"{_name('precision', 'fp8_format')} (e4m3 or hybrid) or drop it"
            for f in section_fields("precision")
            if f.name != "fp8_format" and precision[f.name] != f.default]


def _default(section: str, key: str):
    return next(f.default for f in section_fields(section) if f.name == key)


def _recompute_problems(training: DictConfig) -> list[str]:
    granularity, method = training.recompute_granularity, training.recompute_method
    if granularity == "full" and (method is None or training.recompute_num_layers is None):
        return [f"{_name('training', 'recompute_granularity')}=full needs "
                f"{_name('training', 'recompute_method')} and "
                f"{_name('training', 'recompute_num_layers')}"]
    if granularity != "full" and (method is not None or training.recompute_num_layers is not None):
        return [f"{_name('training', 'recompute_method')} and "
                f"{_name('training', 'recompute_num_layers')} apply to "
                f"{_name('training', 'recompute_granularity')}=full only"]
    return []
