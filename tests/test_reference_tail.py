"""reference_tail_shift against the definition computed in probability space (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_gift.loss.reference_tail import reference_tail_shift


def _target(logits, labels, beta, smooth_lambda):
    vocab = logits.size(-1)
    p_ref = (1 - smooth_lambda) * torch.softmax(logits.double(), -1) + smooth_lambda / vocab
    q = torch.softmax(torch.log(p_ref) + beta * F.one_hot(labels, vocab).double(), -1)
    return q, p_ref.gather(-1, labels[..., None]).squeeze(-1)


def _inputs(seed=0, tokens=64, vocab=300):
    g = torch.Generator().manual_seed(seed)
    a = 4 * torch.randn(tokens, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    # Labels from the head of the reference down to e^-40 below its top: GIFT's tail.
    a[torch.arange(tokens), labels] = a.amax(-1) - torch.linspace(0, 40, tokens, dtype=a.dtype)
    return a, labels


@pytest.mark.parametrize("smooth_lambda", [0.0, 0.01])
def test_shift_matches_the_definition(smooth_lambda):
    a, labels = _inputs()
    b = a + 0.3 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1),
                              dtype=a.dtype)
    labels[::7] = -100
    shift = reference_tail_shift(a, b, labels, beta=20.0, smooth_lambda=smooth_lambda)
    keep = labels != -100
    q_a, p_a = _target(a[keep], labels[keep], 20.0, smooth_lambda)
    q_b, p_b = _target(b[keep], labels[keep], 20.0, smooth_lambda)
    dlogp = (p_a.log() - p_b.log()).abs()
    kl = (q_a * (q_a.log() - q_b.log())).sum(-1)
    below_a = q_a.gather(-1, labels[keep][:, None]).squeeze(-1) < 0.5
    below_b = q_b.gather(-1, labels[keep][:, None]).squeeze(-1) < 0.5
    assert shift.tokens == int(keep.sum())
    assert shift.mean_abs_dlogp == pytest.approx(float(dlogp.mean()), rel=1e-9)
    assert shift.max_abs_dlogp == pytest.approx(float(dlogp.max()), rel=1e-9)
    assert shift.mean_kl == pytest.approx(float(kl.mean()), rel=1e-6, abs=1e-12)
    assert shift.max_kl == pytest.approx(float(kl.max()), rel=1e-6)
    assert shift.share_q_below_half_a == pytest.approx(float(below_a.double().mean()))
    assert shift.share_q_below_half_disagree == pytest.approx(
        float((below_a != below_b).double().mean()))
    assert shift.mean_kl > 0
    # Smoothing puts p'(y) >= lambda / V = 3e-5, so at beta 20 no label falls below q(y) = 0.5.
    assert (0 < shift.share_q_below_half_a < 1) if smooth_lambda == 0 else (
        shift.share_q_below_half_a == 0)


def test_identical_references_shift_nothing_and_a_moved_label_is_counted():
    a, labels = _inputs(tokens=40)
    same = reference_tail_shift(a, a.clone(), labels, beta=20.0, rows=7)
    assert same.mean_abs_dlogp == 0 and same.max_kl == 0 and same.share_q_below_half_disagree == 0
    # Raise one tail label by 4 nats: at beta 20 its q(y) crosses 0.5 (p'(y) e^20 ~ 1).
    b = a.clone()
    p = torch.log_softmax(a, -1)[torch.arange(40), labels]
    token = int(torch.argmin((p + 20 + 2).abs()))  # p'(y) ~ e^-22: q(y) ~ 0.12
    b[token, labels[token]] += 4.0
    moved = reference_tail_shift(a, b, labels, beta=20.0, rows=7)
    assert moved.share_q_below_half_disagree == pytest.approx(1 / 40)
    assert moved.max_abs_dlogp == pytest.approx(4.0, abs=1e-6)


def test_bf16_rounding_of_the_reference_is_measured():
    a, labels = _inputs(seed=2)
    shift = reference_tail_shift(a.float(), a.bfloat16(), labels, beta=20.0)
    assert 0 < shift.mean_abs_dlogp < 0.2 and shift.max_kl < 1.0


def test_bad_inputs_are_refused():
    a, labels = _inputs(tokens=4)
    with pytest.raises(ValueError, match="beta=inf"):
        reference_tail_shift(a, a, labels, beta=math.inf)
    with pytest.raises(ValueError, match="shapes differ"):
        reference_tail_shift(a, a[:3], labels, beta=20.0)
