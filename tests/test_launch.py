"""Launching without torchrun's help: ranks from SLURM's variables in srun's tasks only, rank 0's
port below the ephemeral range and moved by a requeue, each rank's device among those it sees,
examples/slurm/gift.sbatch's processes per node from the allocation, a rank whose peers never
come fails in bounded time naming what it tried, two torchrun agents (two "nodes") train like
one, Megatron-LM's --exit-duration-in-mins and --exit-interval save and stop, and every start
records its config."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from megatron_gift.errors import UserError
from megatron_gift.platform import distributed, launcher_env
from megatron_gift.platform.launcher_env import adopt_slurm_ranks, first_host
from support.parallel_harness import TINY_MODEL, free_port, start_run, train_here

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "examples", "slurm", "gift.sbatch")
# What SLURM 22.05 gives (read on tests/support/slurm_cluster.py's cluster): rank 1 of an srun
# step of 2 tasks on 2 nodes, the batch script of a --nodes 2 --ntasks-per-node 1 job, and an
# salloc shell of --nodes 2 --ntasks 4.
SRUN_TASK = {"SLURM_JOB_ID": "54321", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
             "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}
BATCH_SCRIPT = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "1",
                "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]"}
SALLOC_SHELL = {"SLURM_JOB_ID": "123456", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)",
                "SLURM_JOB_NODELIST": "gpu[07-08]"}


@pytest.fixture
def no_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed here


def test_an_srun_task_adopts_its_steps_ranks(no_scontrol):
    env = dict(SRUN_TASK)
    assert adopt_slurm_ranks(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 54321 % 12000)}
    assert not adopt_slurm_ranks(env)  # torchrun's variables, once set, win
    torchrun = {**SRUN_TASK, "RANK": "0"}
    assert not adopt_slurm_ranks(torchrun) and torchrun["RANK"] == "0"


def test_the_world_and_the_node_are_the_steps_not_the_jobs(no_scontrol):
    """srun -n 3 in a job of 8 tasks: 3 ranks, 2 on node 0 and 1 on node 1."""
    env = {**SRUN_TASK, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "3", "SLURM_PROCID": "2",
           "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert adopt_slurm_ranks(env)
    assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("3", "1")
    assert [launcher_env.tasks_per_node("2(x3),1", node) for node in range(4)] == [2, 2, 2, 1]


@pytest.mark.parametrize("env", [
    BATCH_SCRIPT, SALLOC_SHELL,
    {**SRUN_TASK, "SLURM_STEP_ID": "4294967290", "SLURM_STEPID": "4294967290"},  # interactive
    {**SRUN_TASK, "SLURM_STEP_ID": "batch", "SLURM_STEPID": "batch"},
    {**SRUN_TASK, "MEGATRON_GIFT_SLURM_TASK_PID": "1"},  # started by a rank that adopted them
], ids=["batch-script", "salloc-shell", "interactive-step", "batch-step", "child-of-a-rank"])
def test_a_process_that_srun_did_not_start_stays_a_world_of_one(env, no_scontrol):
    env = dict(env)
    assert not adopt_slurm_ranks(env)
    assert "RANK" not in env and "WORLD_SIZE" not in env and "MASTER_PORT" not in env


@pytest.mark.parametrize("bad,named", [
    ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not a rank of a step of 2 tasks"),
    ({"SLURM_JOB_ID": "12x"}, "SLURM_JOB_ID=12x is not a non-negative integer"),
    ({"SLURM_RESTART_COUNT": "-1"}, "SLURM_RESTART_COUNT=-1 is not a non-negative integer"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x"}, r"cannot read the SLURM tasks-per-node list '2\(x'"),
])
def test_bad_slurm_variables_are_named(bad, named, no_scontrol):
    with pytest.raises(UserError, match=named):
        adopt_slurm_ranks({**SRUN_TASK, **bad})


def _port(job_id, restarts=None):
    env = {**SRUN_TASK, "SLURM_JOB_ID": str(job_id)}
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    adopt_slurm_ranks(env)
    return int(env["MASTER_PORT"])


def test_rank_0s_port_is_below_the_ephemeral_range_and_moves_on_a_requeue(no_scontrol):
    for job_id in [*range(0, 400_000, 997), 2**31 - 1, 2**32 - 2]:
        first = _port(job_id)
        assert 1024 <= first < 32768, job_id  # Linux hands out 32768-60999 itself
        assert _port(job_id, 0) == first  # SLURM_RESTART_COUNT is unset on the first start
        ports = [first, *(_port(job_id, restarts) for restarts in range(1, 4))]
        assert len(set(ports)) == 4 and all(1024 <= p < 32768 for p in ports), (job_id, ports)


@pytest.mark.parametrize("local_rank,visible,local_world,index", [
    (3, 8, 8, 3),  # every rank sees the node's GPUs (torchrun, plain srun)
    (3, 1, 8, 0),  # --gpus-per-task 1 / --gpu-bind: each task sees its own GPU
    (3, 2, 4, 1),  # --ntasks-per-node 4 --gpus-per-task 2: its turn among its own two
    (0, 1, None, 0), (2, 8, None, 2)])
def test_a_rank_takes_its_device_among_those_it_sees(local_rank, visible, local_world, index):
    assert launcher_env.device_index(local_rank, visible, local_world) == index


@pytest.mark.parametrize("local_rank,visible,local_world,named", [
    (0, 0, 1, "no visible device for local rank 0"),
    (8, 8, 8, "LOCAL_RANK=8 is not a rank of a node of 8 processes")])
def test_a_device_that_cannot_be_taken_is_named(local_rank, visible, local_world, named):
    with pytest.raises(UserError, match=named):
        launcher_env.device_index(local_rank, visible, local_world)


@pytest.mark.parametrize("visible,index", [(1, 0), (8, 3)])
def test_init_distributed_sets_the_device_by_that_rule(visible, index, monkeypatch):
    """Local rank 3 of 8 on a node whose GPUs it sees all of, or one of (no GPU here: the
    accelerator calls are recorded)."""
    taken, joined = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: visible)
    monkeypatch.setattr(torch.accelerator, "set_device_index", taken.append)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda **kwargs: joined.append(kwargs))
    for name, value in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
                            TORCHELASTIC_USE_AGENT_STORE="True").items():
        monkeypatch.setenv(name, value)
    distributed.init_distributed()
    assert taken == [index] and joined == [{"backend": "nccl"}]


def _run_sbatch_script(tmp_path, env):
    """examples/slurm/gift.sbatch as the batch step of a job with ``env``, an srun here that
    prints how it was called."""
    (tmp_path / "srun").write_text('#!/bin/bash\necho "srun $* MASTER_PORT=${MASTER_PORT-unset}"\n')
    (tmp_path / "srun").chmod(0o755)
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("MASTER_PORT", "GPUS_PER_NODE")}
    return subprocess.run(
        ["bash", SBATCH, "--config", "recipe.yaml"], cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
        env={**keep, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NUM_NODES": "2", **env})


@pytest.mark.system
@pytest.mark.parametrize("allocation,per_node", [
    ({}, 1),
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2"}, 2),
    ({"SLURM_GPUS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "32"}, 4),
    ({"SLURM_GPUS_PER_NODE": "h100:4", "SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_GPUS_ON_NODE": "8"}, 8),  # --gres=gpu:8
    ({"SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_PER_NODE": "4"}, 4),
], ids=["nothing", "ntasks-per-node", "gpus-per-node", "typed-gpus", "gres", "both-agree"])
def test_the_sbatch_script_runs_as_many_processes_a_node_as_the_allocation_says(
        tmp_path, allocation, per_node):
    result = _run_sbatch_script(tmp_path, allocation)
    assert result.returncode == 0, result.stderr
    [srun] = [line for line in result.stdout.splitlines() if line.startswith("srun ")]
    assert f"--ntasks-per-node={per_node} --ntasks={2 * per_node} " in srun
    assert srun.endswith("examples/pretrain_gift.py --config recipe.yaml MASTER_PORT=unset")
    assert f"on 2 node(s) x {per_node}," in result.stdout


@pytest.mark.system
@pytest.mark.parametrize("allocation,named", [
    ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_GPUS_PER_NODE": "4"},
     "--ntasks-per-node 2 and 4 GPUs a node disagree"),
    ({"GPUS_PER_NODE": "8"}, "GPUS_PER_NODE is not read: the allocation gives 1 process(es) a "
     "node, not 8; give sbatch --gpus-per-node 8 instead"),
    ({"SLURM_GPUS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "1"},
     "the job has 1 CPU(s) on its first node for 4 processes: add --cpus-per-gpu"),
    ({"SLURM_GPUS_PER_NODE": "a100:two"}, "SLURM_GPUS_PER_NODE=a100:two is not a count"),
], ids=["disagree", "gpus-per-node-variable", "too-few-cpus", "unreadable"])
def test_the_sbatch_script_stops_with_one_line_on_an_allocation_it_cannot_run(
        tmp_path, allocation, named):
    result = _run_sbatch_script(tmp_path, allocation)
    assert result.returncode == 2 and "srun " not in result.stdout
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("=== gift: error: ") and named in line


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[3-5],b1", "a3"),
                                            ("n[10,12]", "n10"), ("", "127.0.0.1")])
def test_the_first_host_of_a_node_list(nodelist, first, no_scontrol):
    assert first_host(nodelist) == first


@pytest.mark.system
def test_a_rank_whose_peers_never_come_fails_in_bounded_time_naming_what_it_tried():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "TORCHELASTIC"))}
    env.update(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               MEGATRON_GIFT_RENDEZVOUS_TIMEOUT_S="3")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", "from megatron_gift.platform.console import entry_point\n"
         "from megatron_gift.platform.distributed import init_distributed\n"
         "entry_point(init_distributed)()"], env=env, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2 and time.monotonic() - started < 60
    assert (f"rank 1 of 2 waited 3 s for rank 0 at 127.0.0.1:{env['MASTER_PORT']} and gave up"
            in result.stderr)
    assert "RANK=1, WORLD_SIZE=2" in result.stderr and "Traceback" not in result.stderr


def _overrides(world, tmp_path, **training):
    return {"model": dict(TINY_MODEL), "data": {"train_path": world["demos"]},
            "training": {"train_iters": 100, "micro_batch_size": 2, "global_batch_size": 4,
                         **training},
            "optimizer": {"lr": 1e-3, "lr_decay_style": "constant"}, "gift": {"beta": 3.0},
            "checkpoint": {"pretrained_checkpoint": world["base"], "save": str(tmp_path / "run")},
            "logging": {"progress": False, "metrics_file": str(tmp_path / "metrics.jsonl")}}


def _logged(tmp_path):
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line)["iteration"] for line in f if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("training,stops_at", [({"exit_interval": 3}, 3),
                                               ({"exit_duration_in_mins": 1e-6}, 1)],
                         ids=["exit-interval", "exit-duration"])
def test_exit_interval_and_duration_save_and_stop(tiny_world, tmp_path, training, stops_at):
    train_here(_overrides(tiny_world, tmp_path, **training))
    assert _logged(tmp_path) == list(range(1, stops_at + 1))
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == str(stops_at)
    [config] = os.listdir(tmp_path / "run" / "configs")  # this start's resolved config
    assert config.startswith("start-0000000-") and config.endswith(".yaml")


def _agent(node_rank, port, recipe, tmp_path, name, nnodes=2, nproc=1):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return start_run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank",
         str(node_rank), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
         "--master-port", str(port), "examples/pretrain_gift.py", "--config", recipe,
         "--tensor-model-parallel-size", "2", "--metrics-file", str(tmp_path / f"{name}.jsonl")],
        tmp_path / f"{name}-{node_rank}.log", env=env, cwd=REPO)


@pytest.mark.slow
@pytest.mark.system
def test_two_torchrun_agents_as_two_nodes_train_like_one_agent(tiny_world, tmp_path):
    """Static rendezvous (--nnodes 2 --node-rank 0/1 --master-addr): the same losses as one
    agent with 2 processes."""
    from omegaconf import OmegaConf

    recipe = _overrides(tiny_world, tmp_path, train_iters=3)
    recipe["checkpoint"].pop("save")
    OmegaConf.save(OmegaConf.create(recipe), tmp_path / "recipe.yaml")
    port = free_port()
    nodes = [_agent(rank, port, str(tmp_path / "recipe.yaml"), tmp_path, "nodes")
             for rank in (0, 1)]
    assert [node.wait(timeout=300) for node in nodes] == [0, 0]
    one = _agent(0, free_port(), str(tmp_path / "recipe.yaml"), tmp_path, "one", nnodes=1,
                 nproc=2)
    assert one.wait(timeout=300) == 0

    def losses(name):
        with open(tmp_path / f"{name}.jsonl") as f:
            return [json.loads(line)["loss"] for line in f if '"loss"' in line]

    assert len(losses("nodes")) == 3
    assert losses("nodes") == pytest.approx(losses("one"), rel=1e-6)


@pytest.mark.system
@pytest.mark.parametrize("launch", ["console-script", "module"])
def test_megatron_gift_train_runs_under_torchrun(tiny_world, tmp_path, launch):
    """``megatron-gift train`` under torchrun, at TP=2: through the installed console script's
    path (as ``$(which megatron-gift)``) and as ``-m megatron_gift.commands``."""
    script = os.path.join(os.path.dirname(sys.executable), "megatron-gift")
    target = [script] if launch == "console-script" else ["-m", "megatron_gift.commands"]
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_MODEL.items()]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *target, "train",
         *flags, "--pretrained-checkpoint", tiny_world["base"], "--train-path",
         tiny_world["demos"], "--train-iters", "2", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--tensor-model-parallel-size", "2", "--save",
         str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "iter_0000002").is_dir()
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [json.loads(line)["iteration"] for line in f if '"loss"' in line] == [1, 2]
