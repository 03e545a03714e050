"""What LoRA adapters add to a plan: their parameters and what they keep for the backward.

A LoRA run (the ``lora`` section; :mod:`megatron_gift.core.lora` builds it) trains adapters
``A`` ``[r, in]`` and ``B`` ``[out, r]`` on the target linears of every layer and freezes the
rest; its reference is the student with the adapters off (no weights of its own). The frozen
base takes no gradient buffer and no optimizer state, and a frozen Megatron-Core linear
(``tensor_parallel.layers.linear_with_frozen_weight``) keeps only its weight, not its input:
each adapter keeps what its own matmuls need. Counts here are per GPU; :mod:`.memory` adds them
to the base's. Plain Python: it imports nothing of this package's planner (no cycle) and
neither torch nor Megatron-Core.
"""

from typing import Optional, Protocol


class Run(Protocol):
    """The fields of :class:`megatron_gift.planning.memory.Run` these counts read."""

    hidden_size: int
    kv_channels: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    tensor_parallel: int
    param_bytes: int
    device: str
    lora_rank: Optional[int]
    lora_targets: tuple[str, ...]
    lora_dropout: float


# The linears that take adapters, in the order a layer runs them, and those split on their
# output (column-parallel: A replicated, B split); the others are split on their input
# (row-parallel: A split, B replicated), as megatron_gift.core.lora.COLUMN_PARALLEL.
TARGET_ORDER = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")


def linear_shape(run: Run, name: str) -> tuple[int, int]:
    """``(in, out)`` of the linear ``name`` of one layer, all TP ranks together: QKV ``h ->
    (a + 2g) d``, the projection ``a d -> h``, the SwiGLU fc1 ``h -> 2 ffn``, fc2 ``ffn ->
    h``."""
    h, d = run.hidden_size, run.kv_channels
    attention = run.num_attention_heads * d
    return {"linear_qkv": (h, attention + 2 * run.num_query_groups * d),
            "linear_proj": (attention, h),
            "linear_fc1": (h, 2 * run.ffn_hidden_size),
            "linear_fc2": (run.ffn_hidden_size, h)}[name]


def local_input(run: Run, name: str) -> int:
    """The input width one GPU's adapter on ``name`` takes: the whole input of a
    column-parallel linear, ``in / tp`` of a row-parallel one."""
    width = linear_shape(run, name)[0]
    return width if name in COLUMN_PARALLEL else width // run.tensor_parallel


def adapter_parameters(run: Run, name: str) -> int:
    """Parameters on one GPU of the adapter on ``name``: column-parallel ``A`` ``[r, in]``
    (replicated) and ``B`` ``[out / tp, r]``; row-parallel ``A`` ``[r, in / tp]`` and ``B``
    ``[out, r]`` (replicated) (``_LoraMixin._add_adapter``)."""
    width_in, width_out = linear_shape(run, name)
    if name in COLUMN_PARALLEL:
        width_out //= run.tensor_parallel
    return run.lora_rank * (local_input(run, name) + width_out)


def layer_adapter_parameters(run: Run) -> int:
    """Parameters of one layer's adapters on one GPU (0 without LoRA)."""
    if run.lora_rank is None:
        return 0
    return sum(adapter_parameters(run, name) for name in run.lora_targets)


def adapter_activations(run: Run, name: str, tokens: float) -> float:
    """Bytes the adapter on ``name`` keeps for one micro-batch of ``tokens`` tokens on one
    GPU (``s / cp x b``, the whole sequence: a column adapter gathers its input from the
    sequence-parallel region, a row adapter's input is never split over the sequence), from
    ``_LoraMixin._adapter``:

    * ``x @ A^T`` keeps its input ``[T, in_local]`` in the activation dtype: the base layer's
      input itself (which the frozen base no longer keeps) or, under sequence parallelism, the
      column adapter's own gathered copy;
    * ``low @ B^T`` keeps the low-rank product ``[T, r]``;
    * with ``lora.dropout > 0`` the matmul keeps the dropped input instead, and the dropout
      its mask: on CUDA ``native_dropout``'s bool mask, on a CPU the scaled noise in the
      activation dtype.
    """
    e, width = run.param_bytes, local_input(run, name)
    mask = 0
    if run.lora_dropout > 0:
        mask = 1 if run.device == "cuda" else e
    return tokens * (width * (e + mask) + run.lora_rank * e)
