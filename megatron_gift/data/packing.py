"""Sequence packing: which samples share a sequence.

A sample of ``n`` tokens takes ``n - 1`` input positions of a sequence (its own tokens shifted
by one are its labels, so no label crosses into the next sample). Samples are placed best-fit
decreasing, which leaves little padding and is deterministic.
"""

import bisect
from typing import Sequence


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices whose ``lengths`` (input positions each, ``<= capacity``) sum to
    at most ``capacity``; indices ascend inside a bin and bins are ordered by first index."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free, bins = [], []  # free: sorted (positions left, bin number)
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            left, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (left - lengths[i], b))
    return sorted(sorted(b) for b in bins)
