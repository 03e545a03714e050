"""The passes the GIFT loss makes over its logits, and which implementation runs them.

One rank's shard: student logits ``z`` and reference logits ``r``, ``[rows, V_local]``::

    maxima           [rows, 2]   max of z and of r                (then a MAX all-reduce)
    statistics       [rows, 7]   the sums below, shifted by the maxima (then a SUM all-reduce)
    soft_target_gap  [rows, V_local] fp32  softmax(z) - g * p'    (kept for the backward)
    logits_grad      [rows, shard]  gap * dloss + label term      (the backward)

Implementations (``implementation=`` of :func:`megatron_gift.loss.vocab_parallel_gift_loss`):

- ``eager`` (:mod:`.eager`): chunked PyTorch ops; every device and dtype.
- ``triton`` (:mod:`.triton_kernels`): one fused kernel per pass, each reading the logits once;
  CUDA tensors in fp32/bf16/fp16 (or any device under ``TRITON_INTERPRET=1``, as the CPU tests
  run it).
- ``auto``: ``triton`` for CUDA tensors where Triton is installed, else ``eager``.
"""

import os
from typing import Optional

import torch

IMPLEMENTATIONS = ("auto", "triton", "eager")


def triton_can_run(device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else why not (one phrase)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return f"tensors are on {device.type}, and the Triton kernels need CUDA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def select(implementation: str, logits: torch.Tensor):
    """The passes object for ``implementation`` on these logits (``auto``: Triton for CUDA
    tensors where it can run, else eager); ValueError when ``triton`` is asked for where it
    cannot run."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: choose one of {IMPLEMENTATIONS}")
    if implementation == "eager":
        return _eager()
    why_not = triton_can_run(logits.device)
    if why_not is None and logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        why_not = f"the Triton kernels take fp32/bf16/fp16 logits, not {logits.dtype}"
    if why_not is None and (implementation == "triton" or logits.device.type == "cuda"):
        from megatron_gift.loss.triton_kernels import TritonPasses

        return TritonPasses()
    if implementation == "triton":
        raise ValueError(f"implementation='triton' cannot run here: {why_not}; use 'auto' or "
                         "'eager'")
    return _eager()


def _eager():
    from megatron_gift.loss.eager import EagerPasses

    return EagerPasses()
