"""examples/slurm/gift.sbatch on a real (local, two-node) SLURM cluster: two nodes x one process
at TP=2, stopped by the end-of-time signal, save, requeue themselves and resume, and the finished
curve equals an uninterrupted torchrun's on one machine. SLURM's ranks
are taken by srun's tasks and not by the batch script, a requeue moves rank 0's port, and the
script without --ntasks-per-node starts one process a node (the cluster has no GPUs)."""

import json
import os
import subprocess
import sys
import textwrap
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
                        cwd=REPO, env={"PYTHON": sys.executable,
                                       "MEGATRON_GIFT_RENDEZVOUS_TIMEOUT_S": "120"})


def _output(tmp_path):
    return "\n".join(p.read_text() for p in tmp_path.glob("gift-*.out"))


def test_the_end_of_time_signal_saves_requeues_and_resumes_on_the_same_curve(
        slurm, tiny_world, tmp_path):
    """Two nodes x one process at TP=2, stopped by the end-of-time signal and requeued: the
    finished curve is torchrun's on one machine, uninterrupted."""
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
    assert "start 1 on 2 node(s) x 1" in output and "0: [gift]" in output  # srun --label
    assert "TERM received" in output and "requeueing job" in output and "start 2 on" in output
    saved_at = [line for line in output.splitlines() if "stopped by SIGTERM after iteration" in line]
    assert saved_at, output
    resumed, iterations = _losses(metrics)
    assert iterations == list(range(1, 41))  # each iteration once: the resumed run dropped repeats
    _torchrun(recipe, str(tmp_path / "straight.jsonl"))
    straight, _ = _losses(tmp_path / "straight.jsonl")
    assert resumed == pytest.approx(straight, rel=1e-6)
    assert len(os.listdir(tmp_path / "run" / "configs")) == 2  # each start's config


# What a process makes of SLURM's variables: "probe <where> <adopted> <RANK> <WORLD_SIZE> <port>".
PROBE = """
import os
from megatron_gift.platform.launcher_env import adopt_slurm_ranks
adopted = adopt_slurm_ranks()
where = "task" if "SLURM_STEP_ID" in os.environ else "batch"
print("probe", where, adopted, *(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")),
      flush=True)
"""


def _probes(path):
    with open(path) as f:
        return [line.split()[-6:] for line in f if line.split()[-6:][:1] == ["probe"]]


def test_srun_tasks_take_slurms_ranks_the_batch_script_does_not_and_a_requeue_moves_the_port(
        slurm, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    probe = f"{sys.executable} {tmp_path}/probe.py"
    script = tmp_path / "probe.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        {probe}
        srun --mpi=none {probe}
        if [ -z "${{SLURM_RESTART_COUNT:-}}" ]; then scontrol requeue "$SLURM_JOB_ID"; sleep 60; fi
    """))
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--open-mode=append",
                        f"--output={tmp_path}/job.out", str(script)], cwd=str(tmp_path))
    assert slurm.wait(job, timeout=120) == "COMPLETED", (tmp_path / "job.out").read_text()
    probes = _probes(tmp_path / "job.out")
    assert [p for p in probes if p[1] == "batch"] == [["probe", "batch", "False", "None", "None",
                                                       "None"]] * 2  # a world of one, each start
    tasks = [p for p in probes if p[1] == "task"]
    assert sorted(p[3:5] for p in tasks) == [["0", "2"], ["0", "2"], ["1", "2"], ["1", "2"]]
    first, second = tasks[:2], tasks[2:]
    assert {p[5] for p in first} == {str(20000 + job % 12000)}  # both ranks agree
    assert len({p[5] for p in second}) == 1 and second[0][5] != first[0][5]
    assert all(1024 <= int(p[5]) < 32768 for p in tasks)


def test_the_script_without_ntasks_per_node_starts_one_process_a_node(slurm, tmp_path):
    """No GPUs on this cluster and no --ntasks-per-node: one process a node (PYTHON runs the
    probe instead of training)."""
    (tmp_path / "probe.py").write_text(PROBE)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/bash\nexec {sys.executable} {tmp_path}/probe.py\n")
    python.chmod(0o755)
    job = slurm.sbatch(["--nodes=2", f"--output={tmp_path}/%x-%j.out", SBATCH, "--config", "x"],
                       cwd=REPO, env={"PYTHON": str(python)})
    assert slurm.wait(job, timeout=90) == "COMPLETED", _output(tmp_path)
    output = _output(tmp_path)
    assert "start 1 on 2 node(s) x 1," in output
    ranks = sorted(p[3:5] for p in _probes(tmp_path / f"gift-{job}.out"))
    assert ranks == [["0", "2"], ["1", "2"]], output
