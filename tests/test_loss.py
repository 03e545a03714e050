"""vocab_parallel_gift_loss on one rank: value and gradient against the full-vocab oracle,
the beta limits, numerics of the reference's tail, diagnostics and input checks."""

import math

import pytest
import torch

from megatron_gift.loss import vocab_parallel_gift_loss
from megatron_gift.loss.reference import gift_loss_full_vocab, gift_stats_full_vocab

BETAS = [0.0, 0.5, 5.0, 20.0, 1e4, math.inf]
LAMBDAS = [0.0, 0.01, 0.3, 1.0]


def _inputs(shape=(5, 3), vocab=40, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(*shape, vocab, generator=g)).to(dtype).requires_grad_()
    ref = (scale * torch.randn(*shape, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::4] = -100
    return logits, ref, labels


def _oracle(logits, ref, labels, beta, smooth_lambda):
    x = logits.detach().double().requires_grad_()
    loss = gift_loss_full_vocab(x, ref, labels, beta, smooth_lambda)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape).double())
    return loss.detach(), x.grad


def _ours(logits, ref, labels, beta, smooth_lambda, **kwargs):
    loss = vocab_parallel_gift_loss(logits, ref, labels, beta=beta, smooth_lambda=smooth_lambda,
                                    **kwargs)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape))
    return loss.detach(), logits.grad


@pytest.mark.parametrize("smooth_lambda", LAMBDAS)
@pytest.mark.parametrize("beta", BETAS)
def test_fp32_matches_oracle(beta, smooth_lambda):
    logits, ref, labels = _inputs()
    loss, grad = _ours(logits, ref, labels, beta, smooth_lambda)
    expected_loss, expected_grad = _oracle(logits, ref, labels, beta, smooth_lambda)
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta,smooth_lambda", [(0.0, 0.0), (20.0, 0.0), (20.0, 0.01), (3.0, 0.5)])
def test_low_precision_logits_match_oracle(dtype, beta, smooth_lambda):
    # The oracle sees the same rounded logits; the loss itself is computed in fp32.
    logits, ref, labels = _inputs(dtype=dtype)
    loss, grad = _ours(logits, ref, labels, beta, smooth_lambda)
    expected_loss, expected_grad = _oracle(logits, ref, labels, beta, smooth_lambda)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    # The gradient is rounded once to the logits' dtype.
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-3)


def test_batch_first_and_sequence_first_layouts_agree():
    logits, ref, labels = _inputs(shape=(4, 6))
    loss_sb = vocab_parallel_gift_loss(logits, ref, labels, beta=2.0)
    loss_bs = vocab_parallel_gift_loss(logits.transpose(0, 1), ref.transpose(0, 1),
                                       labels.transpose(0, 1), beta=2.0)
    torch.testing.assert_close(loss_bs.transpose(0, 1), loss_sb)


@pytest.mark.parametrize("beta,smooth_lambda", [(0.0, 0.0), (1.5, 0.2), (20.0, 0.0), (math.inf, 0.0)])
def test_gradcheck_fp64(beta, smooth_lambda):
    logits, ref, labels = _inputs(shape=(3, 2), vocab=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_gift_loss(x, ref, labels, beta=beta, smooth_lambda=smooth_lambda),
        (logits,),
    )


@pytest.mark.parametrize("beta", [math.inf, 1e4, 1e30])
def test_large_beta_is_megatron_cross_entropy(world_of_one, beta):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, ref, labels = _inputs()
    labels = labels.clamp(min=0)  # Megatron's CE has no ignore_index
    ours = vocab_parallel_gift_loss(logits, ref, labels, beta=beta)
    ours.sum().backward()
    x = logits.detach().clone().requires_grad_()
    expected = vocab_parallel_cross_entropy(x.clone(), labels)
    expected.sum().backward()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, x.grad, rtol=1e-6, atol=1e-7)


def test_beta_zero_is_cross_entropy_against_reference():
    logits, ref, labels = _inputs()
    loss = vocab_parallel_gift_loss(logits, ref, labels, beta=0.0)
    expected = -(torch.softmax(ref.double(), -1) * torch.log_softmax(logits.double(), -1)).sum(-1)
    torch.testing.assert_close(loss.double(), torch.where(labels == -100, 0.0, expected),
                               rtol=1e-5, atol=1e-5)


def test_reference_tail_is_exact():
    # The reference gives the label e^-114 (3e-50, below fp32's smallest subnormal): its
    # probability underflows in fp32, the loss must not. The target keeps about
    # half its mass on the label (beta = 114): q(y) = p e^b / (1 + p (e^b - 1)).
    vocab, beta = 50, 114.0
    logits, _, labels = _inputs(shape=(4,), vocab=vocab)
    ref = torch.zeros(4, vocab)
    ref[torch.arange(4), labels.clamp(min=0)] = -110.0
    loss, stats = vocab_parallel_gift_loss(logits, ref, labels, beta=beta, return_stats=True)
    expected = gift_loss_full_vocab(logits.detach(), ref, labels, beta)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    log_p = torch.log_softmax(ref.double(), -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    q_label = torch.sigmoid(log_p + beta + torch.log(-torch.expm1(torch.tensor(-beta).double())))
    valid = labels != -100
    assert torch.softmax(ref, -1)[0, labels[0].clamp(min=0)] == 0  # fp32 really underflows
    torch.testing.assert_close(stats.target_mass[valid].double(), q_label[valid], rtol=1e-5, atol=1e-7)
    assert 0.1 < stats.target_mass[valid].min() < 0.9
    sft = vocab_parallel_gift_loss(logits, ref, labels, beta=math.inf)
    assert ((loss - sft)[valid].abs() > 1e-2).all()  # GIFT departs from SFT exactly here


def test_extreme_logits_stay_finite():
    logits, ref, labels = _inputs(scale=1e4)
    for beta in [0.0, 20.0, math.inf]:
        loss = vocab_parallel_gift_loss(logits, ref, labels, beta=beta, smooth_lambda=0.01)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("beta,smooth_lambda", [(3.0, 0.1), (0.0, 0.0), (math.inf, 0.0)])
def test_stats_match_definitions(beta, smooth_lambda):
    logits, ref, labels = _inputs()
    _, stats = vocab_parallel_gift_loss(logits, ref, labels, beta=beta,
                                        smooth_lambda=smooth_lambda, return_stats=True)
    expected = gift_stats_full_vocab(logits, ref, labels, beta, smooth_lambda)
    for got, want in zip(stats, expected):
        assert got.dtype == torch.float32 and got.shape == labels.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_are_not_modified_and_reference_gets_no_grad(dtype):
    logits, ref, labels = _inputs(dtype=dtype)
    ref.requires_grad_()
    before = [t.detach().clone() for t in (logits, ref, labels)]
    loss = vocab_parallel_gift_loss(logits, ref, labels, beta=2.0, smooth_lambda=0.1)
    loss.sum().backward()
    for t, b in zip((logits, ref, labels), before):
        assert torch.equal(t.detach(), b)
    assert ref.grad is None and logits.grad is not None


def test_ignored_positions_have_no_loss_and_no_grad():
    logits, ref, labels = _inputs()
    loss, stats = vocab_parallel_gift_loss(logits, ref, labels, beta=2.0, return_stats=True)
    loss.sum().backward()
    ignored = labels == -100
    assert ignored.any()
    assert (loss[ignored] == 0).all() and (logits.grad[ignored] == 0).all()
    assert (loss[~ignored] > 0).all() and (logits.grad[~ignored] != 0).any(-1).all()
    assert all((s[ignored] == 0).all() for s in stats)


def test_custom_ignore_index():
    logits, ref, labels = _inputs()
    labels = torch.where(labels == -100, 7, labels)
    loss = vocab_parallel_gift_loss(logits, ref, labels, beta=2.0, ignore_index=7)
    assert (loss[labels == 7] == 0).all() and (loss[labels != 7] > 0).all()


def test_backward_can_run_twice():
    logits, ref, labels = _inputs()
    loss = vocab_parallel_gift_loss(logits, ref, labels, beta=2.0).sum()
    (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (second,) = torch.autograd.grad(loss, logits)
    assert torch.equal(first, second)


def test_infinite_beta_needs_no_reference():
    logits, ref, labels = _inputs()
    torch.testing.assert_close(vocab_parallel_gift_loss(logits, None, labels, beta=math.inf),
                               vocab_parallel_gift_loss(logits, ref, labels, beta=math.inf))


@pytest.mark.parametrize("kwargs,message", [
    (dict(beta=-1.0), "beta must be >= 0"),
    (dict(beta=float("nan")), "beta must be >= 0"),
    (dict(beta=1.0, smooth_lambda=-0.1), "smooth_lambda must be in"),
    (dict(beta=1.0, smooth_lambda=1.5), "smooth_lambda must be in"),
    (dict(beta=1.0, smooth_lambda=float("nan")), "smooth_lambda must be in"),
])
def test_bad_hyperparameters_raise(kwargs, message):
    logits, ref, labels = _inputs()
    with pytest.raises(ValueError, match=message):
        vocab_parallel_gift_loss(logits, ref, labels, **kwargs)


@pytest.mark.parametrize("bad_label", [40, 1000, -1, -7])
def test_label_outside_vocab_raises_with_its_value(bad_label):
    logits, ref, labels = _inputs()
    labels.view(-1)[5] = bad_label
    with pytest.raises(ValueError, match=rf"label {bad_label} is outside the vocab \[0, 40\)"):
        vocab_parallel_gift_loss(logits, ref, labels, beta=1.0)


def test_shape_mismatches_raise():
    logits, ref, labels = _inputs()
    with pytest.raises(ValueError, match="shapes differ"):
        vocab_parallel_gift_loss(logits, ref[..., :-1], labels, beta=1.0)
    with pytest.raises(ValueError, match="labels shape"):
        vocab_parallel_gift_loss(logits, ref, labels[:-1], beta=1.0)
    with pytest.raises(ValueError, match="ref_logits is required"):
        vocab_parallel_gift_loss(logits, None, labels, beta=1.0)


@pytest.mark.parametrize("beta,smooth_lambda", [(0.0, 0.0), (20.0, 0.0), (3.0, 0.2), (math.inf, 0.0)])
def test_padded_vocab_columns_are_left_out(beta, smooth_lambda):
    # The oracle sees only the real vocab; the padding gets no probability and no gradient.
    real = 29
    logits, ref, labels = _inputs(vocab=40, scale=3.0)
    labels = torch.where(labels >= real, labels % real, labels)
    loss, grad = _ours(logits, ref, labels, beta, smooth_lambda, vocab_size=real)
    expected_loss, expected_grad = _oracle(logits[..., :real], ref[..., :real], labels, beta,
                                           smooth_lambda)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad[..., :real].double(), expected_grad, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(grad[..., real:]) == 0
    labels.view(-1)[1] = real
    with pytest.raises(ValueError, match=f"label {real} is outside the vocab \\[0, {real}\\)"):
        vocab_parallel_gift_loss(logits, ref, labels, beta=beta, vocab_size=real)
    with pytest.raises(ValueError, match="vocab_size=41"):
        vocab_parallel_gift_loss(logits, ref, labels, beta=beta, vocab_size=41)


def test_the_engine_calls_the_loss_without_its_label_check(monkeypatch):
    """The label check reads labels on the host (a device sync on a GPU): the engine's loss
    skips it, since each data set's token ids are checked once when loaded; the loss is the
    same."""
    from megatron_gift.loss import gift as gift_loss
    from megatron_gift.loss.objectives import GiftLoss

    logits, ref, labels = _inputs(shape=(2, 6))
    checked = vocab_parallel_gift_loss(logits, ref, labels, beta=3.0).sum()

    def no_check(*args):
        raise AssertionError("the engine's loss checked its labels")

    monkeypatch.setattr(gift_loss, "_check_labels", no_check)
    batch = {"labels": labels, "loss_mask": torch.ones(labels.shape)}
    loss_sum, num_tokens, _ = GiftLoss(3.0, 0.0, 40)(logits, ref, batch)
    assert torch.equal(loss_sum, checked) and int(num_tokens) == labels.numel()
    with pytest.raises(AssertionError, match="checked its labels"):
        vocab_parallel_gift_loss(logits, ref, labels, beta=3.0)  # the default still checks


def _soft_sft_oracle(logits, ref, labels, weight, smooth_lambda=0.0, ignore_index=-100):
    """Soft SFT by its definition, float64 full vocab: q = (1 - w) onehot(y) + w p'."""
    z = logits.detach().double().requires_grad_()
    vocab = z.size(-1)
    valid = labels != ignore_index
    onehot = torch.nn.functional.one_hot(torch.where(valid, labels, 0), vocab).double()
    p_ref = (1 - smooth_lambda) * torch.softmax(ref.double(), -1) + smooth_lambda / vocab
    q = (1 - weight) * onehot + weight * p_ref
    loss = torch.where(valid, -(q * torch.log_softmax(z, -1)).sum(-1), 0.0)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape).double())
    return loss.detach(), z.grad, torch.where(valid, (q * onehot).sum(-1), 0.0)


@pytest.mark.parametrize("implementation", ["eager", "auto"])
@pytest.mark.parametrize("weight,smooth_lambda", [(0.0, 0.0), (0.07, 0.0), (0.5, 0.01),
                                                  (0.93, 0.3), (1.0, 0.0)])
def test_soft_sft_matches_its_oracle(weight, smooth_lambda, implementation):
    logits, ref, labels = _inputs()
    loss, stats = vocab_parallel_gift_loss(logits, ref, labels, beta=20.0,
                                           smooth_lambda=smooth_lambda, soft_sft_weight=weight,
                                           return_stats=True, implementation=implementation)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape))
    expected_loss, expected_grad, expected_q = _soft_sft_oracle(logits, ref, labels, weight,
                                                                smooth_lambda)
    torch.testing.assert_close(loss.detach().double(), expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.target_mass.double(), expected_q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 3.0, math.inf])
def test_soft_sft_limits_are_cross_entropy_and_distillation(beta):
    # w = 0 is plain cross-entropy and w = 1 is beta = 0, whatever beta is passed (unused).
    logits, ref, labels = _inputs()
    for weight, equal_to in ((0.0, math.inf), (1.0, 0.0)):
        got = vocab_parallel_gift_loss(logits, ref, labels, beta=beta, soft_sft_weight=weight)
        want = vocab_parallel_gift_loss(logits, ref, labels, beta=equal_to)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # ... and w = 0 needs no reference.
    vocab_parallel_gift_loss(logits, None, labels, beta=3.0, soft_sft_weight=0.0)


def test_soft_sft_weight_differs_from_gift_per_token_weight():
    # The control is not GIFT: one constant weight, not g = 1 / (1 + p (e^beta - 1)).
    logits, ref, labels = _inputs()
    gift = vocab_parallel_gift_loss(logits, ref, labels, beta=2.0)
    soft = vocab_parallel_gift_loss(logits, ref, labels, beta=2.0, soft_sft_weight=0.5)
    assert not torch.allclose(gift, soft)


@pytest.mark.parametrize("weight", [-0.1, 1.5, math.nan])
def test_soft_sft_weight_outside_the_unit_interval_raises(weight):
    logits, ref, labels = _inputs()
    with pytest.raises(ValueError, match="soft_sft_weight must be in"):
        vocab_parallel_gift_loss(logits, ref, labels, beta=1.0, soft_sft_weight=weight)
