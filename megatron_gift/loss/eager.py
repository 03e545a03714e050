"""The GIFT loss's passes over the logits in plain PyTorch: row chunks through fp32 workspaces.

Runs on every device and dtype (fp64 included); the reference implementation of
:mod:`megatron_gift.loss.passes`, which the fused kernels match.
"""

import math
from typing import Optional

import torch

from megatron_gift.loss.columns import (DOT_EXP_R_Z, DOT_EXP_Z_Z, R_LABEL, STAT_COLUMNS,
                                        SUM_EXP_R, SUM_EXP_Z, SUM_Z, Z_LABEL)


class EagerPasses:
    """The four passes (see :mod:`megatron_gift.loss.passes`) as chunked PyTorch ops.

    ``statistics`` leaves ``exp(z - max)`` in the fp32 buffer that ``soft_target_gap`` turns
    into the saved ``softmax(z) - g * p'``, so the student's exponentials are computed once.
    """

    name = "eager"

    def maxima(self, z: torch.Tensor, r: Optional[torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
        """``[rows, 2]``: the row maxima of ``z`` and ``r`` (``-inf`` for a missing ``r`` or an
        empty shard)."""
        columns = [_row_max(z, dtype), _row_max(r, dtype) if r is not None
                   else torch.full(z.shape[:1], -math.inf, dtype=dtype, device=z.device)]
        return torch.stack(columns, -1)

    def statistics(self, z_all: torch.Tensor, r_all: Optional[torch.Tensor],
                   maxima: torch.Tensor, column: torch.Tensor, owned: torch.Tensor, *,
                   with_stats: bool, smooth: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``([rows, STAT_COLUMNS], exp_z)``: the per-row sums (columns not asked for are 0) and
        ``exp(z - max_z)`` ``[rows, V_local]`` in the sums' dtype."""
        dtype = maxima.dtype
        stats = torch.zeros(z_all.size(0), STAT_COLUMNS, dtype=dtype, device=z_all.device)
        exp_z_all = torch.empty(z_all.shape, dtype=dtype, device=z_all.device)
        workspace = _Workspace(z_all, dtype, count=2)
        for rows in workspace.chunks:
            out = stats[rows]
            z = workspace.shifted(0, z_all[rows], maxima[rows, :1])
            exp_z = torch.exp(z, out=exp_z_all[rows])
            out[:, SUM_EXP_Z] = exp_z.sum(-1)
            out[:, Z_LABEL] = _gather(z, column[rows], owned[rows])
            if r_all is not None:
                r = workspace.shifted(1, r_all[rows], maxima[rows, 1:])
                out[:, R_LABEL] = _gather(r, column[rows], owned[rows])
                exp_r = r.exp_()
                out[:, SUM_EXP_R] = exp_r.sum(-1)
                out[:, DOT_EXP_R_Z] = exp_r.mul_(z).sum(-1)
                if smooth:
                    out[:, SUM_Z] = z.sum(-1)
            if with_stats:
                out[:, DOT_EXP_Z_Z] = z.mul_(exp_z).sum(-1)
        return stats, exp_z_all

    def soft_target_gap(self, exp_z: torch.Tensor, r_all: Optional[torch.Tensor],
                        maxima: torch.Tensor, inv_sum_exp_z: torch.Tensor,
                        ref_weight: Optional[torch.Tensor],
                        uniform_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """``softmax(z) - ref_weight * exp(r - max_r) - uniform_weight`` ``[rows, V_local]``,
        written over ``exp_z`` (the buffer :meth:`statistics` returned); the weights are
        ``[rows]``, ``None`` for a missing term."""
        workspace = _Workspace(exp_z, exp_z.dtype, count=1 if r_all is not None else 0)
        for rows in workspace.chunks:
            p = exp_z[rows].mul_(inv_sum_exp_z[rows].unsqueeze(-1))
            if r_all is not None:
                exp_r = workspace.shifted(0, r_all[rows], maxima[rows, 1:]).exp_()
                p.addcmul_(exp_r, ref_weight[rows].unsqueeze(-1), value=-1)
                if uniform_weight is not None:
                    p.sub_(uniform_weight[rows].unsqueeze(-1))
        return exp_z

    def logits_grad(self, gap: torch.Tensor, scale: torch.Tensor, column: torch.Tensor,
                    label_term: torch.Tensor, shard: int, dtype: torch.dtype) -> torch.Tensor:
        """``[rows, shard]`` in ``dtype``: ``gap * scale`` plus ``label_term`` at each row's label
        column; padding columns ``>= V_local`` are 0. ``scale``, ``column``, ``label_term``:
        ``[rows]``."""
        rows, local_vocab = gap.shape
        allocate = torch.empty if local_vocab == shard else torch.zeros
        full_grad = allocate(rows, shard, dtype=dtype, device=gap.device)
        grad = full_grad[:, :local_vocab]
        workspace = _Workspace(gap, gap.dtype, count=0 if dtype == gap.dtype else 1)
        for chunk in workspace.chunks:
            out = workspace.get(0, chunk) if workspace.count else grad[chunk]
            torch.mul(gap[chunk], scale[chunk].unsqueeze(-1), out=out)
            if local_vocab:
                out.scatter_add_(-1, column[chunk].unsqueeze(-1), label_term[chunk].unsqueeze(-1))
            if workspace.count:
                grad[chunk].copy_(out)
        return full_grad


class _Workspace:
    """Reusable fp32 buffers for row chunks of a ``[N, V]`` tensor.

    Full-size temporaries would cost a fresh allocation (and, on CPU, page faults) per call;
    chunk-sized ones, allocated once per pass, stay in cache. Chunks are ~16 MiB of fp32 on
    CPU and larger on accelerators, where they bound peak memory at few kernel launches.
    """

    def __init__(self, x, dtype, count):
        elements = 1 << 22 if x.device.type == "cpu" else 1 << 26
        step = min(x.size(0), max(1, elements // max(1, x.size(-1))))
        self.chunks = [slice(i, min(i + step, x.size(0))) for i in range(0, x.size(0), step)]
        self.count = count
        self.buffers = torch.empty(count, step, x.size(-1), dtype=dtype, device=x.device)

    def get(self, index: int, rows: slice) -> torch.Tensor:
        return self.buffers[index, : rows.stop - rows.start]

    def shifted(self, index: int, x: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
        """``x - maximum`` in the workspace's dtype, never writing into ``x``."""
        return self.get(index, slice(0, x.size(0))).copy_(x).sub_(maximum)


def _row_max(x, dtype):
    """Per-row max ``[rows]`` in ``dtype``; -inf for a rank whose shard is all padding."""
    if x.size(-1) == 0:
        return torch.full(x.shape[:1], -math.inf, dtype=dtype, device=x.device)
    return x.amax(-1).to(dtype)


def _gather(x, column, owned):
    """x at the label column where this rank owns the label, else 0; shape ``[rows]``."""
    if x.size(-1) == 0:
        return torch.zeros(x.shape[:1], dtype=x.dtype, device=x.device)
    return torch.where(owned, x.gather(-1, column.unsqueeze(-1)).squeeze(-1), 0.0)
