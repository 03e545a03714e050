"""What a checkpoint holds (python -m megatron_gift.inspect), and the resume checks that read it:
a weights-only checkpoint is not a run to continue; metrics past the resumed iteration go."""

import argparse
import json
import os

import pytest
import torch

from megatron_gift.engine.job import saved_config
from megatron_gift.engine.metrics import drop_records_after
from megatron_gift.errors import UserError
from support.commands import run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inspect(*args):
    """``python -m megatron_gift.inspect ARGS``, run in this process (support/commands.py)."""
    from megatron_gift.commands.inspect_checkpoint import main

    return run_main(main, args)


@pytest.fixture
def weights_only(tmp_path, world_of_one):
    """A converter-style checkpoint: model tensors and run facts, no training state."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_gift.platform.cpu import enable_cpu_megatron

    enable_cpu_megatron()
    root = tmp_path / "converted"
    (root / "iter_0000000").mkdir(parents=True)
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(4.0)), "iteration": 0,
             "consumed_samples": 0,
             "args": argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1),
             "run": {"config": {"model": {"num_layers": 2}}, "layout": [1, 1, 1],
                     "architecture": {"num_layers": 2}, "reference_source": None,
                     "converted_from": "/models/Qwen2.5-0.5B", "converter": "builtin"}}
    dist_checkpointing.save(state, str(root / "iter_0000000"))
    (root / "latest_checkpointed_iteration.txt").write_text("0")
    return root


def test_a_training_checkpoint_is_described(tiny_world):
    result = _inspect(tiny_world["base"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "iteration         8 (64 samples consumed)" in out
    assert "kind              training (resumable)" in out
    assert "saved at          TP=1 PP=1 DP=1" in out
    assert "num_layers=4" in out and "train_iters: 8" in out
    facts = json.loads(_inspect(tiny_world["base"], "--json").stdout)
    assert facts["iteration"] == 8 and facts["config"]["gift"]["beta"] == float("inf")


def test_a_weights_only_checkpoint_is_described_and_refused_as_load(weights_only):
    out = _inspect(weights_only).stdout
    assert "kind              weights only" in out
    assert "converted from    /models/Qwen2.5-0.5B (builtin converter)" in out
    with pytest.raises(UserError, match=f"--load {weights_only}: .* holds weights only "
                                        r"\(converted from /models/Qwen2.5-0.5B\), no training "
                                        f"state to resume; pass it as --pretrained-checkpoint"):
        saved_config(str(weights_only))


def test_a_missing_checkpoint_is_one_line(tmp_path):
    result = _inspect(tmp_path / "nothing")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path / 'nothing'}: no checkpoint "
                                     "(latest_checkpointed_iteration.txt or metadata.json)")


def test_metrics_past_the_resumed_iteration_are_dropped(tmp_path):
    path = tmp_path / "m.jsonl"
    records = [{"iteration": 1, "loss": 3.0}, {"iteration": 2, "loss": 2.0},
               {"iteration": 2, "valid_ce": 1.0}, {"iteration": 3, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    drop_records_after(str(path), 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    drop_records_after(str(tmp_path / "absent.jsonl"), 2)  # a first run has none
