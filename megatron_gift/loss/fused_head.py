"""GIFT loss fused with the output layer: from final hidden states to per-token loss without
ever holding the ``[T, V/tp]`` logits of either model.

Per token (see :mod:`megatron_gift.loss.gift` for the closed form of ``q``)::

    z = h W^T          student logits      h: [T, H]      W: [V/tp, H] (this rank's vocab rows)
    r = h_ref W_ref^T  reference logits    h_ref: [T, H_ref]  W_ref: [V/tp, H_ref]
    loss_t = -sum_v q_v log softmax(z)_v,   dloss_t / dz = softmax(z) - q =: G_t

Design:

- **Chunking.** Tokens go through in chunks of ``chunk_tokens`` rows. Per chunk: one fp32 GEMM
  per model (``[c, H] x [H, V/tp]``), the row maxima (MAX all-reduce of ``[c, 2]``), the
  statistics of :mod:`megatron_gift.loss.columns` (SUM all-reduce of ``[c, 7]``), the loss, and
  the gradient tile ``G`` ``[c, V/tp]``. The largest live buffers are three fp32 ``[c, V/tp]``
  tiles (student, reference, ``exp(z)``; released before the next chunk), never ``[T, V/tp]``;
  the row sums of products are batched GEMMs, which make no fourth.
- **Gradient in the forward (Liger's way).** The loss is the last op of the step, so ``G`` is
  multiplied out while the tile is live: ``grad_hidden[chunk] = G @ W`` and
  ``grad_weight += G^T @ h[chunk]`` (fp32 accumulators). Only those two (and small per-token
  coefficients) are saved; the backward scales them by the upstream gradient.
- **Collectives** (TP > 1; none at TP = 1): forward ``2 * ceil(T / chunk_tokens)`` small
  all-reduces (MAX then SUM per chunk) plus one SUM all-reduce of ``grad_hidden`` ``[T, H]``
  fp32 at the end of the forward (each rank's ``G @ W`` covers only its vocab shard); backward
  none. The caller must therefore hand the final hidden state in *without* Megatron's
  ``copy_to_tensor_model_parallel_region`` (whose backward would all-reduce a second time).
- **Upstream gradient.** ``grad_hidden`` scales row by row, so any per-token upstream gradient
  is exact. ``grad_weight = sum_t g_t G_t^T h_t`` needs ``g_t`` inside the sum: when ``g`` is
  one value over the non-ignored tokens (Megatron's ``loss_sum.backward()``, a scalar times the
  loss mask) the saved sum is scaled; otherwise the backward recomputes the tiles chunk by chunk
  from the saved per-token maxima and coefficients (two GEMMs per chunk, no collective) and
  accumulates ``G^T (g * h)``. Deciding which reads one boolean on the host (a device sync)
  unless the gradient is an expanded scalar (stride 0), as ``sum().backward()`` gives.

Why in-forward (Liger) and not recompute-in-backward (Cut Cross-Entropy) by default: for a
7B-like shard (T = 8192, H = 3584, V/tp = 76032) the saved state is ``grad_hidden`` fp32
``T * H * 4`` = 112 MiB plus ``grad_weight`` fp32 ``V/tp * H * 4`` = 1.02 GiB (the size of an
fp32 main-grad of the output layer, which the optimizer holds anyway). Materialised logits
instead cost 2.32 GiB per fp32 ``[T, V/tp]`` buffer (the eager loss keeps one fp32 gap plus
both models' logits). Recomputing in the backward saves the 1.1 GiB but redoes both logits
GEMMs, ``2 * 2 * T * H * V/tp`` = 8.9 TFLOP, i.e. +50 % of the head's 17.9 TFLOP
(2 logits GEMMs + 2 gradient GEMMs), and needs the reference's hidden states kept alive until
the backward. The head's memory is dominated by the logits, not by these accumulators, so the
compute is the better trade.

Precision: logits are computed from fp32 copies of the chunk and of the weights (an fp32 copy
of a bf16 ``W`` costs ``V/tp * H * 4`` bytes for the call), so the loss matches the float64
oracle to fp32 rounding. Gradients are returned in the inputs' dtypes.
"""

import math
from functools import partial
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx

from megatron_gift.loss.columns import (DOT_EXP_R_Z, DOT_EXP_Z_Z, R_LABEL, STAT_COLUMNS,
                                        SUM_EXP_R, SUM_EXP_Z, SUM_Z, Z_LABEL)
from megatron_gift.loss.gift import (GiftTokenStats, _all_reduce, _check_labels,
                                     _checked_hyperparameters, _default_tp_group, _gibbs_weight)
from megatron_gift.loss.passes import select

TILE_BYTES = 128 * 2**20  # one fp32 [chunk, V/tp] tile when chunk_tokens is not given


def default_chunk_tokens(vocab_shard: int, tokens: Optional[int] = None) -> int:
    """Tokens per chunk: such that one fp32 ``[chunk, vocab_shard]`` tile takes at most
    :data:`TILE_BYTES` (128 MiB: 1048 tokens at V/tp = 32000, 441 at 76032, 261 at 128256, 220
    at 152064), and at most an eighth of the ``tokens`` when given; at least 1. Three tiles
    are live at once on the eager path (student, reference, ``exp(z)``), so the head holds at
    most 3/8 of one fp32 ``[tokens, V/tp]`` buffer, the one Megatron's cross-entropy keeps;
    the GEMMs stay large enough to run at full rate."""
    chunk = TILE_BYTES // (4 * max(1, vocab_shard))
    if tokens is not None:
        chunk = min(chunk, -(-tokens // 8))
    return max(1, chunk)


def fused_gift_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    *,
    beta: float,
    smooth_lambda: float = 0.0,
    vocab_size: Optional[int] = None,
    chunk_tokens: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
    check_labels: bool = True,
    return_stats: bool = False,
    reduce_hidden_grad: bool = True,
    accumulate_into_main_grad: bool = False,
    implementation: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, GiftTokenStats]]:
    """Per-token GIFT loss of the output layer ``hidden @ weight.T`` against a frozen reference.

    Args:
        hidden: the student's final hidden states (after the final norm) ``[..., H]``, any float
            dtype; gets a gradient.
        weight: the student's output weight, this rank's vocab rows ``[V/tp, H]`` (rank ``k``
            owns rows ``[k V/tp, (k+1) V/tp)`` of the padded vocab); gets a gradient. Tied
            embeddings: pass the embedding weight.
        labels: global token ids ``[...]`` (int64), ``ignore_index`` where there is no loss.
        ref_hidden: the reference's final hidden states ``[..., H_ref]``; no gradient. ``None``
            only for ``beta = inf``.
        ref_weight: the reference's output weight ``[V/tp, H_ref]``; no gradient.
        beta: inverse temperature ``>= 0``; ``inf`` is plain cross-entropy.
        smooth_lambda: uniform mass mixed into the reference, in ``[0, 1]``.
        vocab_size: the real vocab size when the vocab is padded; rows ``>= vocab_size`` of the
            padded vocab take no part and get zero gradient. Default ``V/tp * tp``.
        chunk_tokens: tokens per chunk; bounds the fp32 workspace to ~3 ``[chunk, V/tp]`` tiles.
            Default :func:`default_chunk_tokens` (128 MiB a tile).
        group: tensor-parallel group the vocab is sharded over; default Megatron-Core's when
            model parallelism is initialised, else none.
        ignore_index: label of positions with loss 0 and gradient 0.
        check_labels: raise ValueError for a label outside ``[0, vocab_size)`` (reads the labels
            on the host).
        return_stats: also return the per-token diagnostics of
            :func:`megatron_gift.loss.vocab_parallel_gift_loss` (no gradient).
        reduce_hidden_grad: sum the hidden states' gradient over the TP group (each rank's
            ``G @ W`` covers its vocab shard). ``False`` where the caller's own backward reduces
            it: a sequence-parallel input gathered by Megatron's
            ``gather_from_sequence_parallel_region``, whose backward reduce-scatters.
        accumulate_into_main_grad: Megatron-Core's gradient-accumulation fusion: add the
            weight's gradient (fp32) straight into ``weight.main_grad`` (the DDP gradient
            buffer), mark ``weight.grad_added_to_main_grad`` and hand autograd a zero gradient,
            as Megatron's linear layers do. Requires ``weight.main_grad``.
        implementation: the passes over each chunk's tiles, as the loss's
            (:func:`megatron_gift.loss.passes.select`): ``triton`` (the loss's fused kernels,
            CUDA), ``eager`` (PyTorch ops) or ``auto`` (Triton on CUDA where installed).

    Returns:
        The loss ``[...]`` (labels' shape), fp32 (fp64 for fp64 inputs), nats per token,
        identical on every TP rank; with ``return_stats``, ``(loss, GiftTokenStats)``.
    """
    beta, smooth_lambda = _checked_hyperparameters(beta, smooth_lambda)
    if math.isinf(beta):
        ref_hidden = ref_weight = None  # q is one-hot: the reference cannot change the loss
    elif ref_hidden is None or ref_weight is None:
        raise ValueError(f"ref_hidden and ref_weight are required for finite beta={beta} "
                         "(only beta=inf skips them)")
    _check_shapes(hidden, weight, labels, ref_hidden, ref_weight)
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.size(0), labels.numel())
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if accumulate_into_main_grad and getattr(weight, "main_grad", None) is None:
        raise ValueError("accumulate_into_main_grad needs weight.main_grad (the weight of a "
                         "model wrapped by Megatron-Core's DistributedDataParallel)")
    group = _default_tp_group(group)
    tp_size = dist.get_world_size(group) if group is not None else 1
    padded_vocab = weight.size(0) * tp_size
    vocab_size = padded_vocab if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded_vocab}] "
                         f"(the weight's {weight.size(0)} rows x tp {tp_size})")
    if check_labels:
        _check_labels(labels, vocab_size, ignore_index)
    config = _HeadConfig(beta, smooth_lambda, vocab_size, chunk_tokens, group, ignore_index,
                         reduce_hidden_grad, accumulate_into_main_grad, implementation)
    loss, *stats = _FusedGiftHead.apply(hidden, weight, labels, ref_hidden, ref_weight, config)
    return (loss, GiftTokenStats(*stats)) if return_stats else loss


class _HeadConfig(NamedTuple):
    beta: float
    smooth_lambda: float
    vocab_size: int  # the real (unpadded) global vocab
    chunk_tokens: int
    group: Optional[dist.ProcessGroup]
    ignore_index: int
    reduce_hidden_grad: bool = True
    accumulate_into_main_grad: bool = False
    implementation: str = "eager"


def _check_shapes(hidden, weight, labels, ref_hidden, ref_weight):
    if weight.dim() != 2 or hidden.size(-1) != weight.size(1):
        raise ValueError(f"weight {tuple(weight.shape)} must be [V/tp, H] with H = hidden's "
                         f"last dim ({tuple(hidden.shape)})")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden "
                         f"{tuple(hidden.shape)} without the hidden dim")
    if ref_hidden is None:
        return
    if ref_hidden.shape[:-1] != hidden.shape[:-1] or ref_weight.dim() != 2 or (
            ref_weight.size(0) != weight.size(0) or ref_hidden.size(-1) != ref_weight.size(1)):
        raise ValueError(
            f"reference shapes hidden {tuple(ref_hidden.shape)}, weight {tuple(ref_weight.shape)} "
            f"do not fit the student's {tuple(hidden.shape)}, {tuple(weight.shape)}: same "
            "tokens and vocab shard, any hidden size")


class _Shard(NamedTuple):
    """Where this rank's vocab rows sit: padding rows (>= vocab) are a suffix of the shard."""

    start: int  # first global vocab id of the shard
    local: int  # real (non-padding) rows on this rank


def _shard(weight: torch.Tensor, config: _HeadConfig) -> _Shard:
    rank = dist.get_rank(config.group) if config.group is not None else 0
    start = rank * weight.size(0)
    return _Shard(start, min(max(config.vocab_size - start, 0), weight.size(0)))


class _Coefficients(NamedTuple):
    """Per-token ``[rows]`` terms of ``G = softmax(z) - q`` on this shard::

        G = exp(z - max_z) * inv_sum_exp_z - ref_w * exp(r - max_r) - uniform_w
            - onehot_w * onehot(column)           (rows of ignored tokens are 0)
    """

    maxima: torch.Tensor  # [rows, 2]: global max of z and of r
    inv_sum_exp_z: torch.Tensor
    ref_w: Optional[torch.Tensor]
    uniform_w: Optional[torch.Tensor]
    onehot_w: torch.Tensor  # 1 - g where this rank owns the label, else 0
    column: torch.Tensor  # label's local column (0 where not owned)
    valid: torch.Tensor  # label != ignore_index


def _gemm_operand(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as the GEMMs take it: itself where it is in ``dtype``, or where
    :func:`_multiplies_in_low_precision` (no copy); else (CPU) an fp32 copy for the call."""
    if weight.dtype == dtype or _multiplies_in_low_precision(weight, dtype):
        return weight
    return weight.to(dtype)


def _multiplies_in_low_precision(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a bf16/fp16 weight enters the GEMMs as it is: on CUDA, whose ``out_dtype`` GEMMs
    (``aten::mm.dtype``, ``aten::addmm.dtype_out``) accumulate in fp32 and return fp32, as the
    output layer's GEMM accumulates (CPU has no such kernel)."""
    return (weight.is_cuda and dtype == torch.float32 and _MM_OUT_DTYPE is not None
            and weight.dtype in (torch.bfloat16, torch.float16))


_MM_OUT_DTYPE = getattr(torch.ops.aten.mm, "dtype", None)
_ADDMM_OUT_DTYPE = getattr(torch.ops.aten.addmm, "dtype_out", None)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype`` (fp32/fp64); ``b`` in a lower precision (a CUDA operand of
    :func:`_gemm_operand`): ``a`` rounded to it, fp32 accumulation and result."""
    if b.dtype == dtype:
        return torch.matmul(a.to(dtype), b)
    return _MM_OUT_DTYPE(a.to(b.dtype), b, dtype)


def _addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in ``acc``'s dtype (fp32/fp64), as :func:`_mm`, no ``acc``-sized
    temporary."""
    if b.dtype == acc.dtype:
        acc.addmm_(a.to(acc.dtype), b)
    else:
        _ADDMM_OUT_DTYPE(acc, a.to(b.dtype), b, acc.dtype, out=acc)


def _logits(x: torch.Tensor, weight: torch.Tensor, local: int, dtype: torch.dtype
            ) -> torch.Tensor:
    """``x @ weight[:local].T`` ``[rows, local]`` in ``dtype``."""
    return _mm(x, weight[:local].T, dtype)


def _row_max(x: torch.Tensor) -> torch.Tensor:
    if x.size(-1) == 0:
        return torch.full(x.shape[:1], -math.inf, dtype=x.dtype, device=x.device)
    return x.amax(-1)


def _gather(x: torch.Tensor, column: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    if x.size(-1) == 0:
        return torch.zeros(x.shape[:1], dtype=x.dtype, device=x.device)
    return torch.where(owned, x.gather(-1, column.unsqueeze(-1)).squeeze(-1), 0.0)


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x * y).sum(-1)`` ``[rows]`` for ``[rows, V]`` tiles, as a batched GEMM: no
    ``[rows, V]`` product is made."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(x.size(0))


def _statistics(z: torch.Tensor, r: Optional[torch.Tensor], column: torch.Tensor,
                owned: torch.Tensor, smooth: bool) -> torch.Tensor:
    """``[rows, STAT_COLUMNS]`` sums of this shard from max-shifted ``z`` and ``r``; turns ``r``
    into ``exp(r - max_r)`` in place (the tile needs it)."""
    stats = torch.zeros(z.size(0), STAT_COLUMNS, dtype=z.dtype, device=z.device)
    exp_z = torch.exp(z)
    stats[:, SUM_EXP_Z] = exp_z.sum(-1)
    stats[:, DOT_EXP_Z_Z] = _row_dot(exp_z, z)  # the student's entropy
    stats[:, Z_LABEL] = _gather(z, column, owned)
    if r is not None:
        stats[:, R_LABEL] = _gather(r, column, owned)
        exp_r = r.exp_()
        stats[:, SUM_EXP_R] = exp_r.sum(-1)
        stats[:, DOT_EXP_R_Z] = _row_dot(exp_r, z)
        if smooth:
            stats[:, SUM_Z] = z.sum(-1)
    return stats


def _loss_and_coefficients(stats: torch.Tensor, maxima: torch.Tensor, column: torch.Tensor,
                           owned: torch.Tensor, valid: torch.Tensor, has_ref: bool,
                           config: _HeadConfig) -> tuple[torch.Tensor, _Coefficients]:
    """Per-token ``[4, rows]``: the loss, the student's entropy, the target's mass on the label
    ``q(y)`` and the student's ``p(y)`` (0 where ignored), and the tile's coefficients, from the
    all-reduced statistics (the closed form of :mod:`megatron_gift.loss.gift`)."""
    t = stats.unbind(-1)
    log_sum_exp_z = torch.log(t[SUM_EXP_Z])
    nll = log_sum_exp_z - t[Z_LABEL]
    ref_w = uniform_w = None
    target_mass = torch.ones_like(nll)
    if has_ref:
        g, log_p_label, ce_ref = _gibbs_weight(t, log_sum_exp_z, config.beta,
                                               config.smooth_lambda, config.vocab_size)
        loss = nll + g * (ce_ref - nll)
        target_mass = 1 - g * (1 - torch.exp(log_p_label))
        ref_w = g * (1 - config.smooth_lambda) / t[SUM_EXP_R]
        if config.smooth_lambda > 0:
            uniform_w = g * config.smooth_lambda / config.vocab_size
    else:
        g, loss = torch.zeros_like(nll), nll
    coefficients = _Coefficients(maxima, t[SUM_EXP_Z].reciprocal(), ref_w, uniform_w,
                                 torch.where(owned, 1 - g, 0.0), column, valid)
    entropy = log_sum_exp_z - t[DOT_EXP_Z_Z] / t[SUM_EXP_Z]
    per_token = torch.stack([loss, entropy, target_mass, torch.exp(-nll)])
    return torch.where(valid, per_token, 0.0), coefficients


def _gradient_tile(exp_z: torch.Tensor, exp_r: Optional[torch.Tensor], c: _Coefficients,
                   rows: slice) -> torch.Tensor:
    """``G = softmax(z) - q`` ``[rows, V_local]`` written over ``exp_z`` (``exp(z - max_z)``);
    ``exp_r``: ``exp(r - max_r)`` or None; ``c``: coefficients of every token, ``rows`` this
    chunk's."""
    tile = exp_z.mul_(c.inv_sum_exp_z[rows].unsqueeze(-1))
    if exp_r is not None:
        tile.addcmul_(exp_r, c.ref_w[rows].unsqueeze(-1), value=-1)
        if c.uniform_w is not None:
            tile.sub_(c.uniform_w[rows].unsqueeze(-1))
    if tile.size(-1):
        tile.scatter_add_(-1, c.column[rows].unsqueeze(-1), -c.onehot_w[rows].unsqueeze(-1))
    return tile.mul_(c.valid[rows].unsqueeze(-1))


def _chunks(rows: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, rows)) for i in range(0, rows, size)]


class _Chunk(NamedTuple):
    """Per token ``[rows]`` of one chunk: the label's local column, whether this rank owns
    it, whether the token has a loss."""

    column: torch.Tensor
    owned: torch.Tensor
    valid: torch.Tensor


def _tile_kernels(implementation: str, dtype: torch.dtype, device: torch.device):
    """The Triton passes of :mod:`megatron_gift.loss.passes` for the tiles, or None for this
    module's own eager ops (``auto``: Triton on CUDA where installed)."""
    passes = select(implementation, torch.empty(0, dtype=dtype, device=device))
    return None if passes.name == "eager" else passes


def _eager_chunk(z: torch.Tensor, r: Optional[torch.Tensor], chunk: _Chunk,
                 config: _HeadConfig, want_tile: bool):
    """``(loss and diagnostics [4, rows], coefficients, G [rows, V_local] or None)`` of one
    chunk from its fp32 logits ``z`` and ``r`` (overwritten), in PyTorch ops."""
    maxima = torch.stack([_row_max(z), _row_max(r) if r is not None else torch.full(
        z.shape[:1], -math.inf, dtype=z.dtype, device=z.device)], -1)
    maxima = _all_reduce(maxima, dist.ReduceOp.MAX, config.group)
    z.sub_(maxima[:, :1])
    if r is not None:
        r.sub_(maxima[:, 1:])
    stats = _statistics(z, r, chunk.column, chunk.owned, config.smooth_lambda > 0)
    stats = _all_reduce(stats, dist.ReduceOp.SUM, config.group)
    loss, c = _loss_and_coefficients(stats, maxima, chunk.column, chunk.owned, chunk.valid,
                                     r is not None, config)
    return loss, c, _gradient_tile(z.exp_(), r, c, slice(None)) if want_tile else None


def _kernel_chunk(kernels, z: torch.Tensor, r: Optional[torch.Tensor], chunk: _Chunk,
                  config: _HeadConfig, want_tile: bool):
    """:func:`_eager_chunk` with the loss's fused kernels (:mod:`.triton_kernels`), each
    reading the tiles once: maxima, statistics, ``softmax(z) - g p'``, the label term."""
    maxima = _all_reduce(kernels.maxima(z, r, torch.float32), dist.ReduceOp.MAX, config.group)
    stats, _ = kernels.statistics(z, r, maxima, chunk.column, chunk.owned, with_stats=True,
                                  smooth=config.smooth_lambda > 0)
    stats = _all_reduce(stats, dist.ReduceOp.SUM, config.group)
    loss, c = _loss_and_coefficients(stats, maxima, chunk.column, chunk.owned, chunk.valid,
                                     r is not None, config)
    if not want_tile:
        return loss, c, None
    gap = kernels.soft_target_gap(z, r, maxima, c.inv_sum_exp_z, c.ref_w, c.uniform_w)
    tile = kernels.logits_grad(gap, chunk.valid.to(gap.dtype), chunk.column, -c.onehot_w,
                               z.size(1), gap.dtype)
    return loss, c, tile


class _FusedGiftHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
                labels: torch.Tensor, ref_hidden: Optional[torch.Tensor],
                ref_weight: Optional[torch.Tensor], config: _HeadConfig) -> torch.Tensor:
        """The loss ``[...]``; computes and saves the unscaled gradients of ``hidden``
        (``[T, H]`` fp32, all-reduced over TP) and ``weight`` (``[V/tp, H]`` fp32)."""
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        shard = _shard(weight, config)
        h = hidden.reshape(-1, hidden.size(-1))
        h_ref = ref_hidden.reshape(-1, ref_hidden.size(-1)) if ref_hidden is not None else None
        w = _gemm_operand(weight, dtype)
        w_ref = _gemm_operand(ref_weight, dtype) if ref_weight is not None else None
        y = labels.reshape(-1)
        valid = y != config.ignore_index
        owned = valid & (y >= shard.start) & (y < shard.start + shard.local)
        column = torch.where(owned, y - shard.start, 0)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        loss = torch.empty(4, h.size(0), dtype=dtype, device=h.device)  # loss and diagnostics
        coefficient_parts = []
        grad_hidden = torch.zeros_like(h, dtype=dtype) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=dtype) if want_weight else None
        kernels = _tile_kernels(config.implementation, dtype, h.device)
        for rows in _chunks(h.size(0), config.chunk_tokens):
            z = _logits(h[rows], w, shard.local, dtype)
            r = _logits(h_ref[rows], w_ref, shard.local, dtype) if h_ref is not None else None
            chunk = _Chunk(column[rows], owned[rows], valid[rows])
            loss[:, rows], c, tile = (_eager_chunk if kernels is None else partial(
                _kernel_chunk, kernels))(z, r, chunk, config, want_hidden or want_weight)
            coefficient_parts.append(c)
            if want_hidden:
                grad_hidden[rows] = _mm(tile, w[:shard.local], dtype)
            if want_weight:
                _addmm_(grad_weight[:shard.local], tile.T, h[rows].to(w.dtype))
            del z, r, tile  # before the next chunk's logits: its tiles take their place
        if want_hidden and config.reduce_hidden_grad:
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, config.group)

        c = _concat(coefficient_parts, h.size(0), dtype, h.device)
        ctx.save_for_backward(grad_hidden, grad_weight, hidden, weight, ref_hidden, ref_weight,
                              *_flatten(c))
        ctx.config, ctx.has_uniform = config, c.uniform_w is not None
        outputs = tuple(x.view(labels.shape) for x in loss)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx: FunctionCtx, grad_loss: torch.Tensor,
                 *_: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        """``grad_hidden * g[:, None]`` and ``sum_t g_t G_t^T h_t`` for the upstream ``g``
        (labels' shape); the weight's by scaling the saved sum when ``g`` is one value over the
        non-ignored tokens, else by recomputing the tiles."""
        (grad_hidden, grad_weight, hidden, weight, ref_hidden, ref_weight,
         *flat) = ctx.saved_tensors
        c = _unflatten(flat, ctx.has_uniform)
        g = grad_loss.reshape(-1)
        out_hidden = out_weight = None
        if grad_hidden is not None:
            scale = torch.where(c.valid, g.to(grad_hidden.dtype), 0.0)
            out_hidden = (grad_hidden * scale.unsqueeze(-1)).to(hidden.dtype).view(hidden.shape)
        if grad_weight is not None:
            uniform = _uniform_value(grad_loss, c.valid)
            if uniform is not None:
                grad_weight.mul_(uniform.to(grad_weight.dtype))
            else:
                grad_weight = _recomputed_weight_grad(hidden, weight, ref_hidden, ref_weight, c,
                                                      g, ctx.config)
            if ctx.config.accumulate_into_main_grad:
                out_weight = _add_to_main_grad(weight, grad_weight)
            else:
                out_weight = grad_weight.to(weight.dtype)
        return out_hidden, out_weight, None, None, None, None


def _add_to_main_grad(weight: torch.Tensor, grad_weight: torch.Tensor) -> torch.Tensor:
    """Megatron-Core's gradient-accumulation fusion (tensor_parallel/layers.py,
    ``LinearWithGradAccumulationAndAsyncCommunication.backward``): the gradient goes into the
    fp32 ``main_grad`` at full precision, the weight is marked ``grad_added_to_main_grad`` so
    that DDP's hook adds nothing more, and autograd gets a zero gradient (Megatron's dummy, which
    keeps DDP's hook on the main thread under ``overlap_grad_reduce``)."""
    weight.main_grad.add_(grad_weight.to(weight.main_grad.dtype))
    if hasattr(weight, "grad_added_to_main_grad"):
        weight.grad_added_to_main_grad = True
    return torch.zeros_like(weight)


def _uniform_value(grad_loss: torch.Tensor, valid: torch.Tensor) -> Optional[torch.Tensor]:
    """The upstream gradient's one value over the non-ignored tokens (a 0-dim tensor), or None
    when it varies. An expanded scalar (``loss.sum().backward()``) is recognised without reading
    anything on the host."""
    if grad_loss.numel() == 0:
        return grad_loss.new_zeros(())
    if all(s == 0 for s in grad_loss.stride()):
        return grad_loss.reshape(-1)[0]
    values = grad_loss.reshape(-1)[valid]
    if values.numel() == 0:
        return grad_loss.new_zeros(())
    return values[0] if bool((values == values[0]).all()) else None


def _recomputed_weight_grad(hidden, weight, ref_hidden, ref_weight, c: _Coefficients,
                            g: torch.Tensor, config: _HeadConfig) -> torch.Tensor:
    """``sum_t g_t G_t^T h_t`` ``[V/tp, H]``: each chunk's tiles rebuilt from the saved maxima and
    coefficients (two GEMMs, no collective), then one GEMM into the accumulator."""
    dtype = c.inv_sum_exp_z.dtype
    shard = _shard(weight, config)
    h = hidden.reshape(-1, hidden.size(-1))
    h_ref = ref_hidden.reshape(-1, ref_hidden.size(-1)) if ref_hidden is not None else None
    w = _gemm_operand(weight, dtype)
    w_ref = _gemm_operand(ref_weight, dtype) if ref_weight is not None else None
    grad_weight = torch.zeros_like(weight, dtype=dtype)
    for rows in _chunks(h.size(0), config.chunk_tokens):
        exp_z = _logits(h[rows], w, shard.local, dtype).sub_(c.maxima[rows, :1]).exp_()
        exp_r = None
        if h_ref is not None:
            exp_r = _logits(h_ref[rows], w_ref, shard.local, dtype).sub_(c.maxima[rows, 1:]).exp_()
        tile = _gradient_tile(exp_z, exp_r, c, rows)
        scaled = h[rows].to(dtype) * g[rows].to(dtype).unsqueeze(-1)
        _addmm_(grad_weight[:shard.local], tile.T, scaled.to(w.dtype))
    return grad_weight


def _concat(parts: list[_Coefficients], rows: int, dtype: torch.dtype,
            device: torch.device) -> _Coefficients:
    if not parts:
        empty = torch.zeros(rows, dtype=dtype, device=device)
        return _Coefficients(torch.zeros(rows, 2, dtype=dtype, device=device), empty, None, None,
                             empty, torch.zeros(rows, dtype=torch.long, device=device),
                             torch.zeros(rows, dtype=torch.bool, device=device))
    return _Coefficients(*(None if parts[0][i] is None else torch.cat([p[i] for p in parts])
                           for i in range(len(_Coefficients._fields))))


def _flatten(c: _Coefficients) -> tuple[Optional[torch.Tensor], ...]:
    return tuple(c)


def _unflatten(flat: list[Optional[torch.Tensor]], has_uniform: bool) -> _Coefficients:
    c = _Coefficients(*flat)
    return c if has_uniform else c._replace(uniform_w=None)


@torch.no_grad()
def fused_next_token_metrics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    chunk_tokens: Optional[int] = None,
    group: Optional[dist.ProcessGroup] = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's next-token cross-entropy and whether its argmax is the label, from the
    head's inputs (no gradient, no ``[T, V/tp]`` logits beyond a chunk).

    Args: as :func:`fused_gift_head_loss` (``hidden`` ``[..., H]``, ``weight`` ``[V/tp, H]``,
    ``labels`` ``[...]``). Returns ``(ce, correct)``, each labels' shape: cross-entropy in nats
    (fp32, 0 where ignored) and a bool that the global argmax over the real vocab (lowest id on
    ties, as :func:`megatron_gift.loss.objectives.vocab_parallel_argmax`) is the label (False
    where ignored). Collectives at TP > 1: three small all-reduces a chunk.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    group = _default_tp_group(group)
    tp_size = dist.get_world_size(group) if group is not None else 1
    vocab_size = weight.size(0) * tp_size if vocab_size is None else vocab_size
    config = _HeadConfig(math.inf, 0.0, vocab_size, chunk_tokens or default_chunk_tokens(
        weight.size(0), labels.numel()), group, ignore_index)
    shard = _shard(weight, config)
    h, y = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
    w = _gemm_operand(weight, dtype)
    valid = y != ignore_index
    owned = valid & (y >= shard.start) & (y < shard.start + shard.local)
    column = torch.where(owned, y - shard.start, 0)
    ce = torch.zeros(h.size(0), dtype=dtype, device=h.device)
    argmax = torch.zeros(h.size(0), dtype=torch.long, device=h.device)
    for rows in _chunks(h.size(0), config.chunk_tokens):
        z = _logits(h[rows], w, shard.local, dtype)
        local_max = _row_max(z)
        local_arg = (z.argmax(-1) if z.size(-1) else torch.zeros_like(local_max, dtype=torch.long))
        maxima = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
        candidate = torch.where(local_max == maxima, local_arg + shard.start,
                                torch.iinfo(torch.long).max)
        argmax[rows] = _all_reduce(candidate, dist.ReduceOp.MIN, group)
        z.sub_(maxima.unsqueeze(-1))
        sums = torch.stack([torch.exp(z).sum(-1), _gather(z, column[rows], owned[rows])], -1)
        sums = _all_reduce(sums, dist.ReduceOp.SUM, group)
        ce[rows] = torch.log(sums[:, 0]) - sums[:, 1]
    ce = torch.where(valid, ce, 0.0)
    return ce.view(labels.shape), ((argmax == y) & valid).view(labels.shape)
