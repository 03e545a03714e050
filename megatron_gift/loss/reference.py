"""Independent full-vocab GIFT loss in plain torch (float64, autograd): the reference the fused
and eager losses are checked against, by the tests and by the GPU check.

It follows the definition literally: smooth the reference in probability space, add beta to the
label's log-probability, softmax, cross-entropy against the student's log-softmax.
"""

import math

import torch
import torch.nn.functional as F


def gift_loss_full_vocab(logits, ref_logits, labels, beta, smooth_lambda=0.0, ignore_index=-100):
    """Per-token loss ``[...]`` (float64) from full-vocab logits ``[..., V]``."""
    z = logits.double()
    vocab = z.size(-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)
    onehot = F.one_hot(safe_labels, vocab).double()
    if math.isinf(beta):
        target = onehot
    else:
        p_ref = (1 - smooth_lambda) * torch.softmax(ref_logits.double(), -1) + smooth_lambda / vocab
        target = torch.softmax(torch.log(p_ref) + beta * onehot, -1)
    loss = -(target * torch.log_softmax(z, -1)).sum(-1)
    return torch.where(valid, loss, torch.zeros_like(loss))


def gift_stats_full_vocab(logits, ref_logits, labels, beta, smooth_lambda=0.0, ignore_index=-100):
    """(student entropy, q(label), student prob of label), each ``[...]`` float64."""
    vocab = logits.size(-1)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)
    log_pi = torch.log_softmax(logits.double(), -1)
    entropy = -(log_pi.exp() * log_pi).sum(-1)
    label_prob = log_pi.gather(-1, safe_labels[..., None]).squeeze(-1).exp()
    if math.isinf(beta):
        target_mass = torch.ones_like(entropy)
    else:
        p_ref = (1 - smooth_lambda) * torch.softmax(ref_logits.double(), -1) + smooth_lambda / vocab
        q = torch.softmax(torch.log(p_ref) + beta * F.one_hot(safe_labels, vocab).double(), -1)
        target_mass = q.gather(-1, safe_labels[..., None]).squeeze(-1)
    return tuple(torch.where(valid, x, torch.zeros_like(x)) for x in (entropy, target_mass, label_prob))
