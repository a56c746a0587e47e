"""Executors: where shards run. One small interface, an in-process twin and Dask.

The runner submits shard functions and waits for the first of several to finish; it does not
know whether they run on threads of this process (``inline``, for debugging and small jobs) or on
a Dask cluster (local processes, GPUs, an existing scheduler, SLURM).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as thread_wait
from typing import Any


class Executor(ABC):
    """Runs shard functions somewhere and reports them as futures."""

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any, key: str) -> Any:
        """Start ``fn(*args)``; ``key`` names the task uniquely (one per attempt)."""

    @abstractmethod
    def wait_first(self, pending: set[Any], timeout: float | None = None) -> set[Any]:
        """The futures among ``pending`` that have finished, waiting for at least one (or the timeout)."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release workers and connections."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineExecutor(Executor):
    """No Dask: shards run on threads of this process (``threads_per_worker`` at once).

    Two shards at a time let one shard's setup (open, tissue mask) overlap the other's compute;
    the model session is shared, as on a Dask worker.
    """

    def __init__(self, threads: int = 2):
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gpubatch-shard")

    def submit(self, fn: Callable[..., Any], *args: Any, key: str) -> Future[Any]:
        return self.pool.submit(fn, *args)

    def wait_first(self, pending: set[Any], timeout: float | None = None) -> set[Any]:
        return set(thread_wait(pending, timeout=timeout, return_when=FIRST_COMPLETED).done)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class DaskExecutor(Executor):
    """A Dask client (and the cluster it started, if any); ``resources`` bound every task."""

    def __init__(self, client: Any, cluster: Any = None, resources: dict[str, float] | None = None):
        self.client, self.cluster, self.resources = client, cluster, resources

    def submit(self, fn: Callable[..., Any], *args: Any, key: str) -> Any:
        kwargs: dict[str, Any] = {"pure": False, "key": key}
        if self.resources:
            kwargs["resources"] = self.resources  # e.g. {GPU: 1}: one shard per GPU at a time
        return self.client.submit(fn, *args, **kwargs)

    def wait_first(self, pending: set[Any], timeout: float | None = None) -> set[Any]:
        from distributed import wait
        from distributed.utils import TimeoutError as DaskTimeout

        try:
            return set(wait(list(pending), timeout=timeout, return_when="FIRST_COMPLETED").done)
        except (TimeoutError, DaskTimeout):
            return set()

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
