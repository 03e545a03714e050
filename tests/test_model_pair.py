"""GiftModel, the student beside its frozen reference on one pipeline chunk: what a non-first
stage hands each model, and the switch that leaves the reference idle."""

import torch

from megatron_gift.core.model import GiftModel


class _Stage(torch.nn.Module):
    """A stand-in pipeline stage: records the input tensor it is given and its calls."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"hidden_size": 4})()
        self.model_type, self.pre_process, self.post_process = None, False, False
        self.given, self.calls = [], 0

    def set_input_tensor(self, tensor):
        self.given.append(tensor)

    def forward(self, tokens, position_ids, attention_mask):
        self.calls += 1
        return torch.ones(3, 2, 4)


def test_a_stage_hands_each_model_a_contiguous_half():
    student, reference = _Stage(), _Stage()
    pair = GiftModel(student, reference)
    received = torch.arange(3 * 2 * 8, dtype=torch.float32).view(3, 2, 8)  # [s, b, 2h]
    pair.set_input_tensor(received)
    (student_half,), (reference_half,) = student.given, reference.given
    assert student_half.is_contiguous() and reference_half.is_contiguous()
    assert torch.equal(student_half, received[..., :4])
    assert torch.equal(reference_half, received[..., 4:])


def test_switching_the_reference_off_runs_the_student_alone():
    student, reference = _Stage(), _Stage()
    pair = GiftModel(student, reference)
    pair.use_reference = False
    out = pair(None, None, None)
    assert out.shape == (3, 2, 4) and (student.calls, reference.calls) == (1, 0)  # [s, b, h]
    pair.set_input_tensor(torch.zeros(3, 2, 4))  # what the previous stage sends then: [s, b, h]
    assert student.given[-1].shape == (3, 2, 4) and reference.given[-1] is None
    pair.use_reference = True
    assert pair(None, None, None).shape == (3, 2, 8) and reference.calls == 1
