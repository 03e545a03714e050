"""How much a change to the reference's numerics (bf16 for fp32, FP8 for bf16) moves GIFT's target.

At beta 20 GIFT departs from SFT only where the reference gives the label less than ~1e-7, so a
reference that computes its tail less exactly changes the target exactly where GIFT acts. For
the same tokens, from two runs of the reference (``a``, the trusted one, and ``b``)::

    d log p(y)      |log p'_a(y) - log p'_b(y)|              mean and max over tokens
    q(y) < 0.5      the share of tokens GIFT moves off the label (q(y) < 0.5) in a, in b,
                    and in exactly one of them
    KL(q_a || q_b)  per token, mean and max

All in float64 over the full vocab, ``rows`` tokens at a time.
"""

import math
from dataclasses import asdict, dataclass

import torch


@dataclass
class TailShift:
    tokens: int
    mean_abs_dlogp: float  # nats
    max_abs_dlogp: float
    share_q_below_half_a: float
    share_q_below_half_b: float
    share_q_below_half_disagree: float
    mean_kl: float  # nats per token
    max_kl: float

    def as_dict(self) -> dict:
        return asdict(self)


def reference_tail_shift(ref_logits_a: torch.Tensor, ref_logits_b: torch.Tensor,
                         labels: torch.Tensor, beta: float, smooth_lambda: float = 0.0,
                         ignore_index: int = -100, rows: int = 1024) -> TailShift:
    """Compare GIFT's target from two reference runs over the same tokens.

    Args:
        ref_logits_a, ref_logits_b: full-vocab reference logits ``[..., V]`` (any float dtype).
        labels: ``[...]`` token ids; ``ignore_index`` positions are left out.
        beta, smooth_lambda: GIFT's settings (``beta`` finite).
    """
    if ref_logits_a.shape != ref_logits_b.shape or labels.shape != ref_logits_a.shape[:-1]:
        raise ValueError(f"shapes differ: {tuple(ref_logits_a.shape)}, "
                         f"{tuple(ref_logits_b.shape)}, labels {tuple(labels.shape)}")
    if math.isinf(beta):
        raise ValueError("beta=inf has a one-hot target: the reference cannot move it")
    vocab = ref_logits_a.size(-1)
    keep = labels.reshape(-1) != ignore_index
    a = ref_logits_a.reshape(-1, vocab)[keep]
    b = ref_logits_b.reshape(-1, vocab)[keep]
    y = labels.reshape(-1)[keep]
    parts = [_chunk(a[i:i + rows], b[i:i + rows], y[i:i + rows], beta, smooth_lambda)
             for i in range(0, y.numel(), rows)]
    dlogp, below_a, below_b, kl = (torch.cat(p) for p in zip(*parts)) if parts else (
        torch.zeros(0, dtype=torch.float64),) * 4
    count = max(y.numel(), 1)
    return TailShift(
        tokens=y.numel(), mean_abs_dlogp=float(dlogp.sum() / count),
        max_abs_dlogp=float(dlogp.max()) if dlogp.numel() else 0.0,
        share_q_below_half_a=float(below_a.sum() / count),
        share_q_below_half_b=float(below_b.sum() / count),
        share_q_below_half_disagree=float((below_a != below_b).sum() / count),
        mean_kl=float(kl.sum() / count), max_kl=float(kl.max()) if kl.numel() else 0.0)


def _chunk(a, b, y, beta, smooth_lambda):
    log_q_a, log_p_a = _log_target(a, y, beta, smooth_lambda)
    log_q_b, log_p_b = _log_target(b, y, beta, smooth_lambda)
    kl = (log_q_a.exp() * (log_q_a - log_q_b)).sum(-1)
    q_label_a = log_q_a.gather(-1, y[:, None]).squeeze(-1).exp()
    q_label_b = log_q_b.gather(-1, y[:, None]).squeeze(-1).exp()
    return ((log_p_a - log_p_b).abs().cpu(), (q_label_a < 0.5).cpu(), (q_label_b < 0.5).cpu(),
            kl.cpu())


def _log_target(logits, y, beta, smooth_lambda):
    """``(log q [rows, V], log p'(y) [rows])`` in float64."""
    log_p = torch.log_softmax(logits.double(), -1)
    if smooth_lambda > 0:
        log_p = torch.logaddexp(log_p + math.log(1 - smooth_lambda) if smooth_lambda < 1
                                else torch.full_like(log_p, -math.inf),
                                torch.full_like(log_p, math.log(smooth_lambda / log_p.size(-1))))
    boost = torch.zeros_like(log_p).scatter_(-1, y[:, None], beta)
    return torch.log_softmax(log_p + boost, -1), log_p.gather(-1, y[:, None]).squeeze(-1)
