"""examples/slurm/gift.sbatch on a real (local, two-node) SLURM cluster: two nodes x one process
at TP=2 train like torchrun on one machine; the end-of-time signal makes the ranks save, the job
requeue itself and resume, and the finished curve equals an uninterrupted run's."""

import json
import os
import subprocess
import sys
import time

import pytest

from support.parallel_harness import TINY_MODEL, free_port

pytestmark = [pytest.mark.slow, pytest.mark.system]  # the `slurm` fixture: conftest.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "examples", "slurm", "gift.sbatch")


def _recipe(world, tmp_path, train_iters):
    from omegaconf import OmegaConf

    recipe = {"model": dict(TINY_MODEL), "data": {"train_path": world["demos"]},
              "training": {"train_iters": train_iters, "micro_batch_size": 2,
                           "global_batch_size": 4},
              "optimizer": {"lr": 1e-3, "lr_decay_style": "cosine"}, "gift": {"beta": 3.0},
              "checkpoint": {"pretrained_checkpoint": world["base"], "save_interval": 1000},
              "logging": {"progress": False}}
    OmegaConf.save(OmegaConf.create(recipe), tmp_path / "recipe.yaml")
    return str(tmp_path / "recipe.yaml")


def _losses(path):
    with open(path) as f:
        records = [json.loads(line) for line in f if '"loss"' in line]
    return {r["iteration"]: r["loss"] for r in records}, [r["iteration"] for r in records]


def _torchrun(recipe, metrics):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", str(free_port()), "examples/pretrain_gift.py", "--config",
                    recipe, "--tensor-model-parallel-size", "2", "--metrics-file", metrics],
                   cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, check=True,
                   capture_output=True, timeout=600)


def _submit(slurm, tmp_path, recipe, *flags):
    run = str(tmp_path / "run")
    return slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out",
                         SBATCH, "--config", recipe, "--tensor-model-parallel-size", "2",
                         "--save", run, "--load", run, "--metrics-file",
                         str(tmp_path / "slurm.jsonl"), *flags],
                        cwd=REPO, env={"GPUS_PER_NODE": "1", "PYTHON": sys.executable,
                                       "MEGATRON_GIFT_RENDEZVOUS_TIMEOUT_S": "120"})


def _output(tmp_path):
    return "\n".join(p.read_text() for p in tmp_path.glob("gift-*.out"))


def test_two_nodes_train_like_torchrun_on_one_machine(slurm, tiny_world, tmp_path):
    recipe = _recipe(tiny_world, tmp_path, train_iters=3)
    job = _submit(slurm, tmp_path, recipe)
    assert slurm.wait(job, timeout=600) == "COMPLETED", _output(tmp_path)
    _torchrun(recipe, str(tmp_path / "torchrun.jsonl"))
    on_slurm, iterations = _losses(tmp_path / "slurm.jsonl")
    assert iterations == [1, 2, 3]
    on_one_machine, _ = _losses(tmp_path / "torchrun.jsonl")
    assert on_slurm == pytest.approx(on_one_machine, rel=1e-6)
    output = _output(tmp_path)
    assert "0: [gift]" in output  # srun --label: rank-prefixed lines
    assert "start 1 on 2 node(s) x 1" in output


def test_the_end_of_time_signal_saves_requeues_and_resumes_on_the_same_curve(
        slurm, tiny_world, tmp_path):
    recipe = _recipe(tiny_world, tmp_path, train_iters=40)
    job = _submit(slurm, tmp_path, recipe)
    metrics = tmp_path / "slurm.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(_losses(metrics)[1]) >= 5):
        assert time.monotonic() < deadline, _output(tmp_path)
        assert slurm.job_info(job).get("JobState") in ("PENDING", "RUNNING"), _output(tmp_path)
        time.sleep(0.2)
    # What --signal=B:TERM@120 does before the time limit: SIGTERM to the batch script.
    slurm.run(["scancel", "--batch", "--signal=TERM", str(job)])
    assert slurm.wait(job, timeout=900) == "COMPLETED", _output(tmp_path)
    assert slurm.job_info(job).get("Restarts") == "1"
    output = _output(tmp_path)
    assert "TERM received" in output and "requeueing job" in output and "start 2 on" in output
    saved_at = [line for line in output.splitlines() if "stopped by SIGTERM after iteration" in line]
    assert saved_at, output
    resumed, iterations = _losses(metrics)
    assert iterations == list(range(1, 41))  # each iteration once: the resumed run dropped repeats
    _torchrun(recipe, str(tmp_path / "straight.jsonl"))
    straight, _ = _losses(tmp_path / "straight.jsonl")
    assert resumed == pytest.approx(straight, rel=1e-6)
    assert len(os.listdir(tmp_path / "run" / "configs")) == 2  # each start's config
