"""The step losses declare what they report: the report holds exactly the declared metrics as
``[sum, count]`` over the loss tokens, and the values are the loss's own (GIFT's against the
float64 oracle, the evaluation's accuracy against an argmax done here)."""

import math

import pytest
import torch

from megatron_gift.loss.objectives import TOKEN_MEAN, GiftLoss, NextTokenEvaluation
from megatron_gift.loss.reference import gift_loss_full_vocab

V = 11


def _batch():
    torch.manual_seed(0)
    labels = torch.randint(0, V, (2, 5))
    labels[0, :2] = -100  # prompt tokens: outside the loss
    return {"labels": labels, "loss_mask": (labels != -100).float()}


@pytest.mark.parametrize("beta", [0.0, 5.0, math.inf])
def test_gift_loss_reports_its_declared_metrics_over_the_loss_tokens(world_of_one, beta):
    batch = _batch()
    logits, reference = torch.randn(2, 5, V), torch.randn(2, 5, V)
    loss = GiftLoss(beta, 0.0, V, implementation="eager")
    loss_sum, tokens, report = loss(logits, reference, batch)
    assert set(report) == set(GiftLoss.metrics) and GiftLoss.reduction == TOKEN_MEAN
    assert int(tokens) == 8 and all(float(v[1]) == 8 for v in report.values())
    expected = gift_loss_full_vocab(logits.double(), reference.double(), batch["labels"], beta)
    assert float(loss_sum) == pytest.approx(float(expected.sum()), rel=1e-5)
    assert float(report["loss"][0]) == pytest.approx(float(loss_sum), rel=1e-7)


def test_the_evaluation_reports_cross_entropy_and_accuracy(world_of_one):
    batch = _batch()
    logits = torch.randn(2, 5, V)
    evaluation = NextTokenEvaluation(V)
    _, tokens, report = evaluation(logits, None, batch)
    assert set(report) == set(NextTokenEvaluation.metrics) and not evaluation.uses_reference
    valid = batch["labels"] != -100
    right = ((logits.argmax(-1) == batch["labels"]) & valid).sum()
    assert report["valid_accuracy"].tolist() == [float(right), 8.0] and int(tokens) == 8
    ce = torch.nn.functional.cross_entropy(logits[valid], batch["labels"][valid], reduction="sum")
    assert float(report["valid_ce"][0]) == pytest.approx(float(ce), rel=1e-5)
