"""What Dask keeps in gpubatch's client process of every task, worker and cluster it has seen,
trimmed: the process that runs the scheduler (the local and SLURM profiles) is the client, and
a long run, or a notebook running job after job, must not grow with what is over.
"""

from __future__ import annotations

from typing import Any


def trim_scheduler(dask_scheduler: Any) -> int:
    """What the scheduler keeps of every task it has seen and forgotten, trimmed; call it on the
    scheduler's event loop. Returns the span records folded."""
    forget_key_names()
    return forget_span_collections(dask_scheduler)


def forget_key_names() -> None:
    """Empty Dask's cache of task-name prefixes. ``dask.utils.key_split`` caches its answer for
    the last 100,000 keys it saw; every shard's key is new, so in the process running the
    scheduler that cache held every shard's key (about 250 bytes each) up to 100,000 shards:
    bench/bench_client.py's growth. Clearing it costs a re-split of the keys in flight."""
    from dask.utils import key_split

    key_split.cache_clear()


def forget_closed_servers() -> None:
    """Empty Dask's cache of which handlers take a comm. ``distributed.core._expects_comm`` is an
    unbounded cache keyed by each server's bound handler methods, so it kept every scheduler and
    nanny a run's cluster had in this process, closed, for the life of the process: a notebook
    running a job again and again held every run's (about 0.3 MB and 700 objects a run). The
    cache is of ``inspect.signature`` answers: emptied, live servers (the caller's own) answer
    again at their next message."""
    import distributed.core

    clear = getattr(getattr(distributed.core, "_expects_comm", None), "cache_clear", None)
    if clear is not None:
        clear()


def forget_span_collections(dask_scheduler: Any) -> int:
    """Fold the repeats out of each span's list of submitted collections; returns how many went.

    Dask's scheduler appends one ``{"type": "Future"}`` entry to the active span for every
    ``client.submit`` and keeps spans for the cluster's life (dask/distributed#7977), about
    200 bytes per shard in the process running the scheduler, which for the local and SLURM
    profiles is the gpubatch client. What the span shows (which kinds of collection ran) is kept.
    """
    removed = 0
    for span in getattr(dask_scheduler.extensions.get("spans"), "spans", {}).values():
        collections = (getattr(span, "_metadata", None) or {}).get("collections")
        if not collections or len(collections) < 2:
            continue
        unique: list[Any] = []
        for entry in collections:
            if entry not in unique:
                unique.append(entry)
        removed += len(collections) - len(unique)
        collections[:] = unique
    return removed
