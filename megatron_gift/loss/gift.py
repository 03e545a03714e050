"""Vocab-parallel GIFT loss (Gibbs Initialization with Finite Temperature).

Per token ``t`` with label ``y``, student logits ``z`` and frozen-reference logits ``r``::

    p'(v)  = (1 - lambda) * softmax(r)(v) + lambda / V          (V: the GLOBAL vocab size)
    q(v)   = softmax(log p' + beta * onehot(y))(v)
    loss_t = -sum_v q(v) * log softmax(z)(v)

``q`` has a closed form that keeps every step in log space. With ``p = p'(y)`` and
``g = 1 / (1 + p (e^beta - 1)) = sigmoid(-(log p + log(e^beta - 1)))``::

    q      = (1 - g) * onehot(y) + g * p'
    loss_t = (1 - g) * NLL(z, y) + g * CE(p', softmax(z))
    dloss_t / dz = softmax(z) - q

so ``beta = inf`` gives ``g = 0`` (plain cross-entropy), ``beta = 0`` gives ``g = 1``
(cross-entropy against the reference), and neither ``e^beta`` nor ``p`` is ever formed: a
label the reference gives probability 1e-30 is handled exactly, which is what GIFT is about.
``soft_sft_weight = w`` replaces the per-token ``g`` by one constant ``w`` for every token
(soft SFT, ``q = (1 - w) onehot(y) + w p'``: the control with GIFT's softness spread evenly;
``beta`` is then unused).

Logits are sharded over the tensor-parallel group along the last dim, rank ``k`` owning
columns ``[k * V/tp, (k + 1) * V/tp)`` as in Megatron-Core. The forward makes two all-reduces
of batched per-token statistics (one MAX, one SUM), the backward none; one fp32
``[..., V/tp]`` buffer (``softmax(z) - g * p'``) is kept for the backward. Inputs are never
written to.
"""

import math
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx

from megatron_gift.loss.columns import (DOT_EXP_R_Z, DOT_EXP_Z_Z, R_LABEL, SUM_EXP_R,
                                        SUM_EXP_Z, SUM_Z, Z_LABEL)
from megatron_gift.loss.passes import IMPLEMENTATIONS, select


class GiftTokenStats(NamedTuple):
    """Per-token diagnostics, fp32, shaped like ``labels``; 0 at ignored positions."""

    student_entropy: torch.Tensor  # H(softmax(z)) in nats
    target_mass: torch.Tensor  # q(y): 1 for plain SFT, lower where GIFT keeps the reference's tail
    student_label_prob: torch.Tensor  # softmax(z)(y)


def vocab_parallel_gift_loss(
    logits: torch.Tensor,
    ref_logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    beta: float,
    smooth_lambda: float = 0.0,
    ignore_index: int = -100,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    return_stats: bool = False,
    check_labels: bool = True,
    implementation: str = "auto",
    soft_sft_weight: Optional[float] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, GiftTokenStats]]:
    """Per-token GIFT loss of vocab-parallel student logits against a frozen reference.

    Args:
        logits: student logits ``[..., V/tp]`` (e.g. Megatron's ``[s, b, V/tp]`` or
            ``[b, s, V/tp]``), fp32/bf16/fp16, usually requiring grad.
        ref_logits: reference logits, same shape and sharding, any float dtype; receives no
            gradient. May be ``None`` only when ``beta`` is ``inf`` (plain SFT).
        labels: global token ids ``[...]`` (int64); ``ignore_index`` marks positions
            without a loss.
        beta: inverse temperature, ``>= 0``; ``float('inf')`` is plain cross-entropy.
        smooth_lambda: weight of the uniform distribution mixed into the reference, in
            ``[0, 1]``.
        ignore_index: label value whose positions get loss 0 and gradient 0.
        tp_group: tensor-parallel group the vocab is sharded over. Default: Megatron-Core's
            tensor-parallel group when model parallelism is initialised, else no sharding.
        vocab_size: the real vocab size when the sharded vocab ``V`` is padded (Megatron pads
            it to a multiple of TP): columns ``>= vocab_size`` are left out of both softmaxes,
            the smoothing term and the labels' range, and get zero gradient. Default ``V``.
        return_stats: also return a :class:`GiftTokenStats`.
        check_labels: raise ValueError for a label outside ``[0, vocab_size)`` that is not
            ``ignore_index``. The check reads the labels on the host: on a GPU it makes the
            host wait for the device. The training engine turns it off, since its data path
            guarantees the range (token ids come from a tokenizer no larger than the vocab, and
            each data set is checked once when it is loaded).
        implementation: how the passes over the logits run (:mod:`megatron_gift.loss.passes`):
            ``"auto"`` (default; the fused Triton kernels for CUDA tensors where Triton is
            installed, else eager PyTorch), ``"triton"`` or ``"eager"``. Same math and
            contract either way.
        soft_sft_weight: a constant reference weight ``w`` in ``[0, 1]`` for every token
            instead of GIFT's per-token ``g`` (soft SFT; ``beta`` is unused). None: GIFT.

    Returns:
        The loss ``[...]`` in fp32 (nats per token), identical on every TP rank, and the
        stats when ``return_stats``.
    """
    beta, smooth_lambda = _checked_hyperparameters(beta, smooth_lambda)
    if soft_sft_weight is not None:
        soft_sft_weight = float(soft_sft_weight)
        if not 0.0 <= soft_sft_weight <= 1.0:
            raise ValueError(f"soft_sft_weight must be in [0, 1], got {soft_sft_weight}")
        beta = math.inf if soft_sft_weight == 0 else 0.0  # only read for "is there a reference"
    if ref_logits is None and not math.isinf(beta):
        raise ValueError(f"ref_logits is required for finite beta={beta} (only beta=inf skips it)"
                         if soft_sft_weight is None else
                         f"ref_logits is required for soft_sft_weight={soft_sft_weight} > 0")
    if ref_logits is not None and ref_logits.shape != logits.shape:
        raise ValueError(
            f"logits and ref_logits shapes differ: {tuple(logits.shape)} vs "
            f"{tuple(ref_logits.shape)}; student and reference must share vocab and sharding"
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)} "
            "without the vocab dim"
        )
    tp_group = _default_tp_group(tp_group)
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    padded_vocab = logits.size(-1) * tp_size
    if vocab_size is None:
        vocab_size = padded_vocab
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded_vocab}] "
                         f"(the logits' vocab, {logits.size(-1)} x tp {tp_size})")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: choose one of {IMPLEMENTATIONS}")
    if check_labels:
        _check_labels(labels, vocab_size, ignore_index)
    if math.isinf(beta):
        ref_logits = None  # q is one-hot: the reference cannot change the loss
    loss, entropy, target_mass, label_prob = _VocabParallelGiftLoss.apply(
        logits, ref_logits, labels, beta, smooth_lambda, ignore_index, tp_group, vocab_size,
        return_stats, implementation, soft_sft_weight
    )
    if return_stats:
        return loss, GiftTokenStats(entropy, target_mass, label_prob)
    return loss


def _checked_hyperparameters(beta, smooth_lambda):
    beta, smooth_lambda = float(beta), float(smooth_lambda)
    if math.isnan(beta) or beta < 0:
        raise ValueError(f"beta must be >= 0 (inf for plain SFT), got {beta}")
    if math.isnan(smooth_lambda) or not 0.0 <= smooth_lambda <= 1.0:
        raise ValueError(f"smooth_lambda must be in [0, 1], got {smooth_lambda}")
    return beta, smooth_lambda


def _default_tp_group(tp_group):
    if tp_group is not None:
        return tp_group
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _check_labels(labels, vocab_size, ignore_index):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"label {value} is outside the vocab [0, {vocab_size}) and is not "
            f"ignore_index={ignore_index}"
        )


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _log_expm1(x: float) -> float:
    """log(e^x - 1) for x >= 0, exact for large x; -inf at 0, inf at inf."""
    if x == 0:
        return -math.inf
    return x + math.log(-math.expm1(-x))


def _all_reduce(tensor, op, group):
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelGiftLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, logits: torch.Tensor, ref_logits: Optional[torch.Tensor],
                labels: torch.Tensor, beta: float, smooth_lambda: float, ignore_index: int,
                group: Optional[dist.ProcessGroup], vocab: int, with_stats: bool,
                implementation: str, soft_weight: Optional[float] = None
                ) -> tuple[torch.Tensor, ...]:
        """``(loss, entropy, target_mass, label_prob)``, each shaped like ``labels`` in fp32 (fp64
        for fp64 logits), the stats zeros unless ``with_stats``; ``logits`` and ``ref_logits``:
        ``[..., V/tp]``; ``vocab``: the real (unpadded) vocab size; ``soft_weight``: a constant
        ``g`` (soft SFT) instead of GIFT's per-token one."""
        passes = select(implementation, logits)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        tp_rank = dist.get_rank(group) if group is not None else 0
        shard = logits.size(-1)
        vocab_start = tp_rank * shard
        # Padding columns (>= vocab) sit at the end of the vocab: each rank keeps a prefix.
        local_vocab = min(max(vocab - vocab_start, 0), shard)
        z = logits.reshape(-1, shard)[:, :local_vocab]
        r = ref_logits.reshape(-1, shard)[:, :local_vocab] if ref_logits is not None else None
        y = labels.reshape(-1)

        valid = y != ignore_index
        owned = valid & (y >= vocab_start) & (y < vocab_start + local_vocab)
        column = torch.where(owned, y - vocab_start, 0)

        maxima = _all_reduce(passes.maxima(z, r, dtype), dist.ReduceOp.MAX, group)
        local, kept = passes.statistics(z, r, maxima, column, owned, with_stats=with_stats,
                                        smooth=smooth_lambda > 0)
        t = _all_reduce(local, dist.ReduceOp.SUM, group).unbind(-1)

        log_sum_exp_z = torch.log(t[SUM_EXP_Z])
        nll = log_sum_exp_z - t[Z_LABEL]
        ref_weight = uniform_weight = None
        if r is None:
            g = torch.zeros_like(nll)
            loss, target_mass = nll, torch.ones_like(nll)
        else:
            g, log_p_label, ce_ref = _gibbs_weight(t, log_sum_exp_z, beta, smooth_lambda, vocab)
            if soft_weight is not None:
                g = torch.full_like(g, soft_weight)
            loss = nll + g * (ce_ref - nll)
            target_mass = 1 - g * (1 - torch.exp(log_p_label))
            ref_weight = g * (1 - smooth_lambda) / t[SUM_EXP_R]
            uniform_weight = g * smooth_lambda / vocab if smooth_lambda > 0 else None

        gap = passes.soft_target_gap(kept if kept is not None else z, r, maxima,
                                     t[SUM_EXP_Z].reciprocal(), ref_weight, uniform_weight)
        ctx.save_for_backward(gap, column, torch.where(owned, 1 - g, 0.0), valid)
        ctx.input_shape, ctx.input_dtype, ctx.shard = logits.shape, logits.dtype, shard
        ctx.passes = passes
        if with_stats:
            entropy = log_sum_exp_z - t[DOT_EXP_Z_Z] / t[SUM_EXP_Z]
            stats = (entropy, target_mass, torch.exp(-nll))
        else:
            stats = (torch.zeros_like(nll),) * 3
        outputs = tuple(torch.where(valid, x, 0.0).view(labels.shape) for x in (loss,) + stats)
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx: FunctionCtx, grad_loss: torch.Tensor,
                 *unused_stat_grads: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        """The gradient ``[..., V/tp]`` of the logits for ``grad_loss`` (shaped like the labels);
        None for every other input."""
        gap, column, onehot_weight, valid = ctx.saved_tensors
        scale = torch.where(valid, grad_loss.reshape(-1), 0.0).to(gap.dtype)
        grad = ctx.passes.logits_grad(gap, scale, column, -(onehot_weight * scale), ctx.shard,
                                      ctx.input_dtype)
        return grad.view(ctx.input_shape), *(None,) * 10


def _gibbs_weight(t, log_sum_exp_z, beta, smooth_lambda, vocab):
    """``(g, log p'(y), CE(p', softmax(z)))`` per row from the all-reduced statistics ``t``:
    ``g = sigmoid(-(log p'(y) + log(e^beta - 1)))`` is the reference's weight in ``q``."""
    # CE(p', softmax(z)) = sum_v p'(v) * (log_sum_exp_z - z(v)), and log p'(y).
    ce_ref = log_sum_exp_z - t[DOT_EXP_R_Z] / t[SUM_EXP_R]
    log_p_label = t[R_LABEL] - torch.log(t[SUM_EXP_R])
    if smooth_lambda > 0:
        ce_ref = ((1 - smooth_lambda) * ce_ref
                  + smooth_lambda * (log_sum_exp_z - t[SUM_Z] / vocab))
        log_p_label = torch.logaddexp(
            log_p_label + _log(1 - smooth_lambda),
            torch.full_like(log_p_label, _log(smooth_lambda / vocab)),
        )
    g = torch.sigmoid(-(log_p_label + _log_expm1(beta)))
    return g, log_p_label, ce_ref
