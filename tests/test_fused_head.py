"""fused_gift_head_loss (output layer + GIFT loss, chunked, gradient in the forward) against the
float64 full-vocab oracle on materialised logits, against vocab_parallel_gift_loss, and at
TP = 2 against TP = 1."""

import math

import pytest
import torch
import torch.distributed as dist

from megatron_gift.loss import fused_head, vocab_parallel_gift_loss
from megatron_gift.loss.fused_head import fused_gift_head_loss
from megatron_gift.loss.reference import gift_loss_full_vocab
from support.parallel_harness import model_parallel, run_distributed

BETAS = [0.0, 5.0, 20.0, math.inf]
LAMBDAS = [0.0, 0.3]
T, H, H_REF, V, REAL, CHUNK = 13, 8, 6, 40, 33, 5  # CHUNK < T and does not divide it
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


def _inputs(dtype=torch.float32, seed=0, tokens=T, vocab=V, real=REAL):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, H, generator=g).to(dtype)
    w = torch.randn(vocab, H, generator=g).to(dtype)
    h_ref = torch.randn(tokens, H_REF, generator=g).to(dtype)
    w_ref = torch.randn(vocab, H_REF, generator=g).to(dtype)
    labels = torch.randint(0, real, (tokens,), generator=g)
    labels[::4] = -100
    labels[1] = real - 1  # the last real row
    return h, w, h_ref, w_ref, labels


def _upstream(kind, tokens=T):
    """None: ``loss.sum().backward()`` (an expanded scalar); else a per-token gradient."""
    return {"sum": None, "uniform": torch.full((tokens,), 0.7),
            "varying": torch.linspace(0.5, 1.5, tokens)}[kind]


def _backward(loss, upstream):
    if upstream is None:
        loss.sum().backward()
    else:
        loss.backward(upstream)


def _ours(h, w, h_ref, w_ref, labels, beta, smooth_lambda, upstream=None, real=REAL,
          chunk=CHUNK, **kwargs):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_gift_head_loss(h, w, labels, h_ref, w_ref, beta=beta,
                                smooth_lambda=smooth_lambda, vocab_size=real,
                                chunk_tokens=chunk, **kwargs)
    _backward(loss, upstream)
    return loss.detach(), h.grad, w.grad


def _oracle(h, w, h_ref, w_ref, labels, beta, smooth_lambda, upstream=None, real=REAL):
    """float64 loss and autograd gradients of the definition on the real vocab's logits."""
    h, w = h.double().requires_grad_(), w.double().requires_grad_()
    ref = (h_ref.double() @ w_ref.double().T)[:, :real]
    loss = gift_loss_full_vocab((h @ w.T)[:, :real], ref, labels, beta, smooth_lambda)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.double())
    return loss.detach(), h.grad, w.grad


def _assert_matches(ours, expected, tol=FP32_TOL, msg=""):
    for name, got, want in zip(("loss", "grad_hidden", "grad_weight"), ours, expected):
        torch.testing.assert_close(got.double(), want, **tol,
                                   msg=lambda text, name=name: f"{name} {msg}: {text}")


@pytest.mark.parametrize("upstream", ["sum", "uniform", "varying"])
@pytest.mark.parametrize("smooth_lambda", LAMBDAS)
@pytest.mark.parametrize("beta", BETAS)
def test_fp32_matches_oracle(beta, smooth_lambda, upstream):
    # Padded vocab (rows 33..39), ignored tokens, 3 chunks of 5, 5, 3 tokens; "varying" takes
    # the backward's recompute path for the weight.
    inputs = _inputs()
    ours = _ours(*inputs, beta, smooth_lambda, _upstream(upstream))
    expected = _oracle(*inputs, beta, smooth_lambda, _upstream(upstream))
    _assert_matches(ours, expected)
    ignored = inputs[-1] == -100
    assert torch.all(ours[0][ignored] == 0) and torch.all(ours[1][ignored] == 0)
    assert torch.count_nonzero(ours[2][REAL:]) == 0  # padding rows: no gradient


@pytest.mark.parametrize("beta,smooth_lambda", [(0.0, 0.0), (20.0, 0.3), (math.inf, 0.0)])
def test_bf16_inputs_match_oracle_within_one_rounding(beta, smooth_lambda):
    inputs = _inputs(torch.bfloat16)
    ours = _ours(*inputs, beta, smooth_lambda, _upstream("varying"))
    expected = _oracle(*inputs, beta, smooth_lambda, _upstream("varying"))
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0].double(), expected[0], **FP32_TOL)  # loss: fp32 math
    bf16 = dict(rtol=2**-8, atol=1e-3)  # the gradients' one rounding to bf16
    torch.testing.assert_close(ours[1].double(), expected[1], **bf16)
    torch.testing.assert_close(ours[2].double(), expected[2], **bf16)


@pytest.mark.parametrize("chunk", [1, 4, T, 64])
def test_chunk_size_does_not_change_the_result(chunk):
    inputs = _inputs(seed=3)
    ours = _ours(*inputs, 5.0, 0.3, _upstream("varying"), chunk=chunk)
    _assert_matches(ours, _oracle(*inputs, 5.0, 0.3, _upstream("varying")))


@pytest.mark.parametrize("upstream", ["sum", "varying"])
@pytest.mark.parametrize("beta,smooth_lambda", [(0.0, 0.0), (5.0, 0.3), (math.inf, 0.0)])
def test_equals_vocab_parallel_gift_loss_on_materialised_logits(beta, smooth_lambda, upstream):
    h, w, h_ref, w_ref, labels = _inputs(seed=1)
    ours = _ours(h, w, h_ref, w_ref, labels, beta, smooth_lambda, _upstream(upstream))
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    today = vocab_parallel_gift_loss(hh @ ww.T, h_ref @ w_ref.T, labels, beta=beta,
                                     smooth_lambda=smooth_lambda, vocab_size=REAL,
                                     tp_group=None, implementation="eager")
    _backward(today, _upstream(upstream))
    torch.testing.assert_close(ours[0], today.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], hh.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[2], ww.grad, rtol=1e-5, atol=1e-6)


def _tail_case():
    """The reference gives each label e^-114 (3e-50: 0 in fp32): W_ref = I makes r = h_ref."""
    vocab, beta = 50, 114.0
    h, w, _, _, labels = _inputs(vocab=vocab, real=vocab, seed=2)
    h_ref = torch.zeros(T, vocab)
    h_ref[torch.arange(T), labels.clamp(min=0)] = -110.0
    w_ref = torch.eye(vocab)
    assert torch.softmax(h_ref, -1)[0, labels[0].clamp(min=0)] == 0  # fp32 really underflows
    ours = _ours(h, w, h_ref, w_ref, labels, beta, 0.0, real=vocab)
    expected = _oracle(h, w, h_ref, w_ref, labels, beta, 0.0, real=vocab)
    _assert_matches(ours, expected)
    sft = fused_gift_head_loss(h, w, labels, beta=math.inf)
    valid = labels != -100
    assert ((ours[0] - sft)[valid].abs() > 1e-2).all()  # GIFT departs from SFT exactly here


def test_reference_tail_is_exact():
    _tail_case()


def test_planted_bug_dropping_the_reference_tail_is_caught(monkeypatch):
    # The bug: q's weights from the reference's probability p formed in fp32, as a filter of the
    # tail would; p = e^-114 underflows to 0 and the label's Gibbs boost disappears.
    def gibbs_weight_in_probability_space(t, log_sum_exp_z, beta, smooth_lambda, vocab):
        g, log_p, ce_ref = original(t, log_sum_exp_z, beta, smooth_lambda, vocab)
        p = torch.exp(log_p.float())
        return 1 / (1 + p * math.expm1(min(beta, 80.0))), log_p, ce_ref

    original = fused_head._gibbs_weight
    monkeypatch.setattr(fused_head, "_gibbs_weight", gibbs_weight_in_probability_space)
    with pytest.raises(AssertionError):
        _tail_case()


def test_nothing_of_size_tokens_by_vocab_is_saved():
    tokens = 64  # T * V = 2560 > V * H = 320 and T * H = 512
    h, w, h_ref, w_ref, labels = _inputs(tokens=tokens)
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fused_gift_head_loss(h.requires_grad_(), w.requires_grad_(), labels, h_ref,
                                    w_ref, beta=5.0, vocab_size=REAL, chunk_tokens=16)
    loss.sum().backward()
    assert sizes and max(sizes) < tokens * V // 2, sizes


def test_reference_gets_no_grad_and_inputs_are_not_modified():
    h, w, h_ref, w_ref, labels = _inputs()
    copies = [x.clone() for x in (h, w, h_ref, w_ref, labels)]
    h_ref.requires_grad_()
    _ours(h, w, h_ref, w_ref, labels, 5.0, 0.3)
    assert h_ref.grad is None
    for x, copy in zip((h, w, h_ref, w_ref, labels), copies):
        assert torch.equal(x.detach(), copy)


def test_batched_layout_matches_flat():
    h, w, h_ref, w_ref, labels = _inputs(tokens=12)
    flat = fused_gift_head_loss(h, w, labels, h_ref, w_ref, beta=5.0, chunk_tokens=5)
    shaped = fused_gift_head_loss(h.view(6, 2, H), w, labels.view(6, 2), h_ref.view(6, 2, H_REF),
                                  w_ref, beta=5.0, chunk_tokens=5)
    assert shaped.shape == (6, 2) and torch.equal(shaped.reshape(-1), flat)


def test_bad_arguments_raise():
    h, w, h_ref, w_ref, labels = _inputs()
    with pytest.raises(ValueError, match="required for finite beta"):
        fused_gift_head_loss(h, w, labels, beta=1.0)
    with pytest.raises(ValueError, match="must be \\[V/tp, H\\]"):
        fused_gift_head_loss(h, w[:, :3], labels, beta=math.inf)
    with pytest.raises(ValueError, match="reference shapes"):
        fused_gift_head_loss(h, w, labels, h_ref, w_ref[:5], beta=1.0)
    with pytest.raises(ValueError, match="vocab_size=41"):
        fused_gift_head_loss(h, w, labels, beta=math.inf, vocab_size=41)
    with pytest.raises(ValueError, match="label 33 is outside"):
        fused_gift_head_loss(h, w, torch.full_like(labels, 33), beta=math.inf, vocab_size=REAL)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_gift_head_loss(h, w, labels, beta=math.inf, chunk_tokens=0)


# --- TP = 2 ---------------------------------------------------------------------------------

TP_CASES = [(beta, smooth_lambda, real, upstream) for real in (REAL, 17)  # 17: rank 1 all padding
            for beta, smooth_lambda in [(0.0, 0.0), (5.0, 0.3), (20.0, 0.0), (math.inf, 0.0)]
            for upstream in ("sum", "varying")]


def _tp1_results():
    results = []
    for beta, smooth_lambda, real, upstream in TP_CASES:
        inputs = _inputs(seed=4, real=real)
        results.append(_ours(*inputs, beta, smooth_lambda, _upstream(upstream), real=real))
    return results


class _AllReduceCounter:
    def __enter__(self):
        self.calls, self.saved = [], dist.all_reduce

        def counting(tensor, *args, **kwargs):
            self.calls.append((tuple(tensor.shape), str(kwargs.get("op"))))
            return self.saved(tensor, *args, **kwargs)
        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self.saved


def _tp2_matches_tp1(expected):
    from megatron.core import parallel_state

    with model_parallel(tp=2):
        rank = parallel_state.get_tensor_model_parallel_rank()
        rows = slice(rank * V // 2, (rank + 1) * V // 2)  # Megatron's output-layer split
        for (beta, smooth_lambda, real, upstream), want in zip(TP_CASES, expected):
            case = f"beta={beta} lambda={smooth_lambda} real={real} {upstream}"
            h, w, h_ref, w_ref, labels = _inputs(seed=4, real=real)
            hh, ww = h.clone().requires_grad_(), w[rows].clone().requires_grad_()
            with _AllReduceCounter() as forward:
                loss = fused_gift_head_loss(hh, ww, labels, h_ref, w_ref[rows], beta=beta,
                                            smooth_lambda=smooth_lambda, vocab_size=real,
                                            chunk_tokens=CHUNK)
            with _AllReduceCounter() as backward:
                _backward(loss, _upstream(upstream))
            chunks = math.ceil(T / CHUNK)
            assert len(forward.calls) == 2 * chunks + 1 and backward.calls == [], (
                case, forward.calls, backward.calls)
            torch.testing.assert_close(loss, want[0], rtol=1e-6, atol=1e-6, msg=case)
            torch.testing.assert_close(hh.grad, want[1], rtol=1e-5, atol=1e-6, msg=case)
            torch.testing.assert_close(ww.grad, want[2][rows], rtol=1e-5, atol=1e-6, msg=case)


@pytest.mark.distributed
def test_tp2_matches_tp1():
    run_distributed(2, _tp2_matches_tp1, _tp1_results())
