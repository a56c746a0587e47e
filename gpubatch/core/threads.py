"""Process-wide background thread pools, one per purpose, made on first use.

A worker process forked from the forkserver starts with no threads, and most of its pools are
needed only by some inputs (streamed slides, object storage), so each is made when first asked
for and then shared by every shard the process runs: the read-ahead fetches, the slides opened
ahead, the first header request of an opening, the input-identity lookups. And the other thread
helpers: per-thread context, lock-free cached properties, a thing made off the main thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, ParamSpec, TypeVar

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


class ContextPool(ThreadPoolExecutor):
    """A thread pool whose work runs in a copy of the submitting thread's context (contextvars),
    as a coroutine does on an event loop: what a run counts there (io.tallies) stays that run's
    when two runs share the process's pools."""

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        context = contextvars.copy_context()

        def in_context() -> R:
            return context.run(fn, *args, **kwargs)

        return super().submit(in_context)


def background_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """This process's pool ``name`` (threads named ``gpubatch-<name>``), made with ``threads``
    threads on the first call; later calls return it as it is."""
    with _lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ContextPool(threads, thread_name_prefix=f"gpubatch-{name}")
        return pool


def fetched_in_order(items: Iterable[T], fetch: Callable[[T], R], window: int, *,
                     size: Callable[[R], int] | None = None, budget: int = 0,
                     name: str = "fetch") -> Generator[tuple[T, R], None, None]:
    """``(item, fetch(item))`` for each of ``items``, in their order, with up to ``window`` fetches
    in flight ahead of the caller: files read one at a time from object storage wait one round
    trip each (a 3,000-part merge waited 41 s on them), read ahead they overlap.

    ``items`` is drawn here, on the caller's thread, ``window`` ahead of what it is handed (a
    SQLite lookup or a progress count in it stays on that thread); only ``fetch`` runs on the
    pool's threads. Memory: ``window`` results at most, and with ``size``, the window shrinks so
    that the fetches ahead, each reckoned at the largest result taken so far, stay under
    ``budget`` bytes (one fetch at a time until one is taken: nothing is known before). A
    failed fetch raises its error here, in order; on any exit (an error, the caller closing the
    generator) the fetches not yet started are cancelled and those running waited for (each
    bounded by its storage timeouts and retries), so no thread outlives the call. A ``window``
    of 1 fetches on the caller's thread, one at a time."""
    if window <= 1:
        yield from ((item, fetch(item)) for item in items)
        return
    source, pending = iter(items), deque[tuple[T, Future[R]]]()
    largest: int | None = None  # the largest result taken (with ``size``)
    with ContextPool(window, thread_name_prefix=f"gpubatch-{name}") as pool:
        try:
            while True:
                room = window if size is None else 1 if largest is None else min(window, max(1, budget // largest))
                more = itertools.islice(source, max(0, room - len(pending)))
                pending.extend((item, pool.submit(fetch, item)) for item in more)
                if not pending:
                    return
                item, future = pending.popleft()
                result = future.result()
                if size is not None:
                    largest = max(largest or 0, size(result))
                yield item, result
        finally:
            for _, future in pending:
                future.cancel()


@contextlib.contextmanager
def set_on_thread(local: threading.local, name: str, value: Any) -> Iterator[None]:
    """``local.<name>`` is ``value`` on this thread meanwhile, and what it was (or None) after:
    per-thread context a callee reads without it being passed down (which file a library warning
    is about, where a shard's progress reports go)."""
    before = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, before)


class _LockFreeCachedProperty(functools.cached_property):  # type: ignore[type-arg]
    """``functools.cached_property`` as Python 3.12 made it: computed without a lock (two threads
    asking at once may both compute it; the last value is kept)."""

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        cache = instance.__dict__
        value = cache.get(self.attrname, _MISSING)
        if value is _MISSING:
            value = cache[self.attrname] = self.func(instance)
        return value


_MISSING = object()


def unlock_cached_properties(*classes: type) -> None:
    """Give ``classes``' cached properties Python 3.12's lock-free form (nothing on 3.12 and later).

    On Python 3.11 a ``functools.cached_property`` holds one lock per attribute across every
    instance of the class (CPython gh-87634, removed in 3.12). tifffile's ``TiffFile.series``
    reads every IFD of the file while holding it: over object storage that is round trips, and
    every other slide the process was opening waited on them (four streamed slides opened at
    once took 0.35, 0.53, 0.70 and 0.88 s instead of 0.35 s each: bench/NOTES.md).
    """
    if sys.version_info >= (3, 12):
        return
    for cls in classes:
        for name, attr in list(vars(cls).items()):
            if type(attr) is functools.cached_property:
                unlocked = _LockFreeCachedProperty(attr.func)
                unlocked.attrname, unlocked.__doc__ = attr.attrname, attr.__doc__
                setattr(cls, name, unlocked)


class _Making(Generic[T]):
    """What a helper thread makes, handed to the caller or, once the caller has given up on it,
    closed by whichever side holds it last."""

    def __init__(self, make: Callable[[], T], close: Callable[[T], None]):
        self.make, self.close = make, close
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._abandoned = False

    def run(self) -> None:
        try:
            value = self.make()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self.error = exc
            self.done.set()
            return
        with self._lock:
            abandoned = self._abandoned
            if not abandoned:
                self.value = value
        self.done.set()
        if abandoned:
            self.close(value)

    def abandon(self) -> None:
        """No caller will take the value: close it now, or when it comes."""
        with self._lock:
            self._abandoned, value, self.value = True, self.value, None
        if value is not None:
            self.close(value)


def made_off_the_main_thread(make: Callable[[], T], close: Callable[[T], None], timeout_s: float,
                             name: str) -> T | None:
    """``make()`` run on a helper thread named ``name`` and waited for here, at most ``timeout_s``
    (None when it did not finish: whatever it makes later is closed); its exception is raised here.

    A signal's exception (Ctrl-C) is raised in the main thread only, wherever it is: inside a
    constructor that waits on an event loop (Dask's clusters and clients) it left a half-made
    object no one could close, whose work went on without it. Here it is raised in this wait
    instead: what ``make`` is making is let finish (``timeout_s`` more at most), closed, and the
    exception raised on.
    """
    making = _Making(make, close)
    threading.Thread(target=contextvars.copy_context().run, args=(making.run,), name=name, daemon=True).start()
    try:
        making.done.wait(timeout_s)
    except BaseException:
        try:
            making.done.wait(timeout_s)
        finally:
            making.abandon()
        raise
    if not making.done.is_set():
        making.abandon()
        return None
    if making.error is not None:
        raise making.error
    return making.value
