"""The vocab-parallel GIFT loss: :func:`vocab_parallel_gift_loss` (:mod:`.gift`), whose passes
over the logits run as fused Triton kernels on GPUs (:mod:`.triton_kernels`) or chunked PyTorch
ops anywhere (:mod:`.eager`); :mod:`.passes` says which runs where; :mod:`.reference` is the
float64 full-vocab definition they are checked against. Imports nothing else of the package."""

from megatron_gift.loss.gift import GiftTokenStats, vocab_parallel_gift_loss
from megatron_gift.loss.passes import IMPLEMENTATIONS

__all__ = ["GiftTokenStats", "IMPLEMENTATIONS", "vocab_parallel_gift_loss"]
