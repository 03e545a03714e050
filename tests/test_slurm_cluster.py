"""A local two-node SLURM cluster runs multi-node steps, requeues jobs and delivers signals.

These tests bring up ``slurm_cluster.LocalSlurmCluster`` (installing Debian's Slurm packages
where that is possible) and are skipped, with the reason, where Slurm cannot be had.
"""

import os
import sys
import textwrap
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.system]  # the `slurm` fixture: conftest.py


def _script(path, body):
    with open(path, "w") as f:
        f.write("#!/bin/bash\n" + textwrap.dedent(body).lstrip("\n"))
    os.chmod(path, 0o755)
    return str(path)


def _wait_for_file(path, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and os.path.getsize(path):
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: {path} did not appear within {timeout} s")


def _read(path):
    with open(path) as f:
        return f.read()


def test_two_node_job_runs_one_rank_per_node(slurm, tmp_path):
    out = tmp_path / "ranks.txt"
    script = _script(tmp_path / "ranks.sh", f"""
        echo "$SLURM_CLUSTER_TEST_MARKER" > {tmp_path}/marker.txt
        srun --mpi=none bash -c 'echo $SLURM_PROCID $SLURMD_NODENAME' > {out}
    """)
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/job.out", script],
                       cwd=str(tmp_path), env={"SLURM_CLUSTER_TEST_MARKER": "from-the-caller"})
    state = slurm.wait(job, timeout=30)
    log = _read(tmp_path / "job.out") if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED", f"job {job} ended {state}: {slurm.job_info(job)}\n{log}"
    assert sorted(_read(out).split("\n")[:-1]) == ["0 node1", "1 node2"], _read(out) + log
    # sbatch's default --export=ALL hands the caller's environment to the job.
    assert _read(tmp_path / "marker.txt").strip() == "from-the-caller"


def test_requeued_job_runs_again_with_restart_count(slurm, tmp_path):
    done = tmp_path / "restart_count.txt"
    script = _script(tmp_path / "requeue.sh", f"""
        echo "run restart=${{SLURM_RESTART_COUNT-unset}}" >> {tmp_path}/runs.txt
        if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
            scontrol requeue "$SLURM_JOB_ID"
            sleep 60   # killed by the requeue
            exit 3
        fi
        echo "$SLURM_RESTART_COUNT" > {done}
    """)
    job = slurm.sbatch([f"--output={tmp_path}/job.out", script], cwd=str(tmp_path))
    state = slurm.wait(job, timeout=45)
    info = slurm.job_info(job)
    assert state == "COMPLETED", f"job {job} ended {state}: {info}"
    assert _read(done).strip() == "1"
    assert info["Restarts"] == "1"
    assert info["ExitCode"] == "0:0"
    # The batch script ran twice from the top; the first run never got past the requeue.
    assert _read(tmp_path / "runs.txt").splitlines() == ["run restart=unset", "run restart=1"]


def test_scancel_signal_reaches_job_step_tasks(slurm, tmp_path):
    got = tmp_path / "got_term.txt"
    ready = tmp_path / "ready.txt"
    trap = tmp_path / "trap.py"
    trap.write_text(textwrap.dedent(f"""
        import signal, sys, time

        def on_term(signum, frame):
            with open({str(got)!r}, "w") as f:
                f.write("TERM")
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
        with open({str(ready)!r}, "w") as f:
            f.write("ready")
        for _ in range(200):
            time.sleep(0.1)
    """))
    script = _script(tmp_path / "signal.sh", f"""
        srun --mpi=none {sys.executable} {trap}
    """)
    job = slurm.sbatch([f"--output={tmp_path}/job.out", script], cwd=str(tmp_path))
    _wait_for_file(ready, 20, "the job step never started")
    # Without --full: the step's tasks get the signal. With --full srun gets it too and kills
    # the step with SIGKILL before the tasks can handle SIGTERM.
    slurm.run(["scancel", "--signal=TERM", str(job)])
    _wait_for_file(got, 10, "the step's task did not receive SIGTERM")
    assert slurm.wait(job, timeout=20) == "COMPLETED"
