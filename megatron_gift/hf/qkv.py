"""Megatron-Core's fused QKV rows and Hugging Face's separate projections: per KV group, its
query heads, then its key and its value (``[g * (q/g + 2) * d, ...]``)."""

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
             d: int) -> torch.Tensor:
    """Megatron's ``linear_qkv`` rows from HF's ``q_proj`` ``[heads*d, ...]``, ``k_proj`` and
    ``v_proj`` ``[groups*d, ...]`` (weights, biases, or LoRA ``B``)."""
    per_group = heads // groups
    tail = q.shape[1:]
    q, k, v = (x.reshape(groups, -1, d, *tail) for x in (q, k, v))
    assert q.size(1) == per_group, "query heads are not a multiple of the KV groups"
    return torch.cat([q, k, v], 1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, d: int) -> tuple[torch.Tensor, ...]:
    """The inverse of :func:`fuse_qkv`: ``(q, k, v)``."""
    per_group = heads // groups
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, per_group + 2, d, *tail)
    q, k, v = grouped.split([per_group, 1, 1], 1)
    return tuple(x.reshape(-1, *tail) for x in (q, k, v))
