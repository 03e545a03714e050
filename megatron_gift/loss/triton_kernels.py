"""The GIFT loss's passes as fused Triton kernels: one program per row, one read of the logits
per pass, fp32 accumulation.

Per element of the ``[rows, V_local]`` shard the forward reads the student and reference
logits three times (maxima, statistics, gap) and writes the fp32 gap once; the backward reads
the gap and writes the gradient: 22 bytes per element for bf16 logits, where the eager passes
move several times that through their fp32 temporaries. Numerics follow
:class:`megatron_gift.loss.eager.EagerPasses` step for step (shift by the row max in fp32, then
exponentiate), so the two agree to fp32 rounding.

``TRITON_INTERPRET=1`` (set before this module is imported) runs the same kernels on CPU
tensors, which is how the CPU tests check them.
"""

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_gift.loss.columns import (DOT_EXP_R_Z, DOT_EXP_Z_Z, R_LABEL, STAT_COLUMNS,
                                        SUM_EXP_R, SUM_EXP_Z, SUM_Z, Z_LABEL)

_MAX_BLOCK = 4096


@triton.jit
def _maxima_kernel(z_ptr, r_ptr, out_ptr, n_cols, z_stride, r_stride,
                   HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_max = tl.full([BLOCK], -float("inf"), tl.float32)
    r_max = tl.full([BLOCK], -float("inf"), tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(z_ptr + row * z_stride + cols, mask=mask, other=-float("inf"))
        z_max = tl.maximum(z_max, z.to(tl.float32))
        if HAS_REF:
            r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=-float("inf"))
            r_max = tl.maximum(r_max, r.to(tl.float32))
    tl.store(out_ptr + row * 2, tl.max(z_max, 0))
    tl.store(out_ptr + row * 2 + 1, tl.max(r_max, 0))


@triton.jit
def _statistics_kernel(z_ptr, r_ptr, maxima_ptr, label_ptr, out_ptr, n_cols, z_stride, r_stride,
                       HAS_REF: tl.constexpr, WITH_STATS: tl.constexpr, SMOOTH: tl.constexpr,
                       BLOCK: tl.constexpr, SUM_EXP_Z: tl.constexpr, Z_LABEL: tl.constexpr,
                       DOT_EXP_Z_Z: tl.constexpr, R_LABEL: tl.constexpr,
                       SUM_EXP_R: tl.constexpr, DOT_EXP_R_Z: tl.constexpr, SUM_Z: tl.constexpr,
                       COLUMNS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    r_row = r_ptr + row * r_stride
    z_max = tl.load(maxima_ptr + row * 2)
    sum_exp_z = tl.zeros([BLOCK], tl.float32)
    dot_exp_z_z = tl.zeros([BLOCK], tl.float32)
    sum_exp_r = tl.zeros([BLOCK], tl.float32)
    dot_exp_r_z = tl.zeros([BLOCK], tl.float32)
    sum_z = tl.zeros([BLOCK], tl.float32)
    if HAS_REF:
        r_max = tl.load(maxima_ptr + row * 2 + 1)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.where(mask, tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) - z_max, 0.0)
        exp_z = tl.where(mask, tl.exp(z), 0.0)
        sum_exp_z += exp_z
        if WITH_STATS:
            dot_exp_z_z += exp_z * z
        if HAS_REF:
            r = tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32) - r_max
            exp_r = tl.where(mask, tl.exp(r), 0.0)
            sum_exp_r += exp_r
            dot_exp_r_z += exp_r * z
            if SMOOTH:
                sum_z += z
    label = tl.load(label_ptr + row)
    owned = label >= 0
    column = tl.where(owned, label, 0)
    out = out_ptr + row * COLUMNS
    z_label = tl.load(z_row + column, mask=owned, other=0.0).to(tl.float32) - z_max
    tl.store(out + SUM_EXP_Z, tl.sum(sum_exp_z, 0))
    tl.store(out + Z_LABEL, tl.where(owned, z_label, 0.0))
    tl.store(out + DOT_EXP_Z_Z, tl.sum(dot_exp_z_z, 0))
    if HAS_REF:
        r_label = tl.load(r_row + column, mask=owned, other=0.0).to(tl.float32) - r_max
        tl.store(out + R_LABEL, tl.where(owned, r_label, 0.0))
    else:
        tl.store(out + R_LABEL, 0.0)
    tl.store(out + SUM_EXP_R, tl.sum(sum_exp_r, 0))
    tl.store(out + DOT_EXP_R_Z, tl.sum(dot_exp_r_z, 0))
    tl.store(out + SUM_Z, tl.sum(sum_z, 0))


@triton.jit
def _soft_target_gap_kernel(z_ptr, r_ptr, maxima_ptr, inv_sum_exp_z_ptr, ref_weight_ptr,
                            uniform_weight_ptr, out_ptr, n_cols, z_stride, r_stride,
                            HAS_REF: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_max = tl.load(maxima_ptr + row * 2)
    inv_sum_exp_z = tl.load(inv_sum_exp_z_ptr + row)
    if HAS_REF:
        r_max = tl.load(maxima_ptr + row * 2 + 1)
        ref_weight = tl.load(ref_weight_ptr + row)
    if SMOOTH:
        uniform_weight = tl.load(uniform_weight_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(z_ptr + row * z_stride + cols, mask=mask, other=0.0).to(tl.float32)
        gap = tl.exp(z - z_max) * inv_sum_exp_z
        if HAS_REF:
            r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0).to(tl.float32)
            gap -= tl.exp(r - r_max) * ref_weight
            if SMOOTH:
                gap -= uniform_weight
        tl.store(out_ptr + row * n_cols + cols, gap, mask=mask)


@triton.jit
def _logits_grad_kernel(gap_ptr, scale_ptr, label_ptr, label_term_ptr, grad_ptr, n_cols, shard,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row)
    label = tl.load(label_ptr + row)
    label_term = tl.load(label_term_ptr + row)
    for start in range(0, shard, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        gap = tl.load(gap_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
        grad = gap * scale + tl.where(cols == label, label_term, 0.0)
        tl.store(grad_ptr + row * shard + cols, grad.to(grad_ptr.dtype.element_ty),
                 mask=cols < shard)


class TritonPasses:
    """The passes of :mod:`megatron_gift.loss.passes` as the kernels above (fp32 sums)."""

    name = "triton"

    def maxima(self, z: torch.Tensor, r: Optional[torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
        """``[rows, 2]`` fp32: row maxima of ``z`` and ``r`` (``-inf`` for a missing ``r``)."""
        z, r = _unit_stride(z), _unit_stride(r)
        out = torch.empty(z.size(0), 2, dtype=torch.float32, device=z.device)
        with _launch(z) as grid:
            if grid:
                _maxima_kernel[grid](z, _or(r, z), out, z.size(1), z.stride(0),
                                     _or(r, z).stride(0), HAS_REF=r is not None,
                                     **_block(z.size(1)))
        return out

    def statistics(self, z: torch.Tensor, r: Optional[torch.Tensor], maxima: torch.Tensor,
                   column: torch.Tensor, owned: torch.Tensor, *, with_stats: bool,
                   smooth: bool) -> tuple[torch.Tensor, None]:
        """``([rows, STAT_COLUMNS] fp32, None)``: the shifted per-row sums."""
        z, r = _unit_stride(z), _unit_stride(r)
        out = torch.empty(z.size(0), STAT_COLUMNS, dtype=torch.float32, device=z.device)
        label = torch.where(owned, column, -1)
        with _launch(z) as grid:
            if grid:
                _statistics_kernel[grid](
                    z, _or(r, z), maxima, label, out, z.size(1), z.stride(0),
                    _or(r, z).stride(0), HAS_REF=r is not None, WITH_STATS=with_stats,
                    SMOOTH=smooth, SUM_EXP_Z=SUM_EXP_Z, Z_LABEL=Z_LABEL, DOT_EXP_Z_Z=DOT_EXP_Z_Z,
                    R_LABEL=R_LABEL, SUM_EXP_R=SUM_EXP_R, DOT_EXP_R_Z=DOT_EXP_R_Z, SUM_Z=SUM_Z,
                    COLUMNS=STAT_COLUMNS, **_block(z.size(1)))
        return out, None

    def soft_target_gap(self, z: torch.Tensor, r: Optional[torch.Tensor], maxima: torch.Tensor,
                        inv_sum_exp_z: torch.Tensor, ref_weight: Optional[torch.Tensor],
                        uniform_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """``[rows, V_local]`` fp32: ``softmax(z) - ref_weight * exp(r - max_r) -
        uniform_weight``. ``z`` here is the logits shard itself (nothing was kept)."""
        z, r = _unit_stride(z), _unit_stride(r)
        out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        with _launch(z) as grid:
            if grid:
                _soft_target_gap_kernel[grid](
                    z, _or(r, z), maxima, inv_sum_exp_z.contiguous(),
                    _or(ref_weight, inv_sum_exp_z).contiguous(),
                    _or(uniform_weight, inv_sum_exp_z).contiguous(), out, z.size(1), z.stride(0),
                    _or(r, z).stride(0), HAS_REF=r is not None, SMOOTH=uniform_weight is not None,
                    **_block(z.size(1)))
        return out

    def logits_grad(self, gap: torch.Tensor, scale: torch.Tensor, column: torch.Tensor,
                    label_term: torch.Tensor, shard: int, dtype: torch.dtype) -> torch.Tensor:
        """``[rows, shard]`` in ``dtype``: ``gap * scale`` plus ``label_term`` at the label
        column (``label_term`` is 0 where the rank does not own the label); padding 0."""
        grad = torch.empty(gap.size(0), shard, dtype=dtype, device=gap.device)
        label = torch.where(label_term != 0, column, -1)
        with _launch(gap) as grid:
            if grid:
                _logits_grad_kernel[grid](gap, scale.contiguous(), label,
                                          label_term.contiguous(), grad, gap.size(1), shard,
                                          **_block(shard))
        return grad


def _unit_stride(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``x`` with its columns adjacent in memory (rows may be strided), as the kernels read."""
    return x.contiguous() if x is not None and x.size(1) > 1 and x.stride(1) != 1 else x


def _or(x, default):
    return x if x is not None else default


def _block(n_cols: int) -> dict:
    block = min(_MAX_BLOCK, max(16, triton.next_power_of_2(max(n_cols, 1))))
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


@contextlib.contextmanager
def _launch(x: torch.Tensor):
    """The grid ``(rows,)`` (``None`` for no rows), with ``x``'s GPU current while kernels
    launch."""
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        yield (x.size(0),) if x.size(0) else None

