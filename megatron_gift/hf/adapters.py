"""A LoRA GIFT run's adapters as a PEFT adapter that the ``peft`` library loads onto the
Hugging Face base model (``PeftModel.from_pretrained(base, DIR)``).

Megatron's fused linears carry one adapter each; PEFT's Llama-style modules are separate. Both
compute ``delta W = (alpha / r) B A``, so a fused adapter splits exactly: the query, key and
value projections share ``A`` and take their rows of ``B`` (Megatron's per-group QKV order, as
the weights are split), the gate and up projections share ``A`` and take the two halves of
``B``::

    linear_qkv  A [r, h], B [g*(q/g+2)*d, r]  ->  q_proj, k_proj, v_proj
    linear_proj A [r, q*d], B [h, r]          ->  o_proj
    linear_fc1  A [r, h], B [2f, r]           ->  gate_proj, up_proj
    linear_fc2  A [r, f], B [h, r]            ->  down_proj

``adapter_config.json`` is written by ``peft.LoraConfig``; ``adapter_model.safetensors`` holds
``base_model.model.model.layers.<i>.<module>.<proj>.lora_{A,B}.weight`` (PEFT's saved names).
"""

import os
from typing import Optional

import torch
from omegaconf import DictConfig

from megatron_gift.hf.qkv import split_qkv

PEFT_MODULES = {"linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
                "linear_proj": ("self_attn", ("o_proj",)),
                "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
                "linear_fc2": ("mlp", ("down_proj",))}
_MEGATRON_MODULE = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
                    "linear_fc1": "mlp", "linear_fc2": "mlp"}


def peft_tensors(state: dict[str, torch.Tensor], model: DictConfig,
                 targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors from a one-rank (TP = 1) Megatron state dict with adapters."""
    heads, groups = model.num_attention_heads, model.num_query_groups
    d = model.kv_channels or model.hidden_size // heads
    out = {}
    for i in range(model.num_layers):
        for linear in targets:
            src = f"decoder.layers.{i}.{_MEGATRON_MODULE[linear]}.{linear}."
            a, b = state[src + "lora_a"], state[src + "lora_b"]
            if linear == "linear_qkv":
                parts = split_qkv(b, heads, groups, d)
            elif linear == "linear_fc1":
                parts = b.chunk(2)
            else:
                parts = (b,)
            module, projections = PEFT_MODULES[linear]
            for projection, part in zip(projections, parts):
                name = f"base_model.model.model.layers.{i}.{module}.{projection}"
                out[f"{name}.lora_A.weight"] = a.contiguous().clone()
                out[f"{name}.lora_B.weight"] = part.contiguous().clone()
    return out


def write_peft_adapter(out_dir: str, state: dict[str, torch.Tensor], config: DictConfig,
                       targets: tuple[str, ...], base: Optional[str]) -> str:
    """``adapter_config.json`` and ``adapter_model.safetensors`` in ``out_dir``; ``base``: the
    HF base model's name or path the adapter goes onto (recorded, may be None)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    modules = [p for linear in targets for p in PEFT_MODULES[linear][1]]
    LoraConfig(r=config.lora.rank, lora_alpha=config.lora.alpha,
               lora_dropout=config.lora.dropout, target_modules=modules, bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=base).save_pretrained(out_dir)
    save_file(peft_tensors(state, config.model, targets),
              os.path.join(out_dir, "adapter_model.safetensors"))
    return out_dir
