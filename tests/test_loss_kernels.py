"""The fused Triton passes of the GIFT loss against the float64 full-vocab oracle and the eager
passes: on a GPU where there is one, else on CPU in Triton's interpreter (``TRITON_INTERPRET=1``,
which conftest.py sets on machines without CUDA); which implementation ``auto`` picks, and the
refusal of one that cannot run."""

import math
import os

import pytest
import torch

from megatron_gift.loss import vocab_parallel_gift_loss
from megatron_gift.loss.reference import gift_loss_full_vocab, gift_stats_full_vocab
from support.parallel_harness import run_distributed

pytest.importorskip("triton")

CASES = [(0.0, 0.0), (0.5, 0.01), (5.0, 0.3), (20.0, 0.0), (20.0, 0.01), (1e4, 1.0),
         (math.inf, 0.0)]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def interpreted():
    """The kernels run here: on the GPU, or on CPU under Triton's interpreter."""
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and TRITON_INTERPRET=1 was not set before Triton was imported")


def _inputs(shape=(5, 3), vocab=40, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g)).to(device, dtype)
    ref = (3 * torch.randn(*shape, vocab, generator=g)).to(device, dtype)
    labels = torch.randint(0, vocab, shape, generator=g).to(device)
    labels.view(-1)[::4] = -100
    return logits, ref, labels


def _run(implementation, logits, ref, labels, beta, smooth_lambda, **kwargs):
    x = logits.clone().requires_grad_()
    loss, stats = vocab_parallel_gift_loss(x, ref, labels, beta=beta, smooth_lambda=smooth_lambda,
                                           implementation=implementation, return_stats=True,
                                           **kwargs)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=loss.device).view(loss.shape))
    return loss.detach().cpu(), x.grad.cpu(), tuple(s.cpu() for s in stats)


def _oracle(logits, ref, labels, beta, smooth_lambda):
    logits, ref, labels = logits.cpu(), ref.cpu(), labels.cpu()
    x = logits.double().requires_grad_()
    loss = gift_loss_full_vocab(x, ref, labels, beta, smooth_lambda)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape).double())
    return loss.detach(), x.grad, gift_stats_full_vocab(logits, ref, labels, beta, smooth_lambda)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta,smooth_lambda", CASES)
def test_triton_passes_match_the_oracle(interpreted, beta, smooth_lambda, dtype):
    logits, ref, labels = _inputs(dtype=dtype)
    loss, grad, stats = _run("triton", logits, ref, labels, beta, smooth_lambda)
    want_loss, want_grad, want_stats = _oracle(logits, ref, labels, beta, smooth_lambda)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    # bf16 gradients carry bf16 rounding (values up to 1.5: one ulp is 2^-7).
    grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=8e-3)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), want_grad, **grad_tol)
    for got, want in zip(stats, want_stats):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_triton_and_eager_agree_on_the_reference_tail(interpreted):
    """Labels the reference gives ~1e-30 to 1e-3: where GIFT departs from SFT at beta = 20."""
    logits, ref, labels = _inputs(shape=(64,), vocab=256, seed=1)
    owned = labels.clamp(min=0)
    ref[torch.arange(64, device=ref.device), owned] = (
        ref.amax(-1) - torch.linspace(5.0, 70.0, 64, device=ref.device))
    for beta in (20.0, 50.0):
        eager, triton = (_run(impl, logits, ref, labels, beta, 0.0)
                         for impl in ("eager", "triton"))
        want = _oracle(logits, ref, labels, beta, 0.0)
        torch.testing.assert_close(triton[0].double(), want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(triton[2][1], eager[2][1], rtol=1e-5,  # q(y)
                                   atol=1e-6)
        torch.testing.assert_close(triton[1], eager[1], rtol=1e-5, atol=1e-6)


def test_triton_padded_vocab_and_blocks(interpreted, monkeypatch):
    """A vocab padded past ``vocab_size`` (padding gets zero gradient), rows longer than one
    block (the kernels' loop), and a label in the last block."""
    from megatron_gift.loss import triton_kernels

    monkeypatch.setattr(triton_kernels, "_MAX_BLOCK", 16)
    logits, ref, labels = _inputs(shape=(3, 2), vocab=72, seed=2)
    real = 61
    labels = torch.where(labels >= real, labels % real, labels)
    labels[0, 0] = real - 1
    for beta, smooth_lambda in [(20.0, 0.0), (2.0, 0.1), (math.inf, 0.0)]:
        loss, grad, _ = _run("triton", logits, ref, labels, beta, smooth_lambda, vocab_size=real)
        want_loss, want_grad, _ = _oracle(logits[..., :real], ref[..., :real], labels, beta,
                                          smooth_lambda)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad[..., :real].double(), want_grad, rtol=1e-5, atol=1e-6)
        assert torch.equal(grad[..., real:], torch.zeros_like(grad[..., real:]))


def test_triton_reads_strided_logits_and_mixed_dtypes(interpreted):
    """``[b, s, V]`` logits seen as ``[s, b, V]`` (a transposed view), an fp32 reference beside
    bf16 student logits: the same loss as contiguous copies."""
    logits, ref, labels = _inputs(shape=(3, 5), dtype=torch.bfloat16, seed=3)
    view, ref_view, labels_view = logits.transpose(0, 1), ref.float().transpose(0, 1), labels.t()
    loss, grad, _ = _run("triton", view, ref_view, labels_view, 20.0, 0.01)
    want_loss, want_grad, _ = _run("eager", view.contiguous(), ref_view.contiguous(),
                                   labels_view.contiguous(), 20.0, 0.01)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=0, atol=8e-3)


def test_auto_picks_eager_on_cpu_and_triton_is_refused_where_it_cannot_run(monkeypatch):
    from megatron_gift.loss import passes

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, ref, labels = _inputs(device="cpu")
    assert passes.select("auto", logits).name == "eager"
    with pytest.raises(ValueError, match="implementation='triton' cannot run here: tensors are "
                                         "on cpu, and the Triton kernels need CUDA"):
        vocab_parallel_gift_loss(logits, ref, labels, beta=20.0, implementation="triton")
    with pytest.raises(ValueError, match="implementation='fused': choose one of"):
        vocab_parallel_gift_loss(logits, ref, labels, beta=20.0, implementation="fused")


def test_fp64_logits_stay_eager_under_auto(interpreted):
    from megatron_gift.loss import passes

    logits, ref, labels = _inputs(dtype=torch.float64)
    assert passes.select("auto", logits.float()).name == ("triton" if DEVICE.type == "cuda"
                                                          else "eager")
    assert passes.select("triton", logits.float()).name == "triton"
    assert passes.select("auto", logits).name == "eager"
    with pytest.raises(ValueError, match="take fp32/bf16/fp16 logits, not torch.float64"):
        passes.select("triton", logits)


def _tp2_triton_matches_the_oracle():
    from megatron.core import parallel_state
    from support.parallel_harness import model_parallel

    with model_parallel(tp=2):
        rank = parallel_state.get_tensor_model_parallel_rank()
        for real in (48, 30, 20):  # 20: the second shard is all padding
            logits, ref, labels = _inputs(shape=(4, 2), vocab=48, seed=4, device="cpu")
            labels = torch.where(labels >= real, labels % real, labels)
            local = logits.chunk(2, -1)[rank]
            loss, grad, _ = _run("triton", local, ref.chunk(2, -1)[rank], labels, 20.0, 0.01,
                                 vocab_size=real)
            want_loss, want_grad, _ = _oracle(logits[..., :real], ref[..., :real], labels, 20.0,
                                              0.01)
            padded = torch.cat([want_grad, want_grad.new_zeros(4, 2, 48 - real)], -1)
            torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad.double(), padded.chunk(2, -1)[rank], rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.distributed
def test_tp2_triton_matches_the_oracle_under_the_interpreter():
    """Two gloo ranks on CPU tensors: the kernels under Triton's interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels on CPU tensors: needs TRITON_INTERPRET=1")
    run_distributed(2, _tp2_triton_matches_the_oracle)
