"""The process group of a run: NCCL on GPUs, gloo with the CPU compatibility layer elsewhere.

A run is started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``LOCAL_RANK``), by ``srun`` one process per GPU (SLURM's variables, adopted by
:mod:`.launcher_env` in srun's tasks only), or as one plain process, which becomes a world of one
on a free local port. Outside torchrun the ranks meet at rank 0's TCP store within
``MEGATRON_GIFT_RENDEZVOUS_TIMEOUT_S`` seconds (default 600); a rank whose peers never come
fails with a message naming the address, the port and where they came from.
"""

import contextlib
import datetime
import os
import socket
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_gift.errors import RendezvousError
from megatron_gift.platform.launcher_env import (adopt_slurm_ranks, describe_rendezvous,
                                                  device_index)


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    """The job's world size as torchrun (or SLURM) announces it (1 for a plain process)."""
    adopt_slurm_ranks()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Join the job's process group: this rank's GPU (:func:`set_local_device`) and NCCL where
    CUDA is present, else gloo with :func:`megatron_gift.platform.cpu.enable_cpu_megatron`
    applied."""
    adopt_slurm_ranks()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        set_local_device()
        backend = "nccl"
    else:
        from megatron_gift.platform.cpu import enable_cpu_megatron

        enable_cpu_megatron()
        backend = "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's own rendezvous
        dist.init_process_group(backend=backend)
    else:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend=backend, store=_meet_peers(rank, world), rank=rank,
                                world_size=world)


def set_local_device() -> int:
    """Make this rank's device the current one and return its index: the rule of
    :func:`~megatron_gift.platform.launcher_env.device_index` applied to ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE`` and the devices this process sees (one, where SLURM binds a GPU to
    each task)."""
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    index = device_index(int(os.environ.get("LOCAL_RANK", "0")),
                         torch.accelerator.device_count(),
                         int(local_world) if local_world else None)
    torch.accelerator.set_device_index(index)
    return index


def _meet_peers(rank: int, world_size: int) -> "dist.TCPStore":
    """Rank 0's TCP store at MASTER_ADDR:MASTER_PORT, reached by every rank within the
    rendezvous timeout; RendezvousError naming what was tried when the peers do not come."""
    timeout = float(os.environ.get("MEGATRON_GIFT_RENDEZVOUS_TIMEOUT_S", "600"))
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        return dist.TCPStore(host, port, world_size, is_master=rank == 0,
                             timeout=datetime.timedelta(seconds=timeout), wait_for_workers=True)
    except (RuntimeError, OSError) as error:  # DistNetworkError, DistStoreError: timeouts
        waited = "for the other ranks" if rank == 0 else "for rank 0"
        raise RendezvousError(
            f"rank {rank} of {world_size} waited {timeout:.0f} s {waited} at {host}:{port} and "
            f"gave up ({type(error).__name__}): {describe_rendezvous()}. Check that every rank "
            "was started, that MASTER_ADDR resolves to rank 0's host from every node and that "
            "the port is open between them (MEGATRON_GIFT_RENDEZVOUS_TIMEOUT_S sets the "
            "wait)") from None


def local_device() -> torch.device:
    """This rank's accelerator (chosen by :func:`init_distributed`), or the CPU."""
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        return torch.device(accelerator.type, torch.accelerator.current_device_index())
    return torch.device("cpu")


@contextlib.contextmanager
def world_of_one(seed: int = 0) -> Iterator[None]:
    """A one-process gloo world with Megatron's parallel state at TP = PP = 1, for work done in
    host memory (conversion); the caller must not already be in a process group."""
    from megatron.core import parallel_state, tensor_parallel

    if dist.is_initialized():
        raise RuntimeError("a world of one needs its own process (run it in a subprocess)")
    if not torch.cuda.is_available():
        from megatron_gift.platform.cpu import enable_cpu_megatron

        enable_cpu_megatron()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
