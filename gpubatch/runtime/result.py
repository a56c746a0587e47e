"""What ``gpubatch.run`` and ``gpubatch.open_results`` return: the report, the outputs, the exit code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gpubatch.core.errors import EXIT_OK, EXIT_PARTIAL, finished_run_exit_code
from gpubatch.core.plural import counted, plural
from gpubatch.outputs.layout import PREDICTIONS, SLIDE_PREDICTIONS, ZARR
from gpubatch.outputs.store import OutputStore


@dataclass
class Result:
    """What ``gpubatch.run`` returns: the report, the outputs' location, and the exit code."""

    report: dict[str, Any]
    output_uri: str
    exit_code: int = EXIT_OK
    failed: list[dict[str, Any]] = field(default_factory=list)
    #: storage options for ``output_uri`` (object storage credentials, endpoint)
    storage: dict[str, Any] = field(default_factory=dict)

    @property
    def store(self) -> OutputStore:
        return OutputStore(self.output_uri, self.storage)

    @property
    def complete(self) -> bool:
        """Whether the output's latest run finished: False for one ``open_results`` found running,
        interrupted or failed (its report sums up what is committed so far)."""
        return self.report.get("complete", True) is not False

    def _require_complete(self, what: str, partial_read: str | None = None) -> None:
        """UnfinishedOutputError for a merged output of an unfinished run: it is missing, or the
        run before's, without what was committed since. ``partial_read``: the call that reads
        what is committed instead, which the error names beside the fix."""
        if self.complete:
            return
        from gpubatch.core.errors import UnfinishedOutputError
        from gpubatch.io.redact import redact

        done, total = self.report.get("shards_done"), self.report.get("shards_total")
        committed = f"{done} of {total if total is not None else '?'} {plural(total, 'shard')} committed"
        partial = f", or read what is committed with {partial_read}" if partial_read else ""
        writer = self._live_writer()
        if writer is not None:  # "finish it with --resume" sent the reader to a run the lease refuses
            raise UnfinishedOutputError(
                f"{redact(self.output_uri)}: run {writer.get('run_id', '?')} is writing it now ({committed} so "
                f"far) and {what} is written at its end; wait for it to finish{partial}")
        raise UnfinishedOutputError(
            f"{redact(self.output_uri)}: its latest run did not finish ({self.report.get('state', 'unknown')}, "
            f"{committed}) and {what} is written at a run's end; finish it with `gpubatch run JOB --resume`"
            + partial)

    def _live_writer(self) -> dict[str, Any] | None:
        """The lease of the run writing the output now (its heartbeat is fresh), or None."""
        from gpubatch.outputs.lease import live_holder
        from gpubatch.spec import RunSpec

        return live_holder(self.store, RunSpec.model_fields["lease_stale_s"].default)

    def predictions(self, slide: str | None = None, *, columns: list[str] | None = None,
                    filters: list[Any] | None = None, partial: bool = False) -> Any:
        """predictions.parquet as a pandas DataFrame, whole or in part.

        ``slide`` (its URI, as the ``slide`` column names it), ``columns`` and ``filters``
        (pyarrow's, e.g. ``[("chrom", "==", "chr2")]``) are applied while reading: row groups
        that cannot match are skipped, so one slide of a large run costs that slide's rows, not
        the run's. Of an unfinished run (``complete`` False) it raises UnfinishedOutputError, since
        the file is missing or stale; ``partial=True`` reads the shards committed so far instead."""
        import pandas as pd

        wanted = [*(filters or []), *([("slide", "==", slide)] if slide is not None else [])] or None
        if partial and not self.complete:
            return _committed_predictions(self.store, columns, wanted)
        self._require_complete(PREDICTIONS, "predictions(partial=True)")
        with self.store.open_read(PREDICTIONS) as f:
            return pd.read_parquet(f, columns=columns, filters=wanted)

    def array(self, name: str, *, partial: bool = False) -> Any:
        """One zarr output (``sad_tracks``, ``tracks_bins`` ...) over every committed shard, in plan
        order, as one numpy array: its rows are predictions.parquet's rows. It is loaded whole;
        for arrays larger than memory open each shard's group (the zarr root's ``groups``).

        Of an unfinished run (``complete`` False) it raises UnfinishedOutputError: the root's
        shard list is written at a run's end, so it is missing, or the run before's.
        ``partial=True`` returns a :class:`PartialArray` instead (of a finished run too): the
        shards committed so far, by shard id (the rows ``predictions(partial=True)`` gives), and
        how many of the run's shards are missing."""
        if partial:
            return self._partial_array(name)
        self._require_complete(f"{ZARR}'s shard list", f"array({name!r}, partial=True)")
        shards, groups = self._root_groups()
        return self._concatenated(name, [groups[s] for s in shards]).values

    def _root_groups(self) -> tuple[list[str], dict[str, str]]:
        """The zarr root's committed shards (plan order) and each one's group: a finished run's."""
        root = self.store.zarr_group(ZARR)
        groups: dict[str, str] = dict(root.attrs.get("groups", {}))  # type: ignore[arg-type]
        return list(root.attrs.get("shards", [])), groups  # type: ignore[arg-type]

    def _partial_array(self, name: str) -> PartialArray:
        """:meth:`array` of what is committed: a finished run's root, else the commit records
        (an unfinished run's root is stale or missing: a run killed with SIGKILL writes none)."""
        if self.complete:
            shards, groups = self._root_groups()
        else:
            from gpubatch.outputs.manifest import Manifest

            groups = {e.shard_id: e.group for e in Manifest(self.store).iter_entries() if e.group}
            shards = sorted(groups)
        joined = self._concatenated(name, [groups[s] for s in shards])
        total = self.report.get("shards_total")
        return PartialArray(joined.values, shards, joined.offsets,
                            None if total is None else max(0, int(total) - len(shards)),
                            str(self.report.get("state", "finished" if self.complete else "unknown")))

    def _concatenated(self, name: str, groups: list[str]) -> _Stacked:
        """The array ``name`` of each group, one after another (KeyError where there is none)."""
        import numpy as np

        parts = [np.asarray(self.store.zarr_group(f"{ZARR}/{group}")[name][:]) for group in groups]
        if not parts:
            state = "" if self.complete else f" (its latest run: {self.report.get('state', 'unknown')})"
            raise KeyError(f"no committed shard of {self.output_uri} holds a zarr output {name!r}{state}")
        return _Stacked(np.concatenate(parts), [0, *np.cumsum([len(p) for p in parts]).tolist()])

    def embeddings(self, slide: str, output: str | None = None) -> tuple[Any, Any]:
        """One slide's tile features for MIL: ``(features, coords)``.

        ``features`` is a float32 (N, D) array of the model output ``output`` (default: the
        model's first), ``coords`` a DataFrame of level-0 ``x``, ``y`` and ``level``, row for row
        with the slide's rows of predictions.parquet. ``slide`` is the slide as predictions.parquet
        names it (its URI) or its key. A slide with no tiles gives (0, D) and an empty frame.
        """
        from gpubatch.outputs.features import read_features
        from gpubatch.sources.slides.source import slide_key

        return read_features(self.store, [slide, slide_key(slide)], output)

    def slide_predictions(self) -> Any:
        """slide_predictions.parquet (runs with a slide_model) as a DataFrame: one row per slide."""
        import pandas as pd

        self._require_complete(SLIDE_PREDICTIONS)
        with self.store.open_read(SLIDE_PREDICTIONS) as f:
            return pd.read_parquet(f)

    def timeline(self) -> Any:
        """One row per batch: t, items, busy_s, starved_s, queue_depth, shard."""
        from gpubatch.report.frames import timeline_frame

        return timeline_frame(self.report)

    def throughput(self, buckets: int = 40) -> Any:
        """Items/s, starvation and queue depth per time bucket: the report's plots as data."""
        from gpubatch.report.frames import throughput_frame

        return throughput_frame(self.report, buckets=buckets)

    def stages(self) -> Any:
        """Busy, starved, blocked seconds and starvation per stage."""
        from gpubatch.report.frames import stage_frame

        return stage_frame(self.report)

    def parts(self) -> Any:
        """Seconds and share per part (storage, decode, preprocess, transfer, compute, write)."""
        from gpubatch.report.frames import parts_frame

        return parts_frame(self.report)

    def shards(self) -> Any:
        """One row per input: items, seconds, starvation, retries, errors."""
        from gpubatch.report.frames import shard_frame

        return shard_frame(self.report)

    def storage_latency(self) -> Any:
        """The storage request latency histogram (empty without remote requests)."""
        from gpubatch.report.frames import latency_frame

        return latency_frame(self.report)


@dataclass(frozen=True)
class PartialArray:
    """A zarr output over the shards committed so far: ``Result.array(name, partial=True)``.

    What is there: ``values``, the rows of ``shards`` one shard after another (those of
    ``shards[i]`` are ``values[offsets[i]:offsets[i + 1]]``); of an unfinished run, in shard id
    order, row for row with ``predictions(partial=True)``. What is not: ``missing`` shards of the
    run (not run yet, running, or quarantined; None where the run's shard count is unknown: a run
    stopped before status.json said it), their rows in neither. A shard's row count is known only
    once it is computed, so the missing rows cannot be filled and masked in place.
    ``np.asarray(partial)`` is ``values``."""

    values: Any
    shards: list[str]
    offsets: list[int]
    missing: int | None
    #: the run's state: finished, running, interrupted or failed
    state: str

    def rows(self, shard: str) -> Any:
        """One committed shard's rows (KeyError for a shard not committed)."""
        if shard not in self.shards:
            missing = "" if self.missing is None else f" ({counted(self.missing, 'shard')} missing)"
            raise KeyError(f"shard {shard!r} is not committed{missing}; committed: {', '.join(self.shards[:5])}"
                           + (" ..." if len(self.shards) > 5 else ""))
        i = self.shards.index(shard)
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Any:
        import numpy as np

        return np.asarray(self.values, dtype=dtype)


@dataclass(frozen=True)
class _Stacked:
    values: Any
    offsets: list[int]


def _committed_predictions(store: OutputStore, columns: list[str] | None, filters: list[Any] | None) -> Any:
    """The committed shards' parquet parts of an unfinished run as one DataFrame, by shard id
    (the plan's order is the run's; only committed attempts are read, never a killed one's).

    Each part is read for ``columns`` and the filters' own columns only, and filtered before the
    next is read: every part was decoded whole and the run's rows concatenated before one slide
    or column was picked, so one slide of a large unfinished run held all of it in memory."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpubatch.outputs.manifest import CommitRef, Manifest
    from gpubatch.outputs.merge import read_part

    # what a part's read needs of each record, not the records (every shard's clocks and samples)
    entries = {e.shard_id: CommitRef.of(e) for e in Manifest(store).iter_entries()}
    expression = pq.filters_to_expression(filters) if filters else None
    wanted = None if columns is None else [*columns, *(c for c in _filter_columns(filters) if c not in columns)]
    tables, empty = [], None
    for sid in sorted(entries):
        if not entries[sid].part:
            continue
        table = read_part(store, entries[sid], wanted)
        if table.num_rows and expression is not None:
            table = table.filter(expression)
        table = table.select([c for c in columns if c in table.column_names]) if columns else table
        if table.num_rows:
            tables.append(table)
        elif empty is None and table.num_columns:  # no rows, but typed columns (a slide without tissue)
            empty = table
    if not tables:  # the columns a finished run's file has, not a frame without any
        return empty.to_pandas() if empty is not None else pd.DataFrame(columns=columns)
    table = pa.concat_tables(tables, promote_options="default")
    return (table.select(columns) if columns else table).to_pandas()


def _filter_columns(filters: list[Any] | None) -> list[str]:
    """The columns pyarrow ``filters`` name: a list of (column, op, value) tuples, or a list of
    such lists (OR of ANDs)."""
    found: list[str] = []
    for item in filters or []:
        for clause in (item if isinstance(item, list) else [item]):
            if clause[0] not in found:
                found.append(clause[0])
    return found


def require_output(store: OutputStore, where: str) -> OutputStore:
    """``store`` if a run made it, else NotAnOutputError naming ``where``: a missing folder or one
    no run wrote gave an empty report, exit code 0 and a 404 only at ``predictions()``, so a
    typo in a script's path read as a finished run with nothing in it."""
    from gpubatch.core.errors import NotAnOutputError
    from gpubatch.io.redact import safe_text
    from gpubatch.outputs.layout import MARKER

    shown = safe_text(where)
    if not store.exists():
        raise NotAnOutputError(f"{shown} does not exist: give the folder (or URI) a job's output.uri names")
    if not store.exists(MARKER):
        raise NotAnOutputError(f"{shown} is not a gpubatch output (no {MARKER} marker): give the folder "
                               "(or URI) a job's output.uri names")
    return store


def open_results(outdir: str, storage: dict[str, Any] | None = None) -> Result:
    """A run's outputs: its report, or for an unfinished run a summary of what is committed, with
    ``complete`` False and ``exit_code`` 3 (partial). Raises NotAnOutputError where no run wrote."""
    from gpubatch.report.summary import finished_report, summarize_output

    store = require_output(OutputStore(outdir, storage), outdir)
    report = finished_report(store) or summarize_output(store)
    failed = report.get("failed", [])
    unfinished = report.get("complete", True) is False  # never 0: not every input is done
    code = EXIT_PARTIAL if unfinished else finished_run_exit_code(len(failed), int(report.get("shards_done") or 0))
    return Result(report, store.uri, code, failed, dict(storage or {}))
