"""Sort more lines than should be held in memory: sorted runs spilled to disk, then merged.

The audit ledger of a 100,000-shard run is 100,000 JSON lines ordered by time; sorting them in
one list would make the client's peak memory grow with the job. Lines are held ``chunk`` at a
time, each full chunk is sorted and written to a temporary file, and the files are merged
lazily (``heapq.merge``), so memory is one chunk plus one line per spilled run.
"""

from __future__ import annotations

import heapq
import itertools
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO

#: (sort key, tie-break, line): the line ends with a newline and holds no other
Keyed = tuple[float, str, str]
CHUNK_LINES = 2048


def sorted_lines(lines: Iterable[Keyed], folder: str | Path | None = None,
                 chunk: int | None = None) -> Iterator[Keyed]:
    """``lines`` in (key, tie-break, line) order, holding at most ``chunk`` (CHUNK_LINES) at once."""
    chunk = chunk or CHUNK_LINES
    it = map(_checked, lines)
    first = sorted(itertools.islice(it, chunk))
    if len(first) < chunk:  # it all fit: nothing to spill
        yield from first
        return
    with ExitStack() as stack:
        runs = [_spill(first, folder, stack)]
        while batch := sorted(itertools.islice(it, chunk)):
            runs.append(_spill(batch, folder, stack))
        yield from heapq.merge(*(_read_run(f) for f in runs))


def _spill(batch: list[Keyed], folder: str | Path | None, stack: ExitStack) -> IO[str]:
    f = stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8", dir=folder))  # noqa: SIM115 - the stack closes it
    f.writelines(f"{key!r}\t{tie}\t{line}" for key, tie, line in batch)
    f.seek(0)
    return f


def _checked(entry: Keyed) -> Keyed:
    """A line a spilled run can hold: its only newline at its end, no tab in its tie-break (checked
    whether or not this sort spills, so what is accepted does not depend on the input's size)."""
    _, tie, line = entry
    if "\t" in tie or line.count("\n") != 1 or not line.endswith("\n"):
        raise ValueError(f"a line to sort must end with its only newline and its tie-break hold no tab: {tie!r}")
    return entry


def _read_run(f: IO[str]) -> Iterator[Keyed]:
    for text in f:
        key, tie, line = text.split("\t", 2)
        yield float(key), tie, line
