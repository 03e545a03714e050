"""The vocab rows a model holds: the tokenizer's vocab padded as Megatron-Core pads it, here and
in the memory planner alike (plain Python: the planner imports no torch)."""

import math


def padded_vocab_size(vocab_size: int, multiple: int, tensor_parallel: int) -> int:
    """``vocab_size`` padded to a multiple of ``lcm(multiple, tensor_parallel)`` (rows, all TP
    ranks together). Unlike Megatron-LM's ``128 * tp`` this does not change with TP (for TP
    dividing ``multiple``), so checkpoints load at any layout."""
    step = math.lcm(multiple, tensor_parallel)
    return -(-vocab_size // step) * step
