"""One run per save directory: a lock file held for the life of the run.

``SAVE/.megatron_gift.lock`` is created by global rank 0 and records its holder: host, pid, job
id (``SLURM_JOB_ID``, else torchrun's ``TORCHELASTIC_RUN_ID`` unless it is the default
``none``), start time, and what tells that process apart from any other: the kernel's boot id,
the pid namespace, the process's start time in clock ticks and a random nonce. A second run into
the same directory is refused, naming the directory and the holder. A lock is taken over, with a
message, when

* its process no longer runs: same host, boot and pid namespace, and the pid is gone or belongs
  to another process now (its start time differs);
* it is this job's own and cannot be checked from here: SLURM requeued the job with the same job
  id (or torchrun restarted the run with the same run id) and rank 0 now runs on another node.
  A holder checked here and found running is refused even with the same job id (two live steps
  of one job into one save directory are a mistake, not a requeue); two live steps of one job
  on different nodes cannot be told from a requeue, and the later one takes the lock over;
* it stays unreadable for :data:`UNREADABLE_GRACE_S` (a start that died while writing it).

A lock that cannot be checked from here (another host, another boot of this host name, or
another pid namespace on this host: a container sharing the host name) is refused; the message
says to remove it if that job is gone. Locks without the identity fields (older ones) are judged
by host and pid alone.

The lock is published atomically: a complete draft is hard-linked to the lock's name. Where the
file system has no hard links it is created with ``O_CREAT | O_EXCL`` and then written, so a
reader may see it empty or partial: readers wait for it to become readable (the grace above).
On NFS a retransmitted ``link`` can report EEXIST after it succeeded: a lock holding this very
attempt's record (its nonce) counts as taken. A stale lock is taken over under a claim on that
holder (``LOCK.takeover.<digest>``, created exclusively; one start at a time holds it, and one
left by a start that died is cleared after :data:`CLAIM_ABANDONED_S`): the claimant checks the
lock still holds that holder, renames it to a unique name, checks the renamed file once more
(renaming it back if it is not that holder) and removes it; then every start links again and
one wins.
"""

import errno
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from typing import Optional, Tuple

from megatron_gift.errors import UserError

LOCK_NAME = ".megatron_gift.lock"
UNREADABLE_GRACE_S = 2.0
CLAIM_ABANDONED_S = 30.0
_POLL_S = 0.05
_ATTEMPTS = 20
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_MISSING = object()
ALIVE, GONE, UNCHECKABLE = "alive", "gone", "uncheckable"
log = logging.getLogger(__name__)


class RunLock:
    """The lock on ``save_dir``; :meth:`acquire` takes it, :meth:`release` gives it back."""

    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LOCK_NAME)
        self.held = False
        self.made_directory = False
        self.record: Optional[dict] = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raises UserError while another run holds
        it."""
        directory = os.path.dirname(self.path)
        self.made_directory = not os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        self.record = _holder()
        data = json.dumps(self.record).encode()
        draft = f"{self.path}.{os.getpid()}.{self.record['nonce']}"
        _write_draft(draft, data)
        try:
            self._take(draft, data)
        finally:
            _remove(draft)

    def _take(self, draft: str, data: bytes) -> None:
        """Publish ``draft`` under the lock's name, taking over a stale lock in its way."""
        for _ in range(_ATTEMPTS):
            if _publish(draft, self.path, data):
                self.held = True
                return
            holder = _settled_holder(self.path)
            if holder is _MISSING:
                continue  # released or moved aside meanwhile: try again
            if holder == self.record:  # our own link, reported EEXIST by a retransmission
                self.held = True
                return
            self._refuse_or_announce(holder)
            _take_over(self.path, holder)
        raise UserError(f"could not take the lock {self.path}: other starts kept replacing it "
                        "meanwhile; start this run again")

    def _refuse_or_announce(self, holder: Optional[dict]) -> None:
        """Raise UserError when ``holder`` must be respected; else log why it is taken over."""
        directory = os.path.dirname(self.path)
        if holder is None:
            log.info(f"taking over the lock on {directory}: {self.path} stayed unreadable for "
                     f"{UNREADABLE_GRACE_S} s (a start that died while writing it)")
            return
        verdict, where = _judge(holder)
        if verdict == GONE:
            log.info(f"taking over the lock on {directory} from a job that is no longer running "
                     f"({_describe(holder)})")
        elif verdict == UNCHECKABLE and _same_job(holder):
            log.info(f"taking over the lock on {directory} from this job's earlier start (job "
                     f"{holder['job']}, requeued or restarted; {_describe(holder)})")
        elif verdict == ALIVE:
            raise UserError(
                f"{directory} is the save directory of a running job ({_describe(holder)}); give "
                f"this run its own --save, or stop that one. If that job is gone, remove "
                f"{self.path}")
        else:
            raise UserError(
                f"{directory} is the save directory of a job {where} that cannot be checked from "
                f"here ({_describe(holder)}); give this run its own --save, or if that job is "
                f"gone, remove {self.path}")

    def release(self) -> None:
        """Give the lock back; a save directory this lock made and the run left empty (it
        failed before saving anything) goes too."""
        if self.held and _read(self.path) == self.record:
            _remove(self.path)
            directory = os.path.dirname(self.path)
            if self.made_directory and not os.listdir(directory):
                os.rmdir(directory)
        self.held = False


def _holder() -> dict:
    """This process's record: who it is, and what tells it apart from every other process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "boot_id": _boot_id(),
            "pid_ns": _pid_namespace(), "start_ticks": _start_ticks(os.getpid()),
            "nonce": secrets.token_hex(8)}


def _job_id() -> Optional[str]:
    """SLURM's job id, else torchrun's run id unless it is torchrun's default ``none``."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return os.environ.get("SLURM_JOB_ID") or (run_id if run_id not in (None, "", "none")
                                              else None)


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> Optional[int]:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _start_ticks(pid: int) -> Optional[int]:
    """When process ``pid`` started, in clock ticks after boot (field 22 of its stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 1:].split()[19])  # fields 3.. follow the name
    except (OSError, ValueError, IndexError):
        return None


def _write_draft(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(draft: str, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (False): a hard link of ``draft``, or an
    exclusive create where the file system has no hard links."""
    try:
        os.link(draft, path)
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        log.debug(f"no hard links in {os.path.dirname(path)} ({error.strerror}): creating the "
                  "lock exclusively")
        return _create_exclusive(path, data)
    return True


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` unless it exists (False), then write and sync ``data``: readers may see
    it empty or partial meanwhile."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _remove(path)
        raise
    return True


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _settled_holder(path: str) -> Optional[dict] | object:
    """The lock's record; None when it stays unreadable for the grace (an exclusive create may
    be seen before it is written); ``_MISSING`` when it went away."""
    deadline = time.monotonic() + UNREADABLE_GRACE_S
    holder = _read(path)
    while holder is None:
        if not os.path.lexists(path):
            return _MISSING
        if time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_S)
        holder = _read(path)
    return holder


def _take_over(path: str, holder: Optional[dict]) -> None:
    """Move the stale lock ``holder`` out of ``path`` if it is still there, under a claim on that
    holder that one start at a time holds (an exclusive create): no start removes a lock other
    than the one it judged stale."""
    claim = f"{path}.takeover.{_digest(holder)}"
    if not _create_exclusive(claim, b""):
        _clear_if_abandoned(claim)
        time.sleep(_POLL_S)  # another start is taking it over: see what it left
        return
    try:
        if _read(path) == holder:
            _move_aside(path, holder)
    finally:
        _remove(claim)


def _digest(holder: Optional[dict]) -> str:
    return hashlib.sha256(json.dumps(holder, sort_keys=True).encode()).hexdigest()[:16]


def _clear_if_abandoned(claim: str) -> None:
    """Remove a claim older than :data:`CLAIM_ABANDONED_S` (its start died while taking over;
    a takeover takes milliseconds)."""
    try:
        age = time.time() - os.stat(claim).st_mtime
    except FileNotFoundError:
        return
    if age > CLAIM_ABANDONED_S:
        log.info(f"removing {claim}: a takeover of the lock that stopped {age:.0f} s ago")
        _remove(claim)


def _move_aside(path: str, holder: Optional[dict]) -> None:
    """Rename the lock ``holder`` to a unique name and remove it; a file that is not that lock
    after all (replaced meanwhile) is renamed back."""
    aside = f"{path}.stale.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != holder:
        os.rename(aside, path)  # keeps the file itself, so a writer still writing it is not lost
        return
    _remove(aside)


def _judge(holder: dict) -> Tuple[str, str]:
    """ALIVE or GONE where the holder can be checked from here; else UNCHECKABLE and where it
    is. Fields a record lacks (an older lock) are not compared."""
    if holder.get("host") != socket.gethostname():
        return UNCHECKABLE, "on another host"
    if _differs(holder.get("boot_id"), _boot_id()):
        return UNCHECKABLE, "from another boot of this host name (a restart, or another machine)"
    if _differs(holder.get("pid_ns"), _pid_namespace()):
        return UNCHECKABLE, "in another pid namespace on this host (another container)"
    return (ALIVE if _runs(holder) else GONE), "on this host"


def _differs(recorded: object, here: object) -> bool:
    return recorded is not None and here is not None and recorded != here


def _runs(holder: dict) -> bool:
    """Whether the holder's process runs: its pid exists and, where recorded, started when the
    holder's did (else the pid was reused)."""
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded, now = holder.get("start_ticks"), _start_ticks(pid)
    return recorded is None or now is None or recorded == now


def _same_job(holder: dict) -> bool:
    job = _job_id()
    return job is not None and holder.get("job") == job


def _describe(holder: dict) -> str:
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('started')}"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
