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
    assert set(report) == set(loss.metrics) and loss.reduction == TOKEN_MEAN
    assert loss.metrics == ("loss", "student_entropy", "target_mass", "student_label_prob")
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


@pytest.mark.parametrize("beta", [5.0, math.inf])
def test_the_fused_head_reports_what_the_logits_report(world_of_one, beta):
    """Given both models' hidden states ``[s, b, h]`` and output weights, the fused head's loss
    and diagnostics are those of the logits they make."""
    from megatron_gift.core.model import HeadInputs

    batch = _batch()
    hidden, ref_hidden = torch.randn(5, 2, 6), torch.randn(5, 2, 4)
    weight, ref_weight = torch.randn(V, 6), torch.randn(V, 4)
    logits = torch.einsum("sbh,vh->bsv", hidden, weight)
    ref_logits = torch.einsum("sbh,vh->bsv", ref_hidden, ref_weight)
    expected, tokens, want = GiftLoss(beta, 0.3, V, "eager")(logits, ref_logits, batch)
    fused = GiftLoss(beta, 0.3, V, "eager", head="fused", chunk_tokens=3)
    loss_sum, fused_tokens, report = fused(HeadInputs(hidden, weight),
                                           HeadInputs(ref_hidden, ref_weight), batch)
    assert set(report) == set(fused.metrics) and int(fused_tokens) == int(tokens) == 8
    assert float(loss_sum) == pytest.approx(float(expected), rel=1e-5)
    for key in fused.metrics:
        torch.testing.assert_close(report[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_gift_loss_passes_the_soft_sft_weight(world_of_one):
    batch = _batch()
    logits, reference = torch.randn(2, 5, V).double(), torch.randn(2, 5, V).double()
    loss_sum, _, report = GiftLoss(20.0, 0.0, V, implementation="eager",
                                   soft_sft_weight=0.25)(logits, reference, batch)
    labels = batch["labels"]
    valid = labels != -100
    onehot = torch.nn.functional.one_hot(torch.where(valid, labels, 0), V).double()
    q = 0.75 * onehot + 0.25 * torch.softmax(reference, -1)
    expected = torch.where(valid, -(q * torch.log_softmax(logits, -1)).sum(-1), 0.0)
    assert float(loss_sum) == pytest.approx(float(expected.sum()), rel=1e-6)
    q_label = torch.where(valid, (q * onehot).sum(-1), 0.0)
    assert float(report["target_mass"][0]) == pytest.approx(float(q_label.sum()), rel=1e-6)
