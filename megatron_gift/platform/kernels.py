"""Which of Megatron-Core's fused kernels this machine has: each fusion is on exactly where its
kernel is installed and CUDA runs it, off elsewhere (a CPU, a GPU image without Transformer
Engine or Apex).

=============================  ====================================================  ===========
``TransformerConfig`` field    kernel it needs                                       from
=============================  ====================================================  ===========
gradient_accumulation_fusion   ``fused_weight_gradient_mlp_cuda`` (the output layer  Apex
                               and every local linear layer call it)
apply_rope_fusion              ``fused_apply_rotary_pos_emb`` (models/common/         TE >= 1.4
                               embeddings/rope_utils.py)
masked_softmax_fusion          ``scaled_masked_softmax_cuda`` and                    Megatron's
                               ``scaled_upper_triang_masked_softmax_cuda``            fused kernels
persist_layer_norm             ``apex.contrib.layer_norm`` (LayerNorm only)          Apex
bias_dropout_fusion            ``jit_fuser`` (torch.compile): CUDA alone             torch
=============================  ====================================================  ===========
"""

import importlib.util
from typing import Optional

import torch

FUSIONS = ("gradient_accumulation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
           "persist_layer_norm", "bias_dropout_fusion")


def fusions(cuda: Optional[bool] = None) -> dict[str, bool]:
    """``{TransformerConfig field: on}`` for the fusions in :data:`FUSIONS`; ``cuda``: whether
    kernels can run (default ``torch.cuda.is_available()``)."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return dict.fromkeys(FUSIONS, False)
    return {
        "gradient_accumulation_fusion": installed("fused_weight_gradient_mlp_cuda"),
        "apply_rope_fusion": _te_fused_rope(),
        "masked_softmax_fusion": (installed("scaled_masked_softmax_cuda")
                                  and installed("scaled_upper_triang_masked_softmax_cuda")),
        "persist_layer_norm": installed("apex.contrib.layer_norm"),
        "bias_dropout_fusion": True,
    }


def describe(on: dict[str, bool]) -> str:
    """``"fusions on: a, b"`` or ``"no fused kernels"`` for a :func:`fusions` result."""
    names = [name.removesuffix("_fusion") for name, value in on.items() if value]
    return f"fusions on: {', '.join(names)}" if names else "no fused kernels"


def installed(module: str) -> bool:
    """Whether ``module`` can be found (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing
        return False


def _te_fused_rope() -> bool:
    from megatron_gift.platform import te

    if not te.available():
        return False
    from megatron.core.models.common.embeddings import rope_utils

    return rope_utils.fused_apply_rotary_pos_emb is not None
