"""Stopping on request: SIGTERM (SLURM pre-emption, ``kill``) asks the run to save and exit."""

import signal

import torch
import torch.distributed as dist


class StopOnSignal:
    """Records SIGTERM; :meth:`requested` is the same answer on every rank (one MAX all-reduce
    of a flag on ``device``), so all ranks stop after the same iteration."""

    def __init__(self, device: torch.device):
        self.received, self.device = False, device
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
