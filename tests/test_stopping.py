"""Stopping a run: SIGTERM and Ctrl-C save and exit wherever they are delivered (every process,
or only the torchrun launcher), a second Ctrl-C exits at once, a signal during set-up stops at
once with one line, and saving starts no process that a signal could kill."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from support.parallel_harness import TINY_MODEL, free_port, run_distributed, start_run

pytestmark = [pytest.mark.system, pytest.mark.slow]  # torchrun and its signals, as programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACKER = "latest_checkpointed_iteration.txt"


def _recipe(world, tmp_path, **training):
    from omegaconf import OmegaConf

    recipe = {
        "model": dict(TINY_MODEL),
        "data": {"train_path": world["demos"]},
        "training": {"train_iters": 100000, "micro_batch_size": 2, "global_batch_size": 8,
                     **training},
        "optimizer": {"lr": 1e-3, "lr_decay_style": "constant"},
        "gift": {"beta": 3.0},
        "checkpoint": {"pretrained_checkpoint": world["base"], "save": str(tmp_path / "ckpt")},
        "logging": {"progress": False, "metrics_file": str(tmp_path / "metrics.jsonl")},
    }
    OmegaConf.save(OmegaConf.create(recipe), tmp_path / "recipe.yaml")
    return str(tmp_path / "recipe.yaml")


def _start(command, tmp_path, name):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return start_run(command, tmp_path / f"{name}.log", env=env, cwd=REPO)


def _torchrun(recipe, tmp_path, *flags):
    return _start([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-port", str(free_port()), "examples/pretrain_gift.py",
                   "--config", recipe, "--tensor-model-parallel-size", "2", *flags],
                  tmp_path, "torchrun")


def _iterations_logged(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"loss"' in line)


def _wait_for(condition, process, timeout=180, poll=0.05):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the condition held"
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def _saved_iteration(tmp_path):
    with open(tmp_path / "ckpt" / TRACKER) as f:
        saved = int(f.read())
    assert (tmp_path / "ckpt" / f"iter_{saved:07d}" / "metadata.json").is_file()
    return saved


def _last_logged_iteration(tmp_path):
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f][-1]["iteration"]


# Each way of delivering the signal, and each of before and after a first save, once: the two
# are independent (the handler does not know which process was signalled first).
@pytest.mark.parametrize("save_interval,at_least,to_every_process",
                         [(1000, 3, False), (2, 5, True)],
                         ids=["before-a-first-save-to-torchrun",
                              "after-a-first-save-to-every-process"])
def test_sigterm_saves_at_tp2(tiny_world, tmp_path, save_interval, at_least, to_every_process):
    """``kill``, ``docker stop`` and Kubernetes signal torchrun alone, which forwards SIGTERM
    to its workers; SLURM signals every process of the job. Either way the workers finish the
    step, save it and exit 0; torchrun itself then exits 1 (its SignalException), as
    docs/training/resume-and-stop.md says."""
    recipe = _recipe(tiny_world, tmp_path)
    launcher = _torchrun(recipe, tmp_path, "--save-interval", str(save_interval))
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: _iterations_logged(metrics) >= at_least, launcher)
    if to_every_process:
        os.killpg(launcher.pid, signal.SIGTERM)
    else:
        launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) == 1
    saved = _saved_iteration(tmp_path)
    assert saved >= at_least and saved == _last_logged_iteration(tmp_path)
    log = (tmp_path / "torchrun.log").read_text()
    assert f"stopped by SIGTERM after iteration {saved} of 100000" in log
    assert "ChildFailedError" not in log and "[rank" not in log  # no worker failed
    assert not (tmp_path / "ckpt" / ".megatron_gift.lock").exists()


def test_ctrl_c_in_a_terminal_saves_and_exits(tiny_world, tmp_path):
    """A terminal's Ctrl-C signals every process of the job (torchrun forwards it once more):
    that is one Ctrl-C, and the workers save the step they are in."""
    recipe = _recipe(tiny_world, tmp_path)
    launcher = _torchrun(recipe, tmp_path, "--save-interval", "1000")
    _wait_for(lambda: _iterations_logged(tmp_path / "metrics.jsonl") >= 3, launcher)
    os.killpg(launcher.pid, signal.SIGINT)
    launcher.wait(timeout=120)
    saved = _saved_iteration(tmp_path)
    assert saved >= 3 and saved == _last_logged_iteration(tmp_path)
    log = (tmp_path / "torchrun.log").read_text()
    assert "Ctrl-C again to exit at once" in log
    assert f"stopped by SIGINT after iteration {saved}" in log and "[rank" not in log


SLOW_SETUP = textwrap.dedent("""
    import pathlib, runpy, sys, time
    from megatron_gift.engine import trainer
    real_setup, marker = trainer.setup, pathlib.Path(sys.argv[1])
    def held_setup(config):  # set-up, held open until the test has signalled
        marker.write_text("setting up")
        time.sleep(120)
        return real_setup(config)
    trainer.setup = held_setup
    sys.argv = ["examples/pretrain_gift.py", "--config", sys.argv[2]]
    runpy.run_path("examples/pretrain_gift.py", run_name="__main__")
""")


def test_a_signal_while_setting_up_stops_at_once_with_one_line(tiny_world, tmp_path):
    """Nothing is trained yet: the run stops, exits 143, prints one line and leaves no lock.
    Set-up is held open (after the lock is taken) so the signal cannot land in training."""
    recipe = _recipe(tiny_world, tmp_path)
    marker = tmp_path / "setting-up"
    run = _start([sys.executable, "-c", SLOW_SETUP, str(marker), recipe], tmp_path, "setup")
    _wait_for(marker.exists, run)
    assert (tmp_path / "ckpt" / ".megatron_gift.lock").exists()
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    log = (tmp_path / "setup.log").read_text()
    assert "stopped by SIGTERM while setting up: nothing was trained or saved" in log
    assert "Traceback" not in log
    assert not (tmp_path / "ckpt").exists()  # the lock's directory, left empty, is gone too


STOP_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from megatron_gift.engine.signals import StopOnSignal
    released = []
    stop = StopOnSignal(on_exit_at_once=lambda: open(sys.argv[1], "w").write("released"))
    stop.start_training(torch.device("cpu"))
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)  # torchrun's forwarded copy of the same Ctrl-C
    print("recorded", signal.Signals(stop.signum).name, flush=True)
    time.sleep(float(sys.argv[2]))
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("still running", flush=True)
""")


@pytest.mark.parametrize("pause,status", [(2.5, 130), (0.5, 0)],
                         ids=["a-second-ctrl-c-exits-at-once", "a-repeat-within-2s-is-the-same"])
def test_a_second_ctrl_c_exits_at_once(tmp_path, pause, status):
    released = tmp_path / "released"
    result = subprocess.run([sys.executable, "-c", STOP_SCRIPT, str(released), str(pause)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == status, result.stderr
    assert "recorded SIGINT" in result.stdout
    assert ("still running" in result.stdout) == (status == 0)
    assert released.exists() == (status == 130)


def _save_twice_in_one_process(directory):
    """One rank: a tiny model saved twice; no helper process may start."""
    from megatron.core import parallel_state

    from megatron_gift.core import checkpoint
    from support.parallel_harness import tiny_gpt, tiny_gpt_config

    parallel_state.initialize_model_parallel()
    model = tiny_gpt(tiny_gpt_config(), vocab_size=64, seq_length=16)
    for iteration in (1, 2):
        checkpoint.save_checkpoint(directory, iteration, [model], None, None, 0,
                                   {"layout": checkpoint.layout()})
    assert multiprocessing.active_children() == []
    parallel_state.destroy_model_parallel()


def test_saving_starts_no_process(tmp_path):
    """Megatron-Core's default results queue spawns a manager process at the first save (a
    ~10 s stall, and a process that SIGTERM kills before the save it asked for); saves here
    are synchronous and keep their results in process."""
    run_distributed(1, _save_twice_in_one_process, str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / TRACKER).read_text() == "2"


def _children(pid):
    """The pids of ``pid``'s child processes (Linux /proc)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_whose_launcher_is_killed_stop_with_a_complete_checkpoint(tiny_world, tmp_path):
    """``kill -9`` of torchrun forwards nothing: its workers notice their parent is gone, stop
    after the step they are in and save it whole, instead of training on in the background."""
    recipe = _recipe(tiny_world, tmp_path)
    launcher = _torchrun(recipe, tmp_path, "--save-interval", "1000")
    _wait_for(lambda: _iterations_logged(tmp_path / "metrics.jsonl") >= 3, launcher)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 120
    while any(map(_alive, workers)):
        assert time.time() < deadline, "the workers trained on after their launcher died"
        time.sleep(0.1)
    saved = _saved_iteration(tmp_path)
    assert saved >= 3 and saved == _last_logged_iteration(tmp_path)
    assert saved < 100000
    assert "stopped by the launcher exiting after iteration" in (tmp_path / "torchrun.log").read_text()


ONE_RANK_FAILS = textwrap.dedent("""
    import runpy, sys, time
    from megatron_gift.engine import trainer
    from megatron_gift.errors import UserError
    real_setup = trainer.setup
    def setup(spec):  # rank 1 meets bad data; rank 0 is still setting up when it is stopped
        import os
        if os.environ["RANK"] == "1":
            raise UserError("planted: a bad record that only rank 1 reads")
        time.sleep(120)
        return real_setup(spec)
    trainer.setup = setup
    sys.argv = ["examples/pretrain_gift.py", "--config", sys.argv[1]]
    runpy.run_path("examples/pretrain_gift.py", run_name="__main__")
""")


def test_an_error_on_one_rank_is_shown_once_and_not_as_a_signal(tiny_world, tmp_path):
    """Rank 1's error is the console's one line; rank 0, stopped by the launcher because of
    it, does not report a signal."""
    recipe = _recipe(tiny_world, tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(ONE_RANK_FAILS)
    launcher = _start([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                       "--master-port", str(free_port()), str(driver), recipe],
                      tmp_path, "torchrun")
    assert launcher.wait(timeout=180) != 0
    log = (tmp_path / "torchrun.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert errors == ["error: planted: a bad record that only rank 1 reads"], log[-3000:]
    assert "while setting up" not in log
