"""The Source interface: how a kind of input becomes shards, and shards become uint8 item blocks.

Planning runs on the client and touches only metadata (globs, headers, indexes); everything that
reads pixels or bases runs on a worker inside ``ShardReader``. A reader yields *read units*: each
is one big read (a tile-aligned region, a long genome stretch) that a reader thread executes and
slices into many items, so that storage and decode see few large requests instead of many small
ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.spec import JobSpec


@dataclass(frozen=True)
class Shard:
    """The unit of scheduling, retry, resume and audit: small, picklable, no open handles."""

    shard_id: str
    input_uri: str
    payload: dict[str, Any] = field(default_factory=dict)
    n_items_hint: int | None = None


@dataclass
class ItemBlock:
    """Items cut from one read: ``items`` is (k, ...) uint8; ``index`` holds k-long columns."""

    items: np.ndarray
    index: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.items.shape[0])


ReadUnit = Callable[[], ItemBlock]


class ShardReader(ABC):
    """One shard opened on a worker. Thread-safe: read units run concurrently on reader threads."""

    #: name of the storage/decode sub-timers this reader reports, for the per-stage breakdown
    attrs: dict[str, Any]

    @abstractmethod
    def read_units(self) -> Iterator[ReadUnit]:
        """The shard's reads, in output order. Each unit is executed once on a reader thread."""

    @property
    @abstractmethod
    def n_items(self) -> int:
        """Items this shard will yield (known after open: tile grid, window count)."""

    @abstractmethod
    def to_model_input(self, batch: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Device-stage preprocessing: uint8 items -> the model's float input.

        ``out`` is a buffer the caller reuses between batches; a reader writes into it when its
        shape and dtype fit the result and allocates otherwise.
        """

    def from_model_output(self, outputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Map raw model outputs back to per-item columns (e.g. ref/alt/delta, strand average)."""
        return outputs

    def device_preprocess(self) -> tuple[str, dict[str, Any]] | None:
        """(kind, settings) for the fused GPU kernels when ``to_model_input`` is exactly one of them.

        ``None`` keeps preprocessing on the host (the model may still run on the GPU).
        """
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Source(ABC):
    """A kind of input (slides, genome windows, variants)."""

    kind: str

    @abstractmethod
    def plan(self, job: JobSpec) -> tuple[list[Shard], list[dict[str, str]]]:
        """Split the job into shards on the client; return (shards, inputs that failed to plan)."""

    @abstractmethod
    def open(self, shard: Shard, job: JobSpec, clocks: StageClocks) -> ShardReader:
        """Open one shard on a worker; raise ``InputError`` for a bad input."""

    @abstractmethod
    def model_input(self, job: JobSpec, batch_size: int) -> tuple[tuple[int, ...], str]:
        """(shape, dtype) of the model input that ``to_model_input`` makes from a full batch.

        Known before any input is opened, so that a model can be checked against the job on the
        client and warmed on a worker before its first shard.
        """

    def index_schema(self, job: JobSpec) -> list[str]:
        """Names of the index columns that precede model outputs in predictions.parquet.

        Used for a run that produced no rows at all (no tissue anywhere, every input
        quarantined): predictions.parquet still carries the index columns, with zero rows.
        """
        return []
