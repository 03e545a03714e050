"""One run per save directory: a lock file held for the life of the run.

``SAVE/.megatron_gift.lock`` is created atomically by global rank 0 and holds the host, the pid,
the job id (``SLURM_JOB_ID`` or torchrun's run id) and the start time. A second run into the
same directory is refused, naming the directory and the holder; a lock left by a process that
no longer runs on this host is taken over with a message. (A lock from another host cannot be
checked from here: it is refused, and the message says to remove it if that job is gone.)
"""

import json
import logging
import os
import socket
import time
from typing import Optional

from megatron_gift.errors import UserError

LOCK_NAME = ".megatron_gift.lock"
log = logging.getLogger(__name__)


class RunLock:
    """The lock on ``save_dir``; :meth:`acquire` takes it, :meth:`release` gives it back."""

    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LOCK_NAME)
        self.held = False
        self.made_directory = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; raises UserError while another run holds
        it."""
        directory = os.path.dirname(self.path)
        self.made_directory = not os.path.isdir(directory)
        os.makedirs(directory, exist_ok=True)
        me = _holder()
        draft = f"{self.path}.{os.getpid()}"
        with open(draft, "w") as f:
            json.dump(me, f)
        try:
            self._take(draft)
        finally:
            _remove(draft)

    def _take(self, draft: str) -> None:
        """Link the complete ``draft`` to the lock's name (atomic: the lock is never seen
        half-written), taking over a stale lock once."""
        for _ in range(2):
            try:
                os.link(draft, self.path)
            except FileExistsError:
                holder = _read(self.path)
                if holder is not None and _is_alive(holder):
                    raise UserError(
                        f"{os.path.dirname(self.path)} is the save directory of a running job "
                        f"({_describe(holder)}); give this run its own --save, or stop that one. "
                        f"If that job is gone, remove {self.path}") from None
                log.info(f"taking over the lock on {os.path.dirname(self.path)} from a job that "
                         f"is no longer running ({_describe(holder) if holder else 'unreadable'})")
                _remove(self.path)
                continue
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}: another job took it meanwhile")

    def release(self) -> None:
        """Give the lock back; a save directory this lock made and the run left empty (it
        failed before saving anything) goes too."""
        if self.held and (_read(self.path) or {}).get("pid") == os.getpid():
            _remove(self.path)
            directory = os.path.dirname(self.path)
            if self.made_directory and not os.listdir(directory):
                os.rmdir(directory)
        self.held = False


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_alive(holder: dict) -> bool:
    """A holder on another host counts as alive (it cannot be checked from here)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    job = f", job {holder['job']}" if holder.get("job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {holder.get('started')}"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
