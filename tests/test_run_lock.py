"""One run per save directory: the lock refuses a second live job, names the holder, and takes
over a lock whose process is gone (or this job's own, after a requeue); the takeover is atomic,
processes are told apart across containers and pid reuse, and file systems without hard links
work."""

import errno
import json
import logging
import os
import socket
import threading
import time

import pytest

from megatron_gift.errors import UserError
from megatron_gift.platform import run_lock
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


def _this_process(**changes):
    """A lock record of this process with every identity field, read here from ``/proc``, with
    ``changes`` applied."""
    return _record_of(os.getpid(), **changes)


def _record_of(process, **changes):
    """A lock record of the running process ``process`` of this host, with every identity field."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    with open(f"/proc/{process}/stat") as f:
        stat = f.read()
    record = {"host": socket.gethostname(), "pid": process, "job": None, "started": "now",
              "boot_id": boot_id, "pid_ns": os.stat("/proc/self/ns/pid").st_ino,
              "start_ticks": int(stat[stat.rindex(")") + 1:].split()[19]), "nonce": "0123"}
    record.update(changes)
    return record


def _stale(directory):
    """A lock left by a process of this host that is gone, in the old format."""
    (directory / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": _dead_pid(), "job": None, "started": "then"}))


@pytest.mark.parametrize("variable", ["SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"])
def test_a_requeued_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch, caplog,
                                                                  variable):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv(variable, "777")
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "job": "777", "started": "then"}))
    lock = RunLock(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="megatron_gift.platform.run_lock"):
        lock.acquire()
    assert lock.held and "from this job's earlier start (job 777" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_another_job_or_torchruns_default_run_id_is_not_this_job(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "job": "none", "started": "then"}))
    with pytest.raises(UserError, match="host elsewhere"):
        RunLock(str(tmp_path)).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(UserError, match=f"(?i)if that job is gone, remove {tmp_path / LOCK_NAME}"):
        RunLock(str(tmp_path)).acquire()


def test_a_live_holder_of_the_same_job_on_this_host_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "779")
    (tmp_path / LOCK_NAME).write_text(json.dumps(_this_process(job="779")))
    with pytest.raises(UserError, match="is the save directory of a running job"):
        RunLock(str(tmp_path)).acquire()


def test_a_lock_in_another_pid_namespace_on_this_host_is_respected(tmp_path):
    record = _this_process(pid=_dead_pid())
    record["pid_ns"] += 1  # a container sharing the host name: its pids mean nothing here
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(UserError, match=f"{tmp_path} is the save directory of a job in another "
                                        f"pid namespace on this host .* remove "
                                        f"{tmp_path / LOCK_NAME}"):
        RunLock(str(tmp_path)).acquire()


def test_a_lock_from_another_boot_of_this_host_name_is_respected(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps(_this_process(pid=_dead_pid(),
                                                               boot_id="another-boot")))
    with pytest.raises(UserError, match="from another boot of this host name"):
        RunLock(str(tmp_path)).acquire()


def test_a_reused_pid_is_taken_over(tmp_path, caplog):
    record = _this_process()
    record["start_ticks"] += 1  # the pid runs, but it is not the process that took the lock
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    lock = RunLock(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="megatron_gift.platform.run_lock"):
        lock.acquire()
    assert lock.held and "no longer running" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["nonce"] != "0123"


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch, code):
    def no_hard_links(source, destination):
        raise OSError(code, os.strerror(code), destination)

    monkeypatch.setattr(os, "link", no_hard_links)
    first = RunLock(str(tmp_path / "save"))
    first.acquire()
    assert first.held
    assert json.loads((tmp_path / "save" / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match="is the save directory of a running job"):
        RunLock(str(tmp_path / "save")).acquire()
    first.release()
    assert not (tmp_path / "save").exists()


def test_a_link_reported_existing_after_it_succeeded_is_taken(tmp_path, monkeypatch):
    link = os.link

    def retransmitted(source, destination):  # NFS: the reply to the link was lost
        link(source, destination)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), destination)

    monkeypatch.setattr(os, "link", retransmitted)
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert lock.held and os.listdir(tmp_path) == [LOCK_NAME]
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_being_written_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "UNREADABLE_GRACE_S", 60.0, raising=False)
    path = tmp_path / LOCK_NAME
    path.write_text("")  # created exclusively, not written yet
    writer = threading.Timer(0.2, lambda: path.write_text(json.dumps(_this_process())))
    writer.start()
    try:
        with pytest.raises(UserError, match="is the save directory of a running job"):
            RunLock(str(tmp_path)).acquire()
    finally:
        writer.join()


def test_a_lock_that_stays_unreadable_is_taken_over(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(run_lock, "UNREADABLE_GRACE_S", 0.1, raising=False)
    (tmp_path / LOCK_NAME).write_text('{"host": ')
    lock = RunLock(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="megatron_gift.platform.run_lock"):
        lock.acquire()
    assert lock.held and "stayed unreadable" in caplog.text


def test_a_takeover_abandoned_by_a_start_that_died_is_cleared(tmp_path, caplog):
    _stale(tmp_path)
    stale = json.loads((tmp_path / LOCK_NAME).read_text())
    claim = tmp_path / f"{LOCK_NAME}.takeover.{run_lock._digest(stale)}"
    claim.write_text("")
    os.utime(claim, (0, time.time() - 2 * run_lock.CLAIM_ABANDONED_S))
    lock = RunLock(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="megatron_gift.platform.run_lock"):
        lock.acquire()
    assert lock.held and "a takeover of the lock that stopped" in caplog.text
    assert os.listdir(tmp_path) == [LOCK_NAME]


def test_a_start_that_read_a_stale_lock_leaves_the_lock_another_start_took(tmp_path,
                                                                           monkeypatch):
    """Between this start's read of a stale lock and its takeover, another start (a live
    process of this host) takes the lock over: this start must not take it away."""
    _stale(tmp_path)
    path, read, interleaved = tmp_path / LOCK_NAME, run_lock._read, []
    other = _record_of(os.getppid())

    def read_then_let_the_other_start_in(name):
        record = read(name)
        if name == str(path) and not interleaved:
            interleaved.append(name)
            (tmp_path / "other.draft").write_text(json.dumps(other))
            os.remove(path)
            os.link(tmp_path / "other.draft", path)
            os.remove(tmp_path / "other.draft")
        return record

    monkeypatch.setattr(run_lock, "_read", read_then_let_the_other_start_in)
    lock = RunLock(str(tmp_path))
    with pytest.raises(UserError, match=f"running job \\(host {socket.gethostname()}, pid "
                                        f"{os.getppid()}"):
        lock.acquire()
    assert interleaved and not lock.held and json.loads(path.read_text()) == other
    assert os.listdir(tmp_path) == [LOCK_NAME]  # no draft or moved-aside file left


@pytest.mark.parametrize("starts", [2, 3])
def test_starts_racing_on_a_stale_lock_leave_one_holder(tmp_path, monkeypatch, starts):
    """Threads read the same stale lock, then all take it over at once: one holds it."""
    read = run_lock._read
    for attempt in range(25):
        save = tmp_path / str(attempt)
        save.mkdir()
        _stale(save)
        all_read, have_read = threading.Barrier(starts, timeout=30), set()

        def read_together(path, all_read=all_read, have_read=have_read):
            record = read(path)
            if path.endswith(LOCK_NAME) and threading.get_ident() not in have_read:
                have_read.add(threading.get_ident())
                all_read.wait()
            return record

        monkeypatch.setattr(run_lock, "_read", read_together)
        outcomes = _race([RunLock(str(save)) for _ in range(starts)])
        assert sorted(outcomes) == ["held"] + ["refused"] * (starts - 1), (attempt, outcomes)
        assert os.listdir(save) == [LOCK_NAME]


def _race(locks):
    """Each lock acquired by its own thread at once: ``held``, ``refused`` or the error."""
    outcomes = [None] * len(locks)

    def start(i):
        try:
            locks[i].acquire()
            outcomes[i] = "held"
        except UserError:
            outcomes[i] = "refused"
        except Exception as error:  # noqa: BLE001 (reported by the assertion)
            outcomes[i] = repr(error)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(locks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes
