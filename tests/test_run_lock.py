"""One run per save directory: the lock refuses a second live job, names the holder, and takes
over a lock whose process is gone."""

import json
import logging
import os
import socket

import pytest

from megatron_gift.errors import UserError
from megatron_gift.platform.run_lock import LOCK_NAME, RunLock


def _dead_pid():
    """A process id no process has now (searched downwards from the kernel's largest)."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) - 1
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_a_second_run_is_refused_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    first = RunLock(str(tmp_path / "save"))
    first.acquire()
    holder = json.loads((tmp_path / "save" / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["job"] == "4242"
    with pytest.raises(UserError, match=f"{tmp_path / 'save'} is the save directory of a running "
                                        f"job \\(host {socket.gethostname()}, pid {os.getpid()}, "
                                        "job 4242"):
        RunLock(str(tmp_path / "save")).acquire()
    first.release()
    assert not (tmp_path / "save").exists()  # made by the lock and left empty: removed
    again = RunLock(str(tmp_path / "save"))
    again.acquire()  # free again
    (tmp_path / "save" / "iter_0000001").mkdir()
    again.release()
    assert os.listdir(tmp_path / "save") == ["iter_0000001"]  # a run's output stays


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": _dead_pid(), "job": None, "started": "then"}))
    lock = RunLock(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="megatron_gift.platform.run_lock"):
        lock.acquire()
    assert "taking over the lock" in caplog.text and lock.held
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_host_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "job": "77", "started": "now"}))
    with pytest.raises(UserError, match="host elsewhere, pid 1, job 77"):
        RunLock(str(tmp_path)).acquire()
