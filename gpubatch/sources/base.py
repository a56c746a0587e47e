"""The Source interface: how a kind of input becomes shards, and shards become uint8 item blocks.

Planning runs on the client and touches only metadata (globs, headers, indexes); everything that
reads pixels or bases runs on a worker inside ``ShardReader``. A reader yields *read units*: each
is one big read (a tile-aligned region, a long genome stretch) that a reader thread executes and
slices into many items, so that storage and decode see few large requests instead of many small
ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.core.phases import Phase
    from gpubatch.core.results import ShardResult
    from gpubatch.ops.preprocess import Preprocess
    from gpubatch.outputs.store import OutputStore
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

    @property
    @abstractmethod
    def preprocess(self) -> Preprocess:
        """How this shard's uint8 items become the model's input; the engine derives the host and
        GPU paths from this one declaration."""

    def empty_index(self) -> dict[str, np.ndarray]:
        """Zero-length index columns, typed as a read unit's: what a shard with no items writes, so
        its outputs still carry their names, dtypes and widths."""
        return {}

    def from_model_output(self, outputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Map raw model outputs back to ``n`` per-item columns (ref/alt/delta, strand average)."""
        return outputs

    def column_limit(self, name: str) -> int | None:
        """Parquet columns the output ``name`` may have, when it differs from the writer's default
        (genome: per-track reductions and scores, up to ``windows.track_columns``); None: default."""
        return None

    def input_version(self) -> str | None:
        """The version (ETag) of the input the reads were of, where the reader knows it (a remote
        slide's pinned reader, its staged copy); None elsewhere. The worker checks it against the
        version its shard recorded."""
        return None

    def input_identity(self) -> dict[str, Any] | None:
        """The input's identity as the open found it (:func:`gpubatch.io.storage.input_identity`'s
        form), where the open asked for one anyway (a streamed slide's HEAD); None elsewhere. The
        worker then takes it as the shard's start identity instead of asking again."""
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
    def plan(self, job: JobSpec) -> tuple[Sequence[Shard], list[dict[str, str]]]:
        """Split the job into shards on the client; return (shards, inputs that failed to plan)."""

    @abstractmethod
    def open(self, shard: Shard, job: JobSpec, clocks: StageClocks) -> ShardReader:
        """Open one shard on a worker; raise ``InputError`` for a bad input."""

    @abstractmethod
    def model_input(self, job: JobSpec, batch_size: int) -> tuple[tuple[int, ...], str]:
        """(shape, dtype) of the model input a full batch of ``batch_size`` items becomes.

        Known before any input is opened, so that a model can be checked against the job on the
        client and warmed on a worker before its first shard.
        """

    def read_unit_bytes(self, job: JobSpec) -> tuple[int, tuple[str, ...]]:
        """Bytes one read unit holds at most (what it read and the items cut from it), and the
        spec keys that set the figure: ``run.readers + 1`` of them are in flight per shard, and
        the client checks them against a worker's memory before anything runs."""
        return 0, ()

    def index_schema(self, job: JobSpec) -> list[str]:
        """Names of the index columns that precede model outputs in predictions.parquet.

        Used for a run that produced no rows at all (no tissue anywhere, every input
        quarantined): predictions.parquet still carries the index columns, with zero rows.
        """
        return []

    # -- hooks: what a kind of input needs around its shards, so the engine and runner need not
    # know which kind they run

    def before_workers(self, job: JobSpec, first: Sequence[str],
                       storage_profile: dict[str, Any]) -> Callable[[], StageClocks | None]:
        """On the client of a run whose workers share its host, before they start (while the
        model is prepared and the cluster starts): ``first`` are the first shards' inputs in plan
        order (slides start staging them into the host's stage cache, which the workers share);
        ``storage_profile`` is the workers' (``stage_cache.run``: this run's id).
        Returns what to call once the run's shards are done: it gives the clocks of the work
        done here (the requests the report counts), or None."""
        return lambda: None

    def before_shard(self, job: JobSpec, upcoming: Sequence[str]) -> None:  # noqa: B027 - optional
        """On a worker, as a shard starts: ``upcoming`` are the next inputs in plan order (slides
        start staging them in the background)."""

    def after_commit(self, job: JobSpec, shard: Shard) -> None:  # noqa: B027 - optional
        """On a worker, once a shard's outputs are committed (slides drop a staged copy)."""

    def open_finds_identity(self, job: JobSpec, shard: Shard) -> bool:
        """Whether :meth:`open` will most likely find the input's identity itself (its reader's
        ``input_identity``): the worker then does not ask for it beside the open (one HEAD, not
        two); where the open found none after all, it is asked after the open."""
        return False

    def forget_input(self, job: JobSpec, shard: Shard) -> None:  # noqa: B027 - optional
        """On a worker, once a shard's input changed while it was read: drop what is kept of it
        (slides: a staged copy, an opening ahead), so that the next attempt reads the new version."""

    def constant_columns(self, shard: Shard) -> dict[str, Any]:
        """Columns with one value for the whole shard, written before the index columns."""
        return {}

    def write_outputs(self, job: JobSpec, store: OutputStore, results: Iterable[ShardResult],  # noqa: B027
                      progress: Phase | None = None) -> None:
        """On the client, after the merge: outputs only this kind writes (slides: GeoJSON).
        ``results`` are the committed shards' records in plan order, read as they are iterated;
        ``progress``, the run's end, is told of each further step (:meth:`Phase.step`)."""

    def check_inputs(self, job: JobSpec, shards: Sequence[Shard]) -> tuple[list[dict[str, str]], list[str]]:
        """For ``validate``, past the plan: the inputs a run would quarantine at their shard's
        start, as ``failed`` entries, and notes on what was not checked. Opening every input is
        the source's to do where the plan does not (slides); by default the plan said it all."""
        return [], []

    def data_quality(self, job: JobSpec, shards: Sequence[Shard],
                     results: Iterable[ShardResult]) -> dict[str, Any]:
        """On the client, for report.json's ``data_quality``: what the inputs held that was not
        scored or not as expected (variants: skips by reason, REF mismatches), and ``notes``."""
        return {}
