"""GIFT inside Megatron-Core's pipeline schedules: the forward step, the loss on the last stage,
and the shapes of the student+reference activations that travel between stages.

The loss is an object that declares its metrics and their reduction
(:mod:`megatron_gift.loss.objectives`); it follows the schedules' per-token contract: it returns
``(loss_sum, num_tokens, report)`` and ``calculate_per_token_loss=True`` lets Megatron divide
the gradients by the tokens of the whole global batch (all micro-batches, all DP ranks).

With context parallelism each rank keeps its load-balanced share of every micro-batch's
sequence (:func:`context_parallel_share`), labels and loss mask with it; the per-token loss sums
over CP ranks as over DP ranks (Megatron reduces the token counts and gradients over DP x CP).
"""

from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

if TYPE_CHECKING:
    from megatron_gift.core.model import GiftModel
    from megatron_gift.loss.objectives import GiftLoss, NextTokenEvaluation

    StepLoss = GiftLoss | NextTokenEvaluation

Batch = dict[str, torch.Tensor]  # a micro-batch: name -> [b, s] tensor (megatron_gift.data)
# The last stage's loss: logits -> (loss_sum, num_tokens, {name: [sum, count]}).
LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
ForwardStep = Callable[[Iterator[Batch], "GiftModel"], tuple[torch.Tensor, Optional[LossFunc]]]
Shapes = list[tuple[int, ...]]


def forward_step_func(loss: "StepLoss", attention_mask_fn: Callable[[Batch], torch.Tensor],
                      thd: bool = False) -> ForwardStep:
    """A ``forward_step_func(data_iterator, model)`` for Megatron's schedules, computing
    ``loss`` (:mod:`megatron_gift.loss.objectives`: GIFT's for training, the next-token
    evaluation with the student alone) on the last stage, given the student's logits, the
    reference's (None where the model does not run it) and the micro-batch.

    ``attention_mask_fn(batch)`` gives a micro-batch's attention mask (see
    :func:`causal_attention_mask`). With ``thd`` (packed data on Transformer Engine's layers)
    there is no mask: each micro-batch becomes one row in the "thd" format, its samples told
    apart by :func:`packed_seq_params` (the schedule then sees ``[b * s, 1]`` micro-batches).
    """

    def forward_step(data_iterator: Iterator[Batch],
                     model: "GiftModel") -> tuple[torch.Tensor, Optional[LossFunc]]:
        batch, packed = next(data_iterator), None
        if thd:
            packed = packed_seq_params(batch["segment_ids"], model.device)
            batch = {k: v.reshape(1, -1) for k, v in batch.items()}
        batch = context_parallel_share(
            {k: v.to(model.device, non_blocking=True) for k, v in batch.items()})
        mask = None if thd else attention_mask_fn(batch)
        output = model(batch["tokens"], batch["position_ids"], mask, packed_seq_params=packed)
        if not model.post_process:
            return output, None
        logits, reference_logits = output
        return logits, lambda out: loss(out, reference_logits, batch)

    return forward_step


def context_parallel_share(batch: Batch) -> Batch:
    """This context-parallel rank's part of ``batch`` (``[b, s]`` tensors -> ``[b, s / cp]``):
    Megatron's zigzag split, chunks ``r`` and ``2 cp - 1 - r`` of ``2 cp``, so every rank gets
    as much causal-attention work. The batch itself without context parallelism."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False,
                                     cp_group=parallel_state.get_context_parallel_group())


def shapes_with_reference(hidden_size: int) -> Callable[[Shapes, Shapes], tuple[Shapes, Shapes]]:
    """``adjust_tensor_shapes_fn`` for the 1F1B schedule: activations carry both models."""

    def adjust(recv_shapes: Shapes, send_shapes: Shapes) -> tuple[Shapes, Shapes]:
        widen = lambda shapes: [(*s[:-1], s[-1] + hidden_size) for s in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    return adjust


def packed_seq_params(segment_ids: torch.Tensor,
                      device: Optional[torch.device] = None) -> PackedSeqParams:
    """Megatron's ``PackedSeqParams`` ("thd" format) for a packed micro-batch flattened to one
    row: ``segment_ids`` ``[b, s]`` (1, 2, ... per sample of a row, 0 for its padding) ->
    sequences that start at every row and at every change of segment, so attention stays
    inside each sample (the padding at a row's end is a sequence of its own, outside the loss).

    Computed on the host from the batch as read (no device sync); ``cu_seqlens`` (int32, the
    ``b * s`` flat positions where sequences start, then ``b * s``) go to ``device``.
    """
    rows, length = segment_ids.shape
    flat = segment_ids.reshape(-1).cpu()
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::length] = True
    cu_seqlens = torch.cat([starts.nonzero().flatten(), torch.tensor([rows * length])])
    cu_seqlens = cu_seqlens.to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if device is not None:
        cu_seqlens = cu_seqlens.to(device, non_blocking=True)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def causal_attention_mask(batch: Batch) -> torch.Tensor:
    """Boolean ``[b, 1, s, s]`` mask of a micro-batch, True where attention is blocked, on the
    device of its ``tokens``: causal, and block-diagonal by ``segment_ids`` when it has them
    (packed sequences: a query sees only earlier keys of its own sample)."""
    tokens = batch["tokens"]
    b, s = tokens.shape
    blocked = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu_(1)
    segments = batch.get("segment_ids")
    if segments is None:
        return blocked.view(1, 1, s, s).expand(b, 1, s, s)
    return (blocked | (segments[:, :, None] != segments[:, None, :])).unsqueeze(1)
