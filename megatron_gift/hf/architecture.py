"""Which Hugging Face causal LMs map onto the project's Megatron-Core ``GPTModel``, and how a
Hugging Face ``config.json`` translates to the run's ``model`` config section and back.

Supported: the Llama (Llama 2/3.x), Qwen2 (Qwen2, Qwen2.5, Qwen2.5-Math), Qwen3 (dense) and
Mistral families, all RoPE + RMSNorm + SwiGLU + GQA decoders. Qwen2 adds a bias on the fused
QKV projection; Qwen3 an RMSNorm on each head's query and key (Megatron-Core's
``qk_layernorm``) and a head dim of its own (``head_dim``, not hidden / heads); Qwen3-MoE
replaces the MLP of its sparse layers by ``num_experts`` SwiGLU experts of
``moe_intermediate_size`` behind a softmax top-k router (Megatron-Core's MoE layer);
Llama 3.1+ scales RoPE ("llama3" rope type, as Megatron-Core implements it); small Qwen2.5 and
Llama 3.2 models tie the embeddings to the output layer.
"""

import os
from typing import TYPE_CHECKING, Any, Optional

from megatron_gift.errors import MissingFileError, UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from transformers import PretrainedConfig

FAMILIES = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
            "qwen3_moe": "Qwen3MoeConfig", "mistral": "MistralConfig"}  # transformers
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "mistral": "MistralForCausalLM"}
# Megatron-Core's llama3 RoPE scaling fixes these (rotary_pos_embedding._apply_scaling).
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
ASSETS = "hf"  # a checkpoint's sub-directory with its HF config.json and tokenizer, no weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# The model-section keys an HF config determines.
MODEL_KEYS = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "kv_channels", "rotary_base", "rope_scaling_factor",
              "norm_epsilon", "untie_embeddings_and_output_weights", "add_qkv_bias", "qk_layernorm",
              "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq",
              "moe_norm_topk_prob", "vocab_size", "sliding_window")


def is_hf_directory(path: Optional[str]) -> bool:
    """True for a directory holding a Hugging Face ``config.json``."""
    return path is not None and os.path.isfile(os.path.join(path, "config.json"))


def hf_assets(source: Optional[str]) -> Optional[str]:
    """The directory with the HF ``config.json`` and tokenizer of ``source`` (an HF directory,
    or a checkpoint root keeping them in ``hf/``), or None."""
    if source is None:
        return None
    if is_hf_directory(source):
        return source
    own = os.path.join(source, ASSETS)
    return own if is_hf_directory(own) else None


def check_tokenizer_files(hf_dir: str) -> None:
    """Raise FileNotFoundError naming ``hf_dir`` unless it holds a tokenizer's vocabulary."""
    if not any(os.path.isfile(os.path.join(hf_dir, name)) for name in TOKENIZER_FILES):
        raise MissingFileError(f"{hf_dir}: no tokenizer files (one of {list(TOKENIZER_FILES)})")


def model_section_from_hf(hf_dir: str) -> dict[str, Any]:
    """The ``model`` config keys (:data:`MODEL_KEYS`) of the HF causal LM in ``hf_dir``.

    Raises ValueError naming the architecture when it is not a supported family or uses a
    feature the Megatron model here does not reproduce exactly.
    """
    if not is_hf_directory(hf_dir):
        raise MissingFileError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(hf_dir)
    family = hf.model_type
    architectures = getattr(hf, "architectures", None) or [ARCHITECTURES.get(family, family)]
    if family not in FAMILIES or architectures[0] != ARCHITECTURES[family]:
        raise UserError(
            f"{hf_dir}: architecture {architectures[0]} (model_type {family!r}) is not supported; "
            f"supported: {', '.join(ARCHITECTURES.values())}")
    _check_features(hf, hf_dir)
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    heads = hf.num_attention_heads
    return {
        "family": family,
        "num_layers": hf.num_hidden_layers,
        "hidden_size": hf.hidden_size,
        "num_attention_heads": heads,
        "num_query_groups": getattr(hf, "num_key_value_heads", None) or heads,
        "ffn_hidden_size": hf.intermediate_size,
        "kv_channels": getattr(hf, "head_dim", None) or hf.hidden_size // heads,
        "rotary_base": float(rope.get("rope_theta", 10000.0)),
        "rope_scaling_factor": float(rope["factor"]) if rope.get("rope_type") == "llama3" else None,
        "norm_epsilon": float(hf.rms_norm_eps),
        "untie_embeddings_and_output_weights": not hf.tie_word_embeddings,
        "add_qkv_bias": family == "qwen2",
        "qk_layernorm": family in ("qwen3", "qwen3_moe"),
        **_moe_section(hf),
        "vocab_size": hf.vocab_size,
        "sliding_window": _sliding_window(hf),
    }


def hf_config_from_model_section(model: "DictConfig",
                                 base: Optional[dict[str, Any]] = None) -> "PretrainedConfig":
    """A ``transformers`` config for the model section ``model``.

    ``base``: the original HF config dict when the model came from Hugging Face (keeps its
    token ids, context length and other fields); None builds a fresh config of
    ``model.family``.
    """
    family = model.family
    values = dict(base or {})
    for key in ("architectures", "model_type", "transformers_version", "rope_scaling",
                "rope_theta", "dtype", "torch_dtype"):
        values.pop(key, None)
    rope = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    if model.rope_scaling_factor:
        rope = {"rope_type": "llama3", "factor": float(model.rope_scaling_factor),
                **_LLAMA3_ROPE, "rope_theta": float(model.rotary_base)}
    values.update(
        num_hidden_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, intermediate_size=model.ffn_hidden_size,
        head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
        rope_parameters=rope, rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        vocab_size=model.vocab_size, hidden_act="silu", architectures=[ARCHITECTURES[family]])
    values.setdefault("max_position_embeddings", max(model.seq_length, 8192 if model.rope_scaling_factor else 0))
    if family == "qwen2":
        values.pop("head_dim")  # Qwen2 derives it
    if family == "qwen3_moe":
        values.update(_hf_moe_values(model))
    import transformers

    return getattr(transformers, FAMILIES[family])(**values)


def _moe_section(hf) -> dict[str, Any]:
    """The model section's MoE keys of an HF config (a dense model: none set). Qwen3-MoE's
    layer ``i`` is sparse unless listed in ``mlp_only_layers``, and where
    ``(i + 1) % decoder_sparse_step == 0``."""
    experts = getattr(hf, "num_experts", None)
    if not experts:
        return {"num_moe_experts": None}
    dense = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(hf.num_hidden_layers)]
    return {"num_moe_experts": experts, "moe_router_topk": hf.num_experts_per_tok,
            "moe_ffn_hidden_size": hf.moe_intermediate_size,
            "moe_layer_freq": "1" if all(pattern) else str(pattern).replace(" ", ""),
            "moe_norm_topk_prob": bool(getattr(hf, "norm_topk_prob", True))}


def moe_layers(model: "DictConfig") -> list[bool]:
    """Per layer, whether it is a mixture-of-experts layer (all False for a dense model)."""
    if not model.get("num_moe_experts"):
        return [False] * model.num_layers
    from megatron_gift.config.checks import moe_layer_freq

    pattern = moe_layer_freq(model.moe_layer_freq)
    if isinstance(pattern, int):
        return [i % pattern == 0 for i in range(model.num_layers)]
    return [bool(v) for v in pattern]


def _hf_moe_values(model: "DictConfig") -> dict[str, Any]:
    sparse = moe_layers(model)
    return {"num_experts": model.num_moe_experts, "num_experts_per_tok": model.moe_router_topk,
            "moe_intermediate_size": model.moe_ffn_hidden_size or model.ffn_hidden_size,
            "decoder_sparse_step": 1, "norm_topk_prob": bool(model.moe_norm_topk_prob),
            "mlp_only_layers": [i for i, moe in enumerate(sparse) if not moe]}


def _check_features(hf, hf_dir):
    name = type(hf).__name__
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise UserError(f"{hf_dir}: hidden_act={hf.hidden_act!r} is not supported (only silu)")
    if getattr(hf, "mlp_bias", False):
        raise UserError(f"{hf_dir}: mlp_bias=True is not supported")
    if hf.model_type != "qwen2" and getattr(hf, "attention_bias", False):
        raise UserError(f"{hf_dir}: attention_bias=True is not supported for {name}")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    if kind == "llama3":
        different = {k: rope.get(k) for k, v in _LLAMA3_ROPE.items() if float(rope.get(k, v)) != v}
        if different:
            raise UserError(f"{hf_dir}: llama3 RoPE scaling with {different} is not supported "
                             f"(Megatron-Core implements {_LLAMA3_ROPE})")
    elif kind != "default":
        raise UserError(f"{hf_dir}: RoPE type {kind!r} is not supported (default, llama3)")


def _sliding_window(hf):
    if hf.model_type in ("qwen2", "qwen3", "qwen3_moe") and not getattr(
            hf, "use_sliding_window", False):
        return None
    return getattr(hf, "sliding_window", None)
