"""Grouping genome items into reads: one contiguous reference read serves a run of items.

Shared by the workers' window and variant readers and by the client's REF check at plan time, so
both read the reference the same bounded way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: a gap wider than this between consecutive windows starts a new read instead of reading through it
MAX_GAP_BASES = 1 << 16


def group_reads(chroms: list[str], starts: np.ndarray, ends: np.ndarray,
                chunk_bases: int, length: int) -> Iterator[tuple[int, int]]:
    """Split items (in output order) into runs [i, j) that one contiguous read can serve.

    A run ends when the contig changes, an item starts before the run's first item, the read
    would exceed max(chunk_bases, length) bases, the run holds max(1, chunk_bases // length)
    items, or a gap of more than MAX_GAP_BASES would be read through.
    """
    budget, max_items = max(chunk_bases, length), max(1, chunk_bases // length)
    i, n = 0, len(starts)
    while i < n:
        lo, hi, j = int(starts[i]), int(ends[i]), i + 1
        while j < n and j - i < max_items and chroms[j] == chroms[i] and starts[j] >= lo \
                and max(hi, ends[j]) - lo <= budget and starts[j] <= hi + MAX_GAP_BASES:
            hi = max(hi, int(ends[j]))
            j += 1
        yield i, j
        i = j
