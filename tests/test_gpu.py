"""On a CUDA GPU: the loss against the float64 oracle, in fp32 and bf16.
Skipped, with the reason, where there is no GPU (see conftest.py)."""

import math

import pytest
import torch

from megatron_gift.loss import vocab_parallel_gift_loss
from megatron_gift.loss.reference import gift_loss_full_vocab

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("beta", [0.0, 20.0, math.inf])
def test_loss_on_the_gpu_matches_the_oracle(dtype, tolerance, beta):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(64, 2, 1000, generator=g)).to(dtype)
    ref = (3 * torch.randn(64, 2, 1000, generator=g)).to(dtype)
    labels = torch.randint(0, 1000, (64, 2), generator=g)
    expected = gift_loss_full_vocab(logits, ref, labels, beta, 0.01)
    x = logits.cuda().requires_grad_()
    loss = vocab_parallel_gift_loss(x, ref.cuda(), labels.cuda(), beta=beta, smooth_lambda=0.01)
    loss.sum().backward()
    assert loss.device.type == "cuda" and x.grad.device.type == "cuda"
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=tolerance, atol=tolerance)
