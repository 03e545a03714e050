"""vocab_parallel_gift_loss at TP = 2 (two gloo ranks, vocab sharded as in Megatron-Core)
against the full-vocab oracle and Megatron's own vocab-parallel cross-entropy."""

import math

import pytest
import torch
import torch.distributed as dist

from megatron_gift.loss import vocab_parallel_gift_loss
from megatron_gift.loss.reference import gift_loss_full_vocab, gift_stats_full_vocab
from support.parallel_harness import model_parallel, run_distributed

pytestmark = [pytest.mark.distributed]

TP, VOCAB = 2, 48


def _full_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(6, 2, VOCAB, generator=g)).to(dtype)
    ref = (3 * torch.randn(6, 2, VOCAB, generator=g)).to(dtype)
    labels = torch.randint(0, VOCAB, (6, 2), generator=g)
    labels[0] = -100
    # Labels on both shards, including the shard edges.
    labels[1, 0], labels[1, 1], labels[2, 0] = VOCAB // 2 - 1, VOCAB // 2, VOCAB - 1
    return logits, ref, labels


def _shard(x):
    from megatron.core import parallel_state

    return x.chunk(TP, -1)[parallel_state.get_tensor_model_parallel_rank()]


class _CollectiveCounter:
    """Counts calls of torch.distributed collectives while active."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter")

    def __enter__(self):
        self.calls, self.saved = [], {n: getattr(dist, n) for n in self.NAMES}
        for name, fn in self.saved.items():
            setattr(dist, name, self._counting(name, fn))
        return self

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls.append((name, str(kwargs.get("op", ""))))
            return fn(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _compare_with_oracle():
    cases = [(b, lam, dt) for dt in (torch.float32, torch.bfloat16)
             for b, lam in [(0.0, 0.0), (0.0, 0.05), (1.0, 0.3), (20.0, 0.0), (20.0, 0.01),
                            (7.0, 1.0), (1e4, 0.0), (math.inf, 0.0)]]
    with model_parallel(tp=TP):
        for beta, smooth_lambda, dtype in cases:
            case = f"beta={beta} lambda={smooth_lambda} {dtype}"
            logits, ref, labels = _full_inputs(dtype)
            local = _shard(logits).clone().requires_grad_()
            weights = torch.linspace(0.5, 1.5, labels.numel()).view(labels.shape)
            with _CollectiveCounter() as forward:
                loss, stats = vocab_parallel_gift_loss(local, _shard(ref), labels, beta=beta,
                                                       smooth_lambda=smooth_lambda,
                                                       return_stats=True)
            with _CollectiveCounter() as backward:
                loss.backward(weights)
            assert len(forward.calls) <= 2 and backward.calls == [], (case, forward.calls,
                                                                      backward.calls)

            full = logits.double().requires_grad_()
            expected = gift_loss_full_vocab(full, ref, labels, beta, smooth_lambda)
            expected.backward(weights.double())
            torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5,
                                       msg=case)
            grad_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(local.grad.double(), _shard(full.grad), **grad_tol, msg=case)

            for got, want in zip(stats, gift_stats_full_vocab(logits, ref, labels, beta,
                                                               smooth_lambda)):
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=case)

            everyone = [torch.empty_like(loss) for _ in range(TP)]
            dist.all_gather(everyone, loss.detach())
            assert all(torch.equal(everyone[0], x) for x in everyone), case


def _compare_with_megatron_cross_entropy():
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    with model_parallel(tp=TP):
        for beta in (math.inf, 1e4):
            logits, ref, labels = _full_inputs(torch.float32, seed=1)
            labels = labels.clamp(min=0)
            ours_in = _shard(logits).clone().requires_grad_()
            theirs_in = _shard(logits).clone().requires_grad_()
            ours = vocab_parallel_gift_loss(ours_in, _shard(ref), labels, beta=beta)
            theirs = vocab_parallel_cross_entropy(theirs_in * 1.0, labels)
            ours.sum().backward()
            theirs.sum().backward()
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-7)


def _explicit_group_and_bad_label():
    with model_parallel(tp=TP):
        from megatron.core import parallel_state

        logits, ref, labels = _full_inputs(torch.float32)
        group = parallel_state.get_tensor_model_parallel_group()
        default = vocab_parallel_gift_loss(_shard(logits), _shard(ref), labels, beta=2.0)
        explicit = vocab_parallel_gift_loss(_shard(logits), _shard(ref), labels, beta=2.0,
                                            tp_group=group)
        assert torch.equal(default, explicit)
        labels[3, 1] = VOCAB  # valid on no shard: the global vocab is checked, not the local one
        try:
            vocab_parallel_gift_loss(_shard(logits), _shard(ref), labels, beta=2.0)
        except ValueError as error:
            assert f"label {VOCAB} is outside the vocab [0, {VOCAB})" in str(error)
        else:
            raise AssertionError("label == V was accepted")


def _padded_vocab():
    # 30: the second shard (columns 24..47) holds 6 real columns; 20: it holds none.
    with model_parallel(tp=TP):
        for real in (30, 20):
            for beta, smooth_lambda in [(20.0, 0.0), (2.0, 0.1), (math.inf, 0.0)]:
                logits, ref, labels = _full_inputs(torch.float32)
                labels = torch.where(labels >= real, labels % real, labels)
                local = _shard(logits).clone().requires_grad_()
                loss = vocab_parallel_gift_loss(local, _shard(ref), labels, beta=beta,
                                                smooth_lambda=smooth_lambda, vocab_size=real)
                loss.sum().backward()
                full = logits[..., :real].double().requires_grad_()
                expected = gift_loss_full_vocab(full, ref[..., :real], labels, beta, smooth_lambda)
                expected.sum().backward()
                torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
                padded_grad = torch.cat([full.grad, full.grad.new_zeros(6, 2, VOCAB - real)], -1)
                torch.testing.assert_close(local.grad.double(), _shard(padded_grad), rtol=1e-5,
                                           atol=1e-6)


def test_tp2_padded_vocab_matches_oracle_on_the_real_vocab():
    run_distributed(TP, _padded_vocab)


def test_tp2_matches_full_vocab_oracle():
    run_distributed(TP, _compare_with_oracle)


def test_tp2_large_beta_is_megatron_cross_entropy():
    run_distributed(TP, _compare_with_megatron_cross_entropy)


def test_tp2_default_group_and_global_label_check():
    run_distributed(TP, _explicit_group_and_bad_label)


def _soft_sft_against_oracle():
    with model_parallel(tp=TP):
        for weight, smooth_lambda in ((0.3, 0.0), (0.8, 0.05)):
            logits, ref, labels = _full_inputs(torch.float32, seed=2)
            local = _shard(logits).clone().requires_grad_()
            loss = vocab_parallel_gift_loss(local, _shard(ref), labels, beta=20.0,
                                            smooth_lambda=smooth_lambda, soft_sft_weight=weight)
            loss.sum().backward()
            full = logits.double().requires_grad_()
            valid = labels != -100
            onehot = torch.nn.functional.one_hot(torch.where(valid, labels, 0), VOCAB).double()
            p_ref = (1 - smooth_lambda) * torch.softmax(ref.double(), -1) + smooth_lambda / VOCAB
            q = (1 - weight) * onehot + weight * p_ref  # soft SFT by its definition
            expected = torch.where(valid, -(q * torch.log_softmax(full, -1)).sum(-1), 0.0)
            expected.sum().backward()
            torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(local.grad.double(), _shard(full.grad), rtol=1e-5,
                                       atol=1e-6)


def test_tp2_soft_sft_matches_full_vocab_oracle():
    run_distributed(TP, _soft_sft_against_oracle)
