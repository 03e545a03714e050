"""Stopping on request: SIGTERM and Ctrl-C (SIGINT) save the run and exit, on every rank.

What a run does with each signal (see docs/training/resume-and-stop.md):

===========================  ==============================================  ===========
signal                       effect                                          exit status
===========================  ==============================================  ===========
SIGTERM or SIGINT while      stop at once: nothing was trained yet, nothing  128 + signal
setting up                   is saved (:class:`~megatron_gift.errors.        (143, 130)
                             Interrupted`)
SIGTERM while training       finish the step, save it, exit (repeats change  0
                             nothing)
first Ctrl-C while training  the same: finish the step, save it, exit        0
a second Ctrl-C              exit at once, without saving                    130
===========================  ==============================================  ===========

A launcher that dies without forwarding anything (``kill -9`` of torchrun) is noticed too: a
worker started by torchrun whose parent process is gone stops as on SIGTERM, after the step it
is in, with a complete checkpoint (no worker trains on in the background).

The signal may reach every rank (SLURM, a terminal's Ctrl-C) or only the launcher (``kill``,
``docker stop``, Kubernetes): torchrun forwards SIGTERM and SIGINT to its workers. A terminal's
Ctrl-C therefore arrives twice at each worker (from the terminal and from torchrun): a SIGINT
counts as the second only :data:`REPEAT_WINDOW_S` seconds after the first.
"""

import logging
import os
import signal
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_gift.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_WINDOW_S = 2.0
EXIT_AT_ONCE = 128 + signal.SIGINT
log = logging.getLogger(__name__)


class StopOnSignal:
    """Installs handlers for :data:`STOP_SIGNALS` (main thread only) until :meth:`restore`.

    Before :meth:`start_training` a signal raises :class:`Interrupted`; after it a signal is
    recorded, and :meth:`requested` gives every rank the same answer (one MAX all-reduce), so
    all ranks stop after the same iteration. ``on_exit_at_once`` runs before a second Ctrl-C
    ends the process (it releases the run lock).
    """

    def __init__(self, on_exit_at_once: Callable[[], None] = lambda: None):
        self.signum: Optional[int] = None
        self.training = False
        self.device: Optional[torch.device] = None
        self._first_at = 0.0
        self._on_exit_at_once = on_exit_at_once
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        # torchrun's workers are its children: a new parent means the launcher is gone.
        self._launcher = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None

    def start_training(self, device: torch.device) -> None:
        """From now on a signal means: save at the end of the step. ``device``: where the
        all-reduce of :meth:`requested` runs (this rank's device)."""
        self.training, self.device = True, device
        if self.signum is not None:  # arrived between set-up and now: honour it
            self._first_at = time.monotonic()

    def requested(self, time_is_up: bool = False) -> Optional[str]:
        """Why every rank stops now: the name of the stop signal any rank received
        (``"SIGTERM"``), else ``"the launcher exiting"`` when any rank lost its launcher, else
        ``"the exit duration"`` when ``time_is_up`` on any rank, else None. One MAX
        all-reduce."""
        flags = torch.tensor([self.signum or 0, int(self.launcher_gone()), int(time_is_up)],
                             dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        received, orphaned, time_up = (int(v) for v in flags.tolist())
        if received:
            return signal.Signals(received).name
        if orphaned:
            return "the launcher exiting"
        return "the exit duration" if time_up else None

    def launcher_gone(self) -> bool:
        """True when this worker's torchrun launcher has died (it has another parent now)."""
        return self._launcher is not None and os.getppid() != self._launcher

    def restore(self) -> None:
        """Put back the handlers that were installed before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if not self.training:
            if self.signum is None:  # the first one unwinds set-up; repeats change nothing
                self.signum = signum
                raise Interrupted(signum)
            return
        if self.signum is None:
            self.signum, self._first_at = signum, now
            again = " (Ctrl-C again to exit at once, without saving)" \
                if signum == signal.SIGINT else ""
            log.info(f"{signal.Signals(signum).name} received: saving at the end of this step, "
                     f"then exiting{again}")
        elif signum == signal.SIGINT and now - self._first_at > REPEAT_WINDOW_S:
            log.info("second Ctrl-C: exiting at once, without saving")
            for handler in logging.getLogger("megatron_gift").handlers:
                handler.flush()
            self._on_exit_at_once()
            os._exit(EXIT_AT_ONCE)
