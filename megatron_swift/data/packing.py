"""Pack variable-length samples into rows of a fixed length by best-fit decreasing.

Longest samples are placed first, each into the open row whose free space is
smallest but still enough (a new row when none is). The result depends only
on the lengths, so every rank computes the same rows.
"""
from __future__ import annotations

import bisect
from typing import List, Sequence


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Rows of sample indices; every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    free: List[tuple] = []  # sorted (free space, row index)
    for i in order:
        need = lengths[i]
        if need > capacity:
            raise ValueError(f"sample {i} has {need} tokens, more than the row length {capacity}")
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - need > 0:
            bisect.insort(free, (space - need, row))
    return rows
