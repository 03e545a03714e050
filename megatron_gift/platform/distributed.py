"""The process group of a run: NCCL on GPUs, gloo with the CPU compatibility layer elsewhere.

A run is started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``,
``LOCAL_RANK``) or as one plain process, which becomes a world of one on a free local port.
"""

import contextlib
import os
import socket
from typing import Iterator

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    """The job's world size as torchrun announces it (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> None:
    """Join the job's process group: this rank's GPU (``LOCAL_RANK``) and NCCL where CUDA is
    present, else gloo with :func:`megatron_gift.platform.cpu.enable_cpu_megatron` applied."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        torch.accelerator.set_device_index(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        from megatron_gift.platform.cpu import enable_cpu_megatron

        enable_cpu_megatron()
        dist.init_process_group(backend="gloo")


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
