"""GIFT inside Megatron-Core's pipeline schedules: the forward step, the loss on the last stage,
and the shapes of the student+reference activations that travel between stages.

The loss function follows the schedules' per-token contract: it returns
``(loss_sum, num_tokens, report)`` and ``calculate_per_token_loss=True`` lets Megatron divide
the gradients by the tokens of the whole global batch (all micro-batches, all DP ranks).
Report values are ``[sum, count]`` pairs, summed over micro-batches by the training loop.

With context parallelism each rank keeps its load-balanced share of every micro-batch's
sequence (:func:`context_parallel_share`), labels and loss mask with it; the per-token loss sums
over CP ranks as over DP ranks (Megatron reduces the token counts and gradients over DP x CP).
"""

from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_gift.loss import vocab_parallel_gift_loss

if TYPE_CHECKING:
    from megatron_gift.core.model import GiftModel

Batch = dict[str, torch.Tensor]  # a micro-batch: name -> [b, s] tensor (megatron_gift.data)
# The last stage's loss: logits -> (loss_sum, num_tokens, {name: [sum, count]}).
LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
ForwardStep = Callable[[Iterator[Batch], "GiftModel"], tuple[torch.Tensor, Optional[LossFunc]]]
Shapes = list[tuple[int, ...]]


def forward_step_func(beta: float, smooth_lambda: float,
                      attention_mask_fn: Callable[[Batch], torch.Tensor], vocab_size: int,
                      evaluate: bool = False, thd: bool = False,
                      implementation: str = "auto") -> ForwardStep:
    """A ``forward_step_func(data_iterator, model)`` for Megatron's schedules.

    Training steps compute the GIFT loss; ``evaluate`` computes plain next-token
    cross-entropy and accuracy on the loss tokens, with the student only. ``vocab_size`` is
    the real vocab: the padding columns of the logits take no part in either.
    ``implementation`` picks the loss's passes (:mod:`megatron_gift.loss.passes`).

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
        if evaluate:
            return logits, lambda out: _evaluation_loss(out, batch, vocab_size)
        return logits, lambda out: _gift_loss(out, reference_logits, batch, beta, smooth_lambda,
                                              vocab_size, implementation)

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


# The labels' range is checked once per data set when it is loaded (trainer._load_data), so the
# loss runs without its per-call check, which would make the host wait for the device.
def _gift_loss(logits, reference_logits, batch, beta, smooth_lambda, vocab_size,
               implementation="auto"):
    loss, stats = vocab_parallel_gift_loss(logits, reference_logits, batch["labels"], beta=beta,
                                           smooth_lambda=smooth_lambda, vocab_size=vocab_size,
                                           return_stats=True, check_labels=False,
                                           implementation=implementation)
    num_tokens = batch["loss_mask"].sum().to(torch.int)
    loss_sum = loss.sum()
    count = num_tokens.float()
    report = {"loss": torch.stack([loss_sum.detach(), count]),
              "student_entropy": torch.stack([stats.student_entropy.sum(), count]),
              "target_mass": torch.stack([stats.target_mass.sum(), count]),
              "student_label_prob": torch.stack([stats.student_label_prob.sum(), count])}
    return loss_sum, num_tokens, report


def _evaluation_loss(logits, batch, vocab_size):
    labels = batch["labels"]
    loss = vocab_parallel_gift_loss(logits, None, labels, beta=float("inf"), vocab_size=vocab_size,
                                    check_labels=False)
    valid = labels != -100
    count = valid.sum().float()
    correct = (_vocab_parallel_argmax(logits, vocab_size) == labels) & valid
    report = {"valid_ce": torch.stack([loss.sum(), count]),
              "valid_accuracy": torch.stack([correct.sum().float(), count])}
    return loss.sum(), valid.sum().to(torch.int), report


def _vocab_parallel_argmax(logits, vocab_size):
    """Global argmax ``[...]`` of vocab-parallel logits ``[..., V/tp]`` over the real vocab
    ``[0, vocab_size)`` (lowest index on ties)."""
    group = parallel_state.get_tensor_model_parallel_group()
    start = parallel_state.get_tensor_model_parallel_rank() * logits.size(-1)
    real = logits[..., : max(0, min(vocab_size - start, logits.size(-1)))].float()
    if real.size(-1) == 0:
        local_max = torch.full(logits.shape[:-1], -torch.inf, device=logits.device)
        local_index = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    else:
        local_max, local_index = real.max(-1)
    local_index = local_index + start
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    candidate = torch.where(local_max == global_max, local_index, torch.iinfo(torch.long).max)
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate


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
