"""The second stage: a slide-level model over one slide's whole bag of tile features, on its worker.

Attention-MIL heads (ABMIL, CLAM, TransMIL) take every tile feature of a slide at once, (N, D),
and give per-tile outputs (attention, N values) and slide-level outputs (class logits, one row).
The bag lives on the worker that computed it, so the head runs there, after the shard's tiles and
before its commit (docs/pathology.md): only a few numbers per slide ever reach the client.

While the pipeline runs, :class:`BagSink` stands in for the shard writer and keeps the shard's
batches; :meth:`SlideHead.finish` then stacks the chosen tile output into the bag, runs the head,
and hands every batch to the writer with the head's per-tile outputs added as columns, so they
land in the same rows of predictions.parquet and the zarr group. Slide-level outputs travel back
in the shard's result (committed with the manifest entry, so ``--resume`` keeps them) and become
slide_predictions.parquet on the client.

Memory: the head holds one slide's bag, N x D float32 (plus the batches' other outputs): for a
100 000-tile slide and a 1536-wide encoder, 600 MB. That is the price of a slide-level head,
whatever the framework; it is bounded by the largest slide, not by the run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gpubatch.core.errors import GpubatchError
from gpubatch.io.localized import localize
from gpubatch.models.base import Model, backend_class, get_model, resolve_backend

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.outputs.writer import ShardWriter
    from gpubatch.spec import JobSpec

Rows = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # index columns, outputs
PROBE_SIZES = (2, 3)  # bag sizes run once to learn which outputs follow the bag's length
HEAD_PRECISION = "fp32"  # a head runs at full precision: the bag is a few MB, the gate is the tile model's
HEAD_NONFINITE = "slide_head.nonfinite."  # + output name: its NaN/inf values, for the shard's note


@dataclass
class BagSink:
    """Keeps a shard's batches (index, outputs) until the slide head has run over all of them,
    and gathers the bag as they arrive.

    Each batch's feature rows are copied into one (N, D) float32 bag, allocated for ``capacity``
    tiles at the first batch, and a float32 batch output is replaced by a view of its rows: the
    features are held once. Stacking the kept batches at the end held them twice (a 20 000-tile
    slide of 1536-wide features: 2 x 123 MB). A slide with more tiles than ``capacity`` still
    gets its bag, by doubling (the earlier views keep the old bag alive until written).
    """

    features: str | None = None
    capacity: int = 0
    batches: list[Rows] = field(default_factory=list)
    bag: np.ndarray | None = None
    filled: int = 0

    def write(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        name = feature_name(self.features, outputs)
        rows = _rows(outputs[name])
        if self.bag is None or self.filled + len(rows) > len(self.bag):
            grown = np.empty((max(self.capacity, 2 * self.filled, self.filled + len(rows)), rows.shape[1]),
                             np.float32)
            if self.bag is not None:
                grown[: self.filled] = self.bag[: self.filled]
            self.bag = grown
        end = self.filled + len(rows)
        self.bag[self.filled : end] = rows
        if outputs[name].dtype == np.float32:  # other dtypes are written as the model gave them
            outputs = {**outputs, name: self.bag[self.filled : end].reshape(outputs[name].shape)}
        self.filled = end
        self.batches.append((index, outputs))

    def take(self) -> np.ndarray | None:
        """The bag of every tile written (None when no batch came), and the sink emptied of it."""
        bag, self.bag = (None if self.bag is None else self.bag[: self.filled]), None
        return bag


@dataclass(frozen=True)
class HeadShape:
    """What probing a head told: whether it wants a batch axis, and which outputs are per tile."""

    batch_axis: bool
    per_tile: tuple[str, ...]
    templates: dict[str, np.ndarray]  # each output for a bag of one, to shape empty slides


class HeadShapeError(GpubatchError):
    """A head that does not take the bag it is given, in either layout; ``model`` is that head,
    for ``validate`` to say which width it does take where its file says so."""

    def __init__(self, message: str, model: Model):
        super().__init__(message)
        self.model = model


_SHAPES: dict[tuple[int, int], HeadShape] = {}
_SHAPES_LOCK = threading.Lock()


class SlideHead:
    """One job's slide model on one worker; ``features`` names the tile output forming the bag."""

    def __init__(self, model: Model, features: str | None):
        self.model, self.features = model, features

    @classmethod
    def for_job(cls, job: JobSpec, threads: int | None, version: dict[str, Any] | None = None) -> SlideHead | None:
        """The job's head, or None. ``version``: a remote head's version as the client asked it
        (``RunContext.slide_model_version``): this host's copy of it is loaded with no request, or
        that very version fetched (io.localized), never one written over since the run checked."""
        spec = job.slide_model
        if spec is None:
            return None
        path = localize(spec.path, job.input.storage, version)
        return cls(get_model(path, spec.backend, HEAD_PRECISION, threads), spec.features)

    @classmethod
    def check_file(cls, path: str, backend: str, width: int | None) -> None:
        """Load the head from ``path`` as a worker does (the backend's own loader, in a session of
        its own, let go after) and, where the bag's ``width`` is known, probe it as a worker does
        (:meth:`shape`): ``validate`` raises here the GpubatchError a worker would raise only once
        a slide's tiles were computed. A corrupt or wrong-width TorchScript head passed validate,
        and every slide of the run was then quarantined at its end."""
        model = backend_class(resolve_backend(backend, path))(path, precision=HEAD_PRECISION)
        if width is not None:
            cls(model, None)._probe(width)  # not shape(): a private model's id must not enter _SHAPES

    def sink(self, capacity: int) -> BagSink:
        """A shard's sink, its bag sized for the ``capacity`` tiles the slide is to have."""
        return BagSink(self.features, capacity)

    def shape(self, width: int) -> HeadShape:
        """Probe the head once per worker and bag width: (N, D) or (1, N, D) input, per-tile outputs."""
        key = (id(self.model), width)
        with _SHAPES_LOCK:
            if key not in _SHAPES:
                _SHAPES[key] = self._probe(width)
            return _SHAPES[key]

    def _probe(self, width: int) -> HeadShape:
        errors = []
        for batch_axis in (False, True):
            try:
                runs = [self._run(np.zeros((n, width), np.float32), batch_axis) for n in (1, *PROBE_SIZES)]
            except Exception as exc:  # the other layout may be the one the head takes
                errors.append(f"{'(1, N, D)' if batch_axis else '(N, D)'}: {last_line(exc)}")
                continue
            per_tile = tuple(k for k in runs[0] if all(r[k].shape[:1] == (n,) for r, n in
                                                        zip(runs[1:], PROBE_SIZES, strict=True)))
            return HeadShape(batch_axis, per_tile, runs[0])
        raise HeadShapeError(f"slide_model {self.model.path} does not take a bag of {width}-wide "
                             f"features as (N, {width}) or (1, N, {width}): " + "; ".join(errors), self.model)

    def _run(self, bag: np.ndarray, batch_axis: bool) -> dict[str, np.ndarray]:
        out = self.model.run(bag[None] if batch_axis else bag)
        return {k: np.asarray(v)[0] if batch_axis and np.ndim(v) and np.shape(v)[0] == 1 else np.asarray(v)
                for k, v in out.items()}

    def finish(self, sink: BagSink, writer: ShardWriter, empty: Callable[[], Rows],
               clocks: StageClocks) -> dict[str, list[Any]]:
        """Run the head over the slide's bag, write every row with its per-tile outputs, and return
        the slide-level outputs (JSON-able lists; None where a slide had no tiles).

        ``empty`` gives a slide with no tiles its zero-length rows (typed index and tile outputs),
        so that even then the columns and widths are there.
        """
        bag = sink.take()
        if bag is None:  # no tiles: the zero-length rows give the width
            sink.write(*empty())
            bag = sink.take()
        assert bag is not None
        batches = sink.batches
        with clocks.part("slide_head"):
            shape = self.shape(bag.shape[1])
            out = self._run(bag, shape.batch_axis) if len(bag) else _empty_like(shape)
        clocks.count("slide_head.tiles", len(bag))
        if len(bag):
            for k, v in out.items():
                clocks.count(f"{HEAD_NONFINITE}{k}", int(np.size(v) - np.isfinite(np.asarray(v, np.float64)).sum()))
        tile_names = _column_names(shape.per_tile, batches[0][1])
        with clocks.part("write"):
            start = 0
            for index, outputs in batches:
                n = len(next(iter(outputs.values()))) if outputs else 0
                extra = {tile_names[k]: out[k][start : start + n] for k in shape.per_tile}
                writer.write(index, {**outputs, **extra})
                start += n
        sink.batches.clear()
        return {k: _jsonable(v) for k, v in out.items() if k not in shape.per_tile}


def last_line(exc: BaseException) -> str:
    """An error's last line, which says what failed, at most 300 characters: a TorchScript error
    carries the module's whole traceback, dozens of lines, before it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def head_nonfinite_note(clocks: StageClocks) -> str | None:
    """The shard's note when the head gave NaN or inf for a slide that had tiles: its slide-level
    outputs are written as nulls, which read like a slide without tiles unless said."""
    counts = {k.removeprefix(HEAD_NONFINITE): int(v) for k, v in clocks.counters.items()
              if k.startswith(HEAD_NONFINITE) and v}
    if not counts:
        return None
    which = ", ".join(f"{name} {n}" for name, n in counts.items())
    return (f"the slide model gave NaN or infinite values ({which}) for a slide with tiles (NaN is null "
            "in slide_predictions.parquet): "
            "not valid predictions; check the tile features (their NaN count) and the head")


def feature_name(features: str | None, outputs: dict[str, np.ndarray]) -> str:
    """The tile output that forms the bag: the spec's name, else the tile model's first."""
    name = features or next(iter(outputs))
    if name not in outputs:
        raise GpubatchError(f"slide_model.features: the tile model has no output {name!r}; "
                            f"its outputs are {sorted(outputs)}")
    return name


def _jsonable(values: np.ndarray) -> list[Any]:
    """Nested lists of floats, NaN as None (strict JSON, and null in parquet)."""
    arr = np.asarray(values, np.float64).astype(object)
    arr[np.isnan(np.asarray(values, np.float64))] = None
    return arr.tolist()  # type: ignore[no-any-return]


def _rows(values: np.ndarray) -> np.ndarray:
    """A tile output as (n, D) float32 rows, however many axes each tile's value has."""
    arr = np.asarray(values, np.float32)
    return arr.reshape(len(arr), int(np.prod(arr.shape[1:])))


def _empty_like(shape: HeadShape) -> dict[str, np.ndarray]:
    """A slide with no tiles: zero-length per-tile outputs, NaN slide-level outputs."""
    return {k: v[:0] if k in shape.per_tile else np.full_like(v, np.nan, dtype=np.float64)
            for k, v in shape.templates.items()}


def _column_names(per_tile: tuple[str, ...], tile_outputs: dict[str, np.ndarray]) -> dict[str, str]:
    """Per-tile head outputs keep their names unless a tile output has it (then ``slide_<name>``)."""
    return {k: f"slide_{k}" if k in tile_outputs else k for k in per_tile}
