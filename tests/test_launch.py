"""Launching without torchrun's help: ranks from SLURM's variables, a rank whose peers never come
fails in bounded time naming what it tried, two torchrun agents (two "nodes") train like one,
Megatron-LM's --exit-duration-in-mins and --exit-interval save and stop, and every start records
its config."""

import json
import os
import subprocess
import sys
import time

import pytest

from megatron_gift.platform.launcher_env import adopt_slurm_ranks, first_host
from support.parallel_harness import TINY_MODEL, free_port, start_run, train_here

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_slurm_variables_become_torchruns(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the list is parsed here
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert adopt_slurm_ranks(env)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                "MASTER_PORT")} == {
        "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
        "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert env["MASTER_ADDR"] == "gpu07"  # scontrol's, in tests/test_slurm.py
    assert not adopt_slurm_ranks(env)  # torchrun's variables, once set, win
    torchrun = {"RANK": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}
    assert not adopt_slurm_ranks(torchrun) and torchrun["RANK"] == "0"


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[3-5],b1", "a3"),
                                            ("n[10,12]", "n10"), ("", "127.0.0.1")])
def test_the_first_host_of_a_node_list(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the list is parsed here
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
