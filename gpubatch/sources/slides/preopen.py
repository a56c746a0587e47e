"""Streamed slides opened ahead of their shards, so that opening's round trips overlap compute.

Opening a streamed slide is a chain of dependent requests: the object's size, then the TIFF
header and each level's IFD and tile tables through the header cache, then the JPEG tables of
every level (bench/NOTES.md measured 9 requests, 0.6-0.7 s at 80 ms per request, for an 8192 px
slide). Each is a round trip nothing else can fill, so at 80 ms a slide's shard would wait most of
a second before its first tile. When a shard starts, :func:`open_ahead` opens the next slides of
the plan in a background thread of this worker; the shard that then opens one of them takes the
open backend (:func:`take`), waiting only for what is still in flight.

The client deals shards to worker processes (runtime.dealing), so the slides a shard names are
the ones its own process runs next, and each streamed slide is opened once, where it runs. Where
shards are not dealt (a worker left, and Dask ran its shards elsewhere) an opening ahead may go
unused: a process holds at most :data:`MAX_HELD` slides opened ahead; the oldest one nobody took
is closed for a new one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from gpubatch.core.clocks import StageClocks
from gpubatch.core.threads import background_pool
from gpubatch.io.metrics import background
from gpubatch.sources.slides.backends import SlideBackend

#: slides opened ahead and not yet taken, per worker process
MAX_HELD = 8
#: threads opening slides ahead, per worker process (each open is a chain of round trips, the
#: thread waits on the network nearly all the time); an opening still queued when its shard
#: starts is cancelled and done by the shard itself
THREADS = 8

Opener = Callable[[str, StageClocks], SlideBackend]


@dataclass
class Opening:
    """A slide being opened (or opened) ahead, with the clocks its requests count into."""

    future: Future[SlideBackend]
    clocks: StageClocks


_held: OrderedDict[str, Opening] = OrderedDict()
_lock = threading.Lock()


def open_ahead(uris: Sequence[str], opener: Opener) -> list[str]:
    """Start opening ``uris`` (those not held already) with ``opener(uri, clocks)``; the URIs started."""
    started: list[str] = []
    pool = background_pool("preopen", THREADS)
    with _lock:
        for uri in uris:
            if uri in _held:
                continue
            clocks = StageClocks()
            _held[uri] = Opening(pool.submit(_open, opener, uri, clocks), clocks)
            started.append(uri)
        while len(_held) > MAX_HELD:
            _, oldest = _held.popitem(last=False)
            oldest.future.add_done_callback(_close_quietly)
    return started


def take(uri: str) -> Opening | None:
    """The slide ``uri`` opened (or being opened) ahead in this process, now the caller's; or None."""
    with _lock:
        return _held.pop(uri, None)


def discard(uri: str) -> None:
    """Close ``uri``'s opening ahead, if this process holds one nobody took (its shard ran elsewhere)."""
    opening = take(uri)
    if opening is not None:
        opening.future.add_done_callback(_close_quietly)


def _open(opener: Opener, uri: str, clocks: StageClocks) -> SlideBackend:
    with background():  # nobody waits on it yet: the shard that takes it counts its own wait
        return opener(uri, clocks)


def _close_quietly(future: Future[SlideBackend]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()
