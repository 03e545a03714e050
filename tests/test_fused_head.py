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


# --- the Triton passes over the tiles ----------------------------------------------------------

@pytest.mark.parametrize("beta,smooth_lambda", [(0.0, 0.0), (20.0, 0.3), (math.inf, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_tiles_match_the_oracle(beta, smooth_lambda, dtype):
    """implementation="triton": the loss's fused kernels over each chunk's tiles (here in
    Triton's interpreter), same results as the eager tiles and the oracle."""
    pytest.importorskip("triton")
    inputs = _inputs(dtype)
    for upstream in ("sum", "varying"):
        ours = _ours(*inputs, beta, smooth_lambda, _upstream(upstream), implementation="triton")
        eager = _ours(*inputs, beta, smooth_lambda, _upstream(upstream), implementation="eager")
        expected = _oracle(*inputs, beta, smooth_lambda, _upstream(upstream))
        torch.testing.assert_close(ours[0].double(), expected[0], **FP32_TOL)
        for got, want in zip(ours, eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_wrong_triton_tile_is_caught(monkeypatch):
    pytest.importorskip("triton")
    from megatron_gift.loss import triton_kernels

    real = triton_kernels.TritonPasses.soft_target_gap
    monkeypatch.setattr(triton_kernels.TritonPasses, "soft_target_gap",
                        lambda self, *args: real(self, *args) * 1.01)
    inputs = _inputs()
    ours = _ours(*inputs, 5.0, 0.0, implementation="triton")
    with pytest.raises(AssertionError):
        _assert_matches(ours, _oracle(*inputs, 5.0, 0.0))


# --- evaluation metrics without logits --------------------------------------------------------

def _metrics_oracle(h, w, labels, real):
    logits = (h.double() @ w.double().T)[:, :real]
    valid = labels != -100
    ce = torch.logsumexp(logits, -1) - logits.gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    first_max = (logits == logits.max(-1, keepdim=True).values).int().argmax(-1)  # lowest id
    return torch.where(valid, ce, 0.0), (first_max == labels) & valid


def _tied_inputs():
    """Inputs where some tokens' argmax is a tie between two vocab rows (lowest id wins) and
    where a padding row would win if it counted."""
    h, w, _, _, labels = _inputs()
    w[7] = w[3]  # rows 3 and 7 tie for every token
    w[REAL:] = 10 * w[3].abs().max()  # padding rows: the largest logits, never counted
    h[2] = w[3] * 5  # token 2's argmax is the 3/7 tie
    labels[2], labels[6] = 3, 7
    return h, w, labels


def test_the_metrics_equal_full_vocab_cross_entropy_and_argmax():
    h, w, labels = _tied_inputs()
    for chunk in (1, CHUNK, None):
        ce, correct = fused_head.fused_next_token_metrics(h, w, labels, vocab_size=REAL,
                                                          chunk_tokens=chunk)
        want_ce, want_correct = _metrics_oracle(h, w, labels, REAL)
        torch.testing.assert_close(ce.double(), want_ce, **FP32_TOL)
        assert torch.equal(correct, want_correct) and bool(correct[2])


def test_the_metrics_count_padding_rows_only_in_a_planted_bug():
    h, w, labels = _tied_inputs()
    ce, correct = fused_head.fused_next_token_metrics(h, w, labels)  # padding counted
    want_ce, want_correct = _metrics_oracle(h, w, labels, REAL)
    assert not torch.allclose(ce.double(), want_ce) and not torch.equal(correct, want_correct)


# --- gradient-accumulation fusion -------------------------------------------------------------

def test_the_weight_gradient_goes_into_main_grad_in_fp32():
    h, w, h_ref, w_ref, labels = _inputs(torch.bfloat16)
    expected = _oracle(h, w, h_ref, w_ref, labels, 20.0, 0.3)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    ww.main_grad = torch.full(w.shape, 0.5, dtype=torch.float32)  # an earlier micro-batch's
    ww.grad_added_to_main_grad = False
    loss = fused_gift_head_loss(hh, ww, labels, h_ref, w_ref, beta=20.0, smooth_lambda=0.3,
                                vocab_size=REAL, chunk_tokens=CHUNK,
                                accumulate_into_main_grad=True)
    loss.sum().backward()
    assert ww.grad_added_to_main_grad and torch.count_nonzero(ww.grad) == 0
    # fp32 all the way into main_grad: far closer than one bf16 rounding of the gradient.
    torch.testing.assert_close(ww.main_grad.double() - 0.5, expected[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hh.grad.double(), expected[1], rtol=2**-8, atol=1e-3)


def test_accumulation_into_main_grad_needs_one():
    h, w, h_ref, w_ref, labels = _inputs()
    with pytest.raises(ValueError, match="main_grad"):
        fused_gift_head_loss(h, w.requires_grad_(), labels, h_ref, w_ref, beta=5.0,
                             accumulate_into_main_grad=True)


def test_megatron_ddp_gets_each_micro_batchs_weight_gradient_once(world_of_one, monkeypatch):
    """Megatron-Core's DDP (its gradient buffer and backward hook) over two micro-batches, with
    the head returning the gradient and with the head adding it into main_grad: the same
    main_grad, the sum of the two micro-batches' oracle gradients. A head that adds into
    main_grad without telling the hook (the gradient counted twice) fails."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_gift.platform.cpu import enable_cpu_megatron

    enable_cpu_megatron()  # where CUDA is absent: Megatron's buffers on the CPU
    weight = _inputs(seed=1)[1]
    micro_batches = [(h, weight, h_ref, w_ref, labels)
                     for h, _, h_ref, w_ref, labels in (_inputs(seed=s) for s in (1, 2))]
    want = sum(_oracle(*m, 5.0, 0.0)[2] for m in micro_batches)

    def main_grad(accumulate: bool) -> torch.Tensor:
        torch.manual_seed(0)
        module = torch.nn.Linear(H, V, bias=False)
        module.weight.data.copy_(weight)
        config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True), module)
        ddp.zero_grad_buffer()
        param = ddp.module.weight
        for h, _, h_ref, w_ref, labels in micro_batches:
            fused_gift_head_loss(h, param, labels, h_ref, w_ref, beta=5.0, vocab_size=REAL,
                                 chunk_tokens=CHUNK,
                                 accumulate_into_main_grad=accumulate).sum().backward()
        return param.main_grad.double().clone()

    torch.testing.assert_close(main_grad(False), want, **FP32_TOL)
    torch.testing.assert_close(main_grad(True), want, **FP32_TOL)
    monkeypatch.setattr(fused_head, "_add_to_main_grad",
                        lambda weight, grad: (weight.main_grad.add_(grad), grad)[1])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(main_grad(True), want, **FP32_TOL)


# --- low-precision GEMMs (CUDA) ---------------------------------------------------------------

def test_the_low_precision_gemm_path_takes_the_weights_as_they_are(monkeypatch):
    """CUDA's ``out_dtype`` GEMMs (bf16 in, fp32 accumulation and out), emulated on CPU by
    their definition: the weights enter uncopied, the tile is rounded to bf16 for the gradient
    GEMMs (as the logits path rounds the logits' gradient), the result is within one bf16
    rounding of the oracle."""
    def mm_out_dtype(a, b, dtype):
        assert a.dtype == b.dtype == torch.bfloat16 and dtype == torch.float32
        return a.float() @ b.float()

    def addmm_out_dtype(acc, a, b, dtype, out):
        assert a.dtype == b.dtype == torch.bfloat16 and out is acc
        return acc.add_(a.float() @ b.float())

    monkeypatch.setattr(fused_head, "_MM_OUT_DTYPE", mm_out_dtype)
    monkeypatch.setattr(fused_head, "_ADDMM_OUT_DTYPE", addmm_out_dtype)
    monkeypatch.setattr(fused_head, "_multiplies_in_low_precision",
                        lambda weight, dtype: weight.dtype == torch.bfloat16)
    inputs = _inputs(torch.bfloat16)
    assert fused_head._gemm_operand(inputs[1], torch.float32) is inputs[1]
    for upstream in ("sum", "varying"):  # the saved sum and the recomputed weight gradient
        ours = _ours(*inputs, 20.0, 0.3, _upstream(upstream))
        expected = _oracle(*inputs, 20.0, 0.3, _upstream(upstream))
        torch.testing.assert_close(ours[0].double(), expected[0], **FP32_TOL)
        # Each element of the tile rounded to bf16 (relative 2^-9), then summed in fp32: the
        # error of dW[v] = sum_t G[t, v] h[t] is at most 2^-9 sum_t |G[t, v] h[t]|, likewise dh;
        # then one rounding of the result to bf16 (2^-9 of it).
        tile = _oracle_tile(*inputs, 20.0, 0.3, _upstream(upstream)).abs()
        h, w = inputs[0].double().abs(), inputs[1].double().abs()
        for got, want, scale in ((ours[1], expected[1], tile @ w), (ours[2], expected[2], tile.T @ h)):
            bound = 2**-8 * (scale + want.abs()) + 1e-6
            assert torch.all((got.double() - want).abs() <= bound)


def _oracle_tile(h, w, h_ref, w_ref, labels, beta, smooth_lambda, upstream=None, real=REAL):
    """The float64 gradient of the loss by the logits ``[T, V]`` (padding columns 0)."""
    logits = (h.double() @ w.double().T).requires_grad_()
    ref = (h_ref.double() @ w_ref.double().T)[:, :real]
    loss = gift_loss_full_vocab(logits[:, :real], ref, labels, beta, smooth_lambda)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.double())
    return logits.grad


# --- TP = 2: the metrics, and the hidden gradient left to a sequence-parallel gather ----------

def _tp2_metrics_and_unreduced_gradient(want_ce, want_correct, want_hidden_grad):
    from megatron.core import parallel_state

    with model_parallel(tp=2):
        rank = parallel_state.get_tensor_model_parallel_rank()
        rows = slice(rank * V // 2, (rank + 1) * V // 2)
        h, w, labels = _tied_inputs()
        ce, correct = fused_head.fused_next_token_metrics(h, w[rows], labels, vocab_size=REAL,
                                                          chunk_tokens=CHUNK)
        torch.testing.assert_close(ce.double(), want_ce, **FP32_TOL)
        assert torch.equal(correct, want_correct)
        # Unreduced: this rank's share; the two shares sum to the whole (what the
        # reduce-scatter of Megatron's sequence-parallel gather does on the way back).
        h, w, h_ref, w_ref, labels = _inputs(seed=4)
        hh = h.clone().requires_grad_()
        fused_gift_head_loss(hh, w[rows].clone().requires_grad_(), labels, h_ref, w_ref[rows],
                             beta=5.0, vocab_size=REAL, chunk_tokens=CHUNK,
                             reduce_hidden_grad=False).sum().backward()
        total = hh.grad.clone()
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        assert not torch.allclose(hh.grad, want_hidden_grad, rtol=1e-3)  # a share, not all
        torch.testing.assert_close(total, want_hidden_grad, rtol=1e-5, atol=1e-6)
        # The Triton tiles where rank 1's shard is all padding (real vocab 17 of 40).
        h, w, h_ref, w_ref, labels = _inputs(seed=4, real=17)
        loss = fused_gift_head_loss(h, w[rows], labels, h_ref, w_ref[rows], beta=5.0,
                                    vocab_size=17, chunk_tokens=CHUNK, implementation="triton")
        want = fused_gift_head_loss(h, w, labels, h_ref, w_ref, beta=5.0, vocab_size=17,
                                    chunk_tokens=CHUNK, group=None)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_tp2_metrics_and_the_unreduced_hidden_gradient():
    h, w, labels = _tied_inputs()
    want_ce, want_correct = _metrics_oracle(h, w, labels, REAL)
    want_hidden_grad = _ours(*_inputs(seed=4), 5.0, 0.0)[1]
    run_distributed(2, _tp2_metrics_and_unreduced_gradient, want_ce, want_correct,
                    want_hidden_grad)
