"""Process-wide background thread pools, one per purpose, made on first use.

A worker process forked from the forkserver starts with no threads, and most of its pools are
needed only by some inputs (streamed slides, object storage), so each is made when first asked
for and then shared by every shard the process runs: the read-ahead fetches, the slides opened
ahead, the first header request of an opening, the input-identity lookups.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def background_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """This process's pool ``name`` (threads named ``gpubatch-<name>``), made with ``threads``
    threads on the first call; later calls return it as it is."""
    with _lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ThreadPoolExecutor(threads, thread_name_prefix=f"gpubatch-{name}")
        return pool
