"""The losses a step computes on the last pipeline stage, each a declared object: what it needs,
what it returns and how each of its metrics is reduced (as NeMo RL's ``LossFunction`` protocol
declares them), so that the schedule and the trainer read those facts instead of knowing them.

Megatron's schedules call the loss with per-token semantics (``calculate_per_token_loss``): a
loss returns ``(loss_sum, num_tokens, report)`` for one micro-batch, and ``report`` holds one
``[sum, count]`` pair per metric. Every metric here is a token mean: the sums and counts are
added over micro-batches and data-parallel (and context-parallel) ranks, then divided.
"""

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.distributed as dist

from megatron_gift.loss.gift import vocab_parallel_gift_loss

Batch = dict[str, torch.Tensor]  # a micro-batch: name -> [b, s] tensor
Report = dict[str, torch.Tensor]  # metric -> [sum, count]
TOKEN_MEAN = "token_mean"


@dataclass(frozen=True)
class GiftLoss:
    """GIFT's per-token loss against the reference's Gibbs target (``beta = inf``: plain
    cross-entropy, no reference), with its diagnostics. ``vocab_size``: the real vocab (the
    logits' padding columns take no part); ``implementation``: the passes that run it.

    The labels' range is checked once per data set when it is loaded, so the loss runs without
    its per-call check, which would make the host wait for the device.
    """

    beta: float
    smooth_lambda: float
    vocab_size: int
    implementation: str = "auto"
    head: str = "logits"  # "fused": the inputs are both models' hidden states and weights
    chunk_tokens: Optional[int] = None  # the fused head's; None: its default
    # The fused head adds the output weight's gradient into its main_grad (Megatron-Core's
    # gradient_accumulation_fusion) instead of returning it.
    accumulate_into_main_grad: bool = False
    # Soft SFT: one constant reference weight w for every token instead of GIFT's per-token
    # one (q = (1 - w) onehot + w p_ref; beta unused). The logits head only.
    soft_sft_weight: Optional[float] = None
    metrics: ClassVar[tuple[str, ...]] = ("loss", "student_entropy", "target_mass",
                                          "student_label_prob")
    reduction: ClassVar[str] = TOKEN_MEAN
    uses_reference: ClassVar[bool] = True

    def __call__(self, logits, reference_logits, batch: Batch
                 ) -> tuple[torch.Tensor, torch.Tensor, Report]:
        """``logits``, ``reference_logits``: ``[b, s, V/tp]``, or with the fused head each
        model's :class:`megatron_gift.core.model.HeadInputs` (hidden ``[s, b, h]``, weight
        ``[V/tp, h]``); ``batch``: labels and loss mask ``[b, s]``. Returns the loss summed
        over tokens, the token count and the report."""
        if self.head == "fused":
            if self.soft_sft_weight is not None:
                raise ValueError("soft_sft_weight takes the logits head only (--gift-head logits)")
            loss, stats = self._fused(logits, reference_logits, batch)
        else:
            loss, stats = vocab_parallel_gift_loss(
                logits, reference_logits, batch["labels"], beta=self.beta,
                smooth_lambda=self.smooth_lambda, vocab_size=self.vocab_size,
                return_stats=True, check_labels=False, implementation=self.implementation,
                soft_sft_weight=self.soft_sft_weight)
        num_tokens = batch["loss_mask"].sum().to(torch.int)
        count = num_tokens.float()
        report = {"loss": loss.sum().detach()}
        report.update(student_entropy=stats.student_entropy.sum(),
                      target_mass=stats.target_mass.sum(),
                      student_label_prob=stats.student_label_prob.sum())
        return loss.sum(), num_tokens, {k: torch.stack([v, count]) for k, v in report.items()}

    def _fused(self, student, reference, batch: Batch):
        """The loss and its diagnostics from both models' head inputs, no logits held."""
        from megatron.core import parallel_state

        from megatron_gift.loss.fused_head import fused_gift_head_loss

        ref_hidden, ref_weight = ((reference.hidden.transpose(0, 1), reference.weight)
                                  if reference is not None else (None, None))
        return fused_gift_head_loss(
            student.hidden.transpose(0, 1), student.weight, batch["labels"], ref_hidden,
            ref_weight, beta=self.beta, smooth_lambda=self.smooth_lambda,
            vocab_size=self.vocab_size, chunk_tokens=self.chunk_tokens,
            group=parallel_state.get_tensor_model_parallel_group(), check_labels=False,
            return_stats=True, reduce_hidden_grad=not student.gathered,
            accumulate_into_main_grad=self.accumulate_into_main_grad,
            implementation=self.implementation)


@dataclass(frozen=True)
class NextTokenEvaluation:
    """The student alone: next-token cross-entropy and accuracy on the loss tokens."""

    vocab_size: int
    head: str = "logits"  # "fused": the input is the student's HeadInputs
    chunk_tokens: Optional[int] = None
    metrics: ClassVar[tuple[str, ...]] = ("valid_ce", "valid_accuracy")
    reduction: ClassVar[str] = TOKEN_MEAN
    uses_reference: ClassVar[bool] = False

    def __call__(self, logits, reference_logits: Optional[torch.Tensor],
                 batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Report]:
        """``logits``: ``[b, s, V/tp]``, or with the fused head the student's
        :class:`megatron_gift.core.model.HeadInputs`; ``batch``: labels ``[b, s]``."""
        labels = batch["labels"]
        if self.head == "fused":
            loss, correct = self._fused(logits, labels)
        else:
            loss = vocab_parallel_gift_loss(logits, None, labels, beta=float("inf"),
                                            vocab_size=self.vocab_size, check_labels=False)
            correct = vocab_parallel_argmax(logits, self.vocab_size) == labels
        valid = labels != -100
        count = valid.sum().float()
        correct = correct & valid
        report = {"valid_ce": torch.stack([loss.sum(), count]),
                  "valid_accuracy": torch.stack([correct.sum().float(), count])}
        return loss.sum(), valid.sum().to(torch.int), report

    def _fused(self, student, labels: torch.Tensor):
        from megatron.core import parallel_state

        from megatron_gift.loss.fused_head import fused_next_token_metrics

        return fused_next_token_metrics(
            student.hidden.transpose(0, 1), student.weight, labels, vocab_size=self.vocab_size,
            chunk_tokens=self.chunk_tokens,
            group=parallel_state.get_tensor_model_parallel_group())


def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Global argmax ``[...]`` of vocab-parallel logits ``[..., V/tp]`` over the real vocab
    ``[0, vocab_size)`` (lowest index on ties)."""
    from megatron.core import parallel_state

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
