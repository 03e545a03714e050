"""Work that one rank does while the others wait, converting a model or tokenising a data set,
and the cache where its results are kept.

The waiting ranks poll the file system instead of entering a collective, so the work may take
longer than a process group's timeout (10 minutes for NCCL by default), as converting a 70B
model or tokenising a large data set does. A failure of the working rank is written to a marker
file that the waiting ranks raise; the marker names the job, so one left by an earlier job is
ignored. The working rank removes the marker again after :data:`MARKER_GRACE_POLLS` polling
intervals (it writes none where no rank waits), so failures leave nothing in the cache.
"""

import contextlib
import os
import time
from typing import Callable, Optional

from megatron_gift.errors import UserError

_USER = "user"
WAIT_LIMIT_S = float(os.environ.get("MEGATRON_GIFT_WAIT_LIMIT_S", 6 * 3600))
MARKER_GRACE_POLLS = 6  # how long a failure marker stays: the waiting ranks poll in between


def cache_root() -> str:
    """``$MEGATRON_GIFT_CACHE``, else ``~/.cache/megatron_gift``: converted models at the top,
    tokenised data under ``data/``. Every node of a job must see the same directory."""
    return (os.environ.get("MEGATRON_GIFT_CACHE")
            or os.path.join(os.path.expanduser("~"), ".cache", "megatron_gift"))


def build_once(ready: Callable[[], bool], build: Callable[[], object], is_worker: bool,
               marker: str, what: str, poll_s: float = 0.5, others_wait: bool = True) -> bool:
    """Run ``build()`` on the worker unless ``ready()``; elsewhere wait until ``ready()``.

    ``marker``: a path beside the result where the worker's failure is shown to the waiting
    ranks for a moment; ``what``: the work, for messages; ``others_wait``: whether any rank
    waits (no marker otherwise). Returns True where this process built the result.
    """
    if is_worker:
        if ready():
            return False
        with contextlib.suppress(FileNotFoundError):  # a killed job's marker
            os.remove(marker)
        try:
            build()
        except Exception as error:
            if others_wait:
                _write_marker(marker, error)
                try:  # a launcher that stops this rank meanwhile interrupts the sleep (SIGTERM)
                    time.sleep(MARKER_GRACE_POLLS * poll_s)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(marker)
            raise
        return True
    start = time.monotonic()
    while not ready():
        failure = _read_marker(marker)
        if failure is not None:
            kind, message = failure
            if kind == _USER:  # the same bad input: the same one-line error, here too
                raise UserError(message)
            raise RuntimeError(f"{what} failed on the rank doing it: {message}")
        if time.monotonic() - start > WAIT_LIMIT_S:
            raise TimeoutError(f"waited {WAIT_LIMIT_S:.0f} s for {what}; is {marker!r}'s directory "
                               "on a file system every node sees? (MEGATRON_GIFT_WAIT_LIMIT_S)")
        time.sleep(poll_s)
    return False


def _job():
    env = os.environ
    return (f"{env.get('TORCHELASTIC_RUN_ID', '')}@{env.get('MASTER_ADDR', '')}:"
            f"{env.get('MASTER_PORT', '')}")


def _write_marker(marker: str, error: BaseException) -> None:
    """``marker`` holds three parts, a line each: the job, the kind of failure (a user error
    or anything else), the message."""
    os.makedirs(os.path.dirname(os.path.abspath(marker)), exist_ok=True)
    kind, message = ((_USER, str(error)) if isinstance(error, UserError)
                     else ("other", f"{type(error).__name__}: {error}"))
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{_job()}\n{kind}\n{message}")
    os.replace(tmp, marker)


def _read_marker(marker: str) -> Optional[tuple[str, str]]:
    """``(kind, message)`` of this job's failure marker, or None."""
    try:
        with open(marker) as f:
            job, _, rest = f.read().partition("\n")
    except FileNotFoundError:
        return None
    kind, _, message = rest.partition("\n")
    return (kind, message) if job == _job() else None
