"""Process memory settings and hand-backs that both the client and the workers use.

A long run allocates and frees the same few sizes over and over (batches on a worker; result
messages, parquet parts and report documents on the client). Freed memory that stays mapped is
RSS all the same, and what the benchmarks and a cluster's memory limit see. Three allocators keep
it: glibc's per-thread arenas, pyarrow's pool, and the holes Python's objects leave between live
ones. Dask's workers face the same, and its documentation's answer is the one used here:
``malloc_trim`` ("Memory not released back to the OS").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Iterator
from typing import Any

#: glibc malloc arenas per process: threads beyond this share arenas instead of each keeping
#: its own freed memory (glibc's default is 8 per core)
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8


@functools.cache
def _libc() -> Any:
    """glibc, or None where malloc is not glibc's (macOS, musl): there is nothing to tune."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def cap_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process; True when capped.

    Threads started later share the capped arenas. Best called before a process starts its
    threads; the Dask profiles also set MALLOC_ARENA_MAX in the workers' environment, which glibc
    reads at start and which works better than this late mallopt.
    """
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, arenas))


def use_system_arrow_pool() -> None:
    """pyarrow's default pool (mimalloc or jemalloc) keeps what its largest use needed for the
    life of the process; gpubatch's tables are small, and glibc's malloc hands memory back."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


@contextlib.contextmanager
def collections_of_this_run() -> Iterator[None]:
    """Keep what the process held before the run out of the collector's walks until it ends.

    A full collection walks every object the process tracks: in a client that has imported Dask,
    pandas and pyarrow that is 60-140 ms, and the run's end (:func:`hand_back_freed_memory`) and
    its periodic hand-backs each pay it. Frozen (``gc.freeze``), the objects from before the run
    are skipped, so those collections walk what the run made, which is where its cycles are; they
    go back to the oldest generation (``gc.unfreeze``) when the run ends, however it ends.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def hand_back_freed_memory(collect: bool = True) -> None:
    """Return freed memory to the operating system: unreachable cycles collected, pyarrow's
    pool's unused memory released, and glibc's free pages given back (``malloc_trim(0)``, which
    also returns free pages inside the heap, not only at its top).

    Costs a walk of the malloc heap (milliseconds) and, with ``collect``, a full collection (60
    ms in a client that has imported Dask and pandas): call it between phases of work and every
    few tens of seconds, not per item; skip the collection where what was freed held no cycles.
    """
    if collect:
        gc.collect()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
