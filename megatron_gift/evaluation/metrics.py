"""Small, dependency-free metrics: unbiased pass@k, mean with a 95% t-interval, paired
differences, style diversity, and GIFT's per-token target mass."""

import math
from collections import Counter
from typing import Iterable, Sequence

# Two-sided 95% quantiles of Student's t (df 1..30); beyond 30 the normal's 1.96 is within 4%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct:
    ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021), computed as a stable product."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_curve(correct_counts: Sequence[int], n: int, ks: Iterable[int]) -> dict[str, float]:
    """Mean pass@k over prompts for each ``k`` (keys are ``str(k)``, JSON-ready)."""
    return {str(k): sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)
            for k in ks}


def t_quantile_975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "low", "high", "n"}``: the mean and its 95% Student-t interval (a single
    value has no interval: low = high = mean)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """``a - b`` paired element-wise: mean, 95% t-interval, and how many pairs favour ``a``."""
    if len(a) != len(b) or not a:
        raise ValueError("paired samples must be non-empty and of equal length")
    diffs = [x - y for x, y in zip(a, b)]
    return {**mean_ci(diffs), "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}


def entropy_bits(counts: Iterable[int]) -> float:
    """Shannon entropy (bits) of the distribution the counts describe."""
    counts = [c for c in counts if c > 0]
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts) if total else 0.0


def style_diversity(styles_per_prompt: Sequence[Sequence[str]],
                    correct_per_prompt: Sequence[Sequence[bool]]) -> dict:
    """Share of samples in each style, the entropy of that share (bits; log2(3) = 1.58 is all
    three styles equally), and the mean number of distinct styles among a prompt's correct
    samples."""
    counts = Counter(s for styles in styles_per_prompt for s in styles)
    total = sum(counts.values())
    distinct = [len({s for s, ok in zip(styles, correct) if ok})
                for styles, correct in zip(styles_per_prompt, correct_per_prompt)]
    return {"shares": {s: counts[s] / total for s in sorted(counts)},
            "entropy_bits": entropy_bits(counts.values()),
            "distinct_correct_styles": sum(distinct) / len(distinct)}


def gift_target_mass(log_p_ref: float, beta: float, smooth_lambda: float = 0.0,
                     vocab_size: int = 1) -> float:
    """GIFT's target probability of the demonstrated token, ``q(y*) = p e^b / (1 + p (e^b - 1))``
    with ``p = (1 - lambda) p_ref(y*) + lambda / V``; ``beta = inf`` is SFT (``q = 1``)."""
    if math.isinf(beta):
        return 1.0
    p = (1.0 - smooth_lambda) * math.exp(log_p_ref) + smooth_lambda / vocab_size
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    x = math.log(p) + beta - math.log1p(-p)  # q's log-odds; e^beta is never formed
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0
