"""Slides as a Source: one shard per slide; on a worker, the grid, the tissue filter, block reads.

Planning (client) expands the input globs and nothing more: a slide is opened only on a worker,
where its grid (``grid``) and tissue mask (``tissue``) are computed and its tiles read in blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.core.files import safe_filename
from gpubatch.core.phases import Phase, phase
from gpubatch.core.results import ShardResult
from gpubatch.core.switches import PLAN_AHEAD, switched_on
from gpubatch.io.redact import redact
from gpubatch.io.uris import is_remote, uri_name
from gpubatch.ops.preprocess import Preprocess
from gpubatch.outputs.per_slide import SlideGrid
from gpubatch.outputs.store import OutputStore
from gpubatch.sources.base import ItemBlock, ReadUnit, Shard, ShardReader, Source
from gpubatch.sources.slides.backends import SlideBackend
from gpubatch.sources.slides.grid import TileGrid, block_ids, check_level_size, make_grid, resize
from gpubatch.sources.slides.tissue import filter_tissue
from gpubatch.spec import JobSpec


@dataclass
class SlidePlan:
    """What a slide's shard reads, worked out once the slide is open: its tile grid, the tiles
    kept after the tissue filter, and their read blocks, whose reads are announced to the backend
    (a streamed slide's are then fetched ahead). Made in the shard, or where the slide was opened
    ahead of it (:func:`plan_ahead`), so that the shard starts with its first tiles in flight."""

    tiles_key: str  # the job's tiles section it was made for
    grid: TileGrid
    kept: TileGrid
    units: list[np.ndarray]  # grid indices of each read block, in read order


def plans_ahead() -> bool:
    """Whether slides opened ahead also have their reads planned (``GPUBATCH_PLAN_AHEAD``)."""
    return switched_on(PLAN_AHEAD)


def _tiles_key(job: JobSpec) -> str:
    return hashlib.sha1(job.tiles.model_dump_json().encode()).hexdigest()


def plan_slide(backend: SlideBackend, job: JobSpec, uri: str, clocks: StageClocks) -> SlidePlan:
    """The grid, the tissue filter (reads the coarsest level) and the read blocks, announced."""
    grid = make_grid(backend.info, job.tiles, uri)
    if job.tiles.tissue.method != "none":
        check_level_size(backend.info, len(backend.info.level_dimensions) - 1, job.tiles,
                         uri, "the coarsest, read for the tissue mask")
    kept = filter_tissue(grid, backend, job.tiles, clocks)
    units: list[np.ndarray] = []
    if len(kept):
        blocks = block_ids(kept, job.tiles.read_block, job.tiles.max_read_bytes)
        order = np.argsort(blocks, kind="stable")
        units = np.split(order, np.flatnonzero(np.diff(blocks[order])) + 1)
        backend.expect_reads(kept.level, (_boxes(kept, members) for members in units))
    return SlidePlan(_tiles_key(job), grid, kept, units)


def configure_backend(backend: SlideBackend, job: JobSpec) -> None:
    """The job's decode settings, before any tile is read (a plan reads the coarsest level).

    A stored tile larger than ``tiles.max_read_bytes`` decoded is refused here: one tile of a
    few MB on disk may claim gigabytes (a 32768 px zlib tile took 3.4 GB to decode), and every
    read of the slide would decode it whole."""
    if backend.stored_tile_bytes > job.tiles.max_read_bytes:
        raise InputError(getattr(backend, "path", ""), f"a stored tile decodes to {backend.stored_tile_bytes} "
                                                       f"bytes, over tiles.max_read_bytes ({job.tiles.max_read_bytes})")
    if job.tiles.decoder == "gpu":
        backend.use_gpu_decode()
    if job.tiles.integrity == "lenient":
        backend.accept_corrupt_tiles()


def plan_ahead(job: JobSpec, backend: SlideBackend, uri: str, clocks: StageClocks) -> None:
    """For a slide opened ahead of its shard: configure it and plan its reads now."""
    configure_backend(backend, job)
    backend.plan = plan_slide(backend, job, uri, clocks)


def _boxes(grid: TileGrid, members: np.ndarray) -> np.ndarray:
    """Level-pixel boxes (x, y, w, h) of the grid tiles ``members``."""
    lx = np.round(grid.xs[members] / grid.level_downsample).astype(np.int64)
    ly = np.round(grid.ys[members] / grid.level_downsample).astype(np.int64)
    return np.stack([lx, ly, np.full_like(lx, grid.read_size), np.full_like(ly, grid.read_size)], axis=1)


class SlideReader(ShardReader):
    """One slide on a worker: reads the blocks of its plan (made here, or where it was opened ahead)."""

    def __init__(self, shard: Shard, job: JobSpec, backend: SlideBackend, clocks: StageClocks):
        self.shard, self.job, self.backend = shard, job, backend
        ahead = backend.plan
        backend.plan = None
        if ahead is not None and ahead.tiles_key == _tiles_key(job):
            clocks.count("slides.planned_ahead")
            plan = ahead
        else:
            plan = plan_slide(backend, job, shard.input_uri, clocks)
        grid, self.grid, self.units = plan.grid, plan.kept, plan.units
        self.clocks = clocks
        self.attrs = {
            "slide": redact(shard.input_uri), "level": self.grid.level, "tile_size": job.tiles.size,
            "mpp": (self.grid.mpp * self.grid.downsample) if self.grid.mpp else None,
            "read_size": self.grid.read_size, "extent_level0": job.tiles.size * self.grid.downsample,
            "grid_tiles": len(grid), "tissue_tiles": len(self.grid),
            "slide_info": backend.info.as_dict(), "notes": [*grid.notes, *backend.integrity_notes()],
        }
        self.fixed_notes = list(self.attrs["notes"])
        self.notes_lock = threading.Lock()
        self._renew_notes()
        reason = _empty_reason(backend, grid, len(self.grid), job)
        if reason:
            self.attrs["empty_reason"] = reason

    @property
    def n_items(self) -> int:
        return len(self.grid)

    def read_units(self) -> Iterator[ReadUnit]:
        for members in self.units:
            yield partial(self._read_block, members)

    def _renew_notes(self) -> None:
        """The backend's notes as read so far (blocks are read by several threads: the last to
        renew them has seen every count made before it)."""
        with self.notes_lock:
            self.attrs["notes"] = [*self.fixed_notes, *self.backend.notes(self.grid.level)]

    def _read_block(self, members: np.ndarray) -> ItemBlock:
        g = self.grid
        tiles = self.backend.read_boxes(g.level, _boxes(g, members), self.clocks)
        self._renew_notes()
        with self.clocks.part("resample"):
            tiles = resize(tiles, g.size)
        return ItemBlock(tiles, self._index(members))

    def _index(self, members: np.ndarray) -> dict[str, np.ndarray]:
        g = self.grid
        return {"x": g.xs[members], "y": g.ys[members], "level": np.full(len(members), g.level, dtype=np.int32)}

    def empty_index(self) -> dict[str, np.ndarray]:
        return self._index(np.zeros(0, dtype=np.int64))

    @property
    def preprocess(self) -> Preprocess:
        return tile_preprocess(self.job)

    def input_version(self) -> str | None:
        return self.backend.input_version()

    def input_identity(self) -> dict[str, Any] | None:
        return self.backend.input_identity()

    def close(self) -> None:
        self.backend.close()


def _empty_reason(backend: SlideBackend, grid: TileGrid, kept: int, job: JobSpec) -> str | None:
    """Why a slide yields no tiles, in the terms of the spec keys that decide it; None if it does."""
    if kept:
        return None
    if not len(grid):
        w, h = backend.info.level_dimensions[0]
        extent = job.tiles.size * grid.downsample
        return (f"smaller than one tile: {w}x{h} px at level 0, one tile spans {extent:.0f} px "
                f"(tiles.size {job.tiles.size} at the chosen resolution)")
    return (f"no tissue: none of its {len(grid)} tiles reached tiles.tissue.min_fraction "
            f"{job.tiles.tissue.min_fraction:g} (method {job.tiles.tissue.method})")


def tile_preprocess(job: JobSpec) -> Preprocess:
    """RGB uint8 tiles -> (x / 255 - mean) / std per channel, in the spec's layout."""
    norm = job.model.input
    return Preprocess("tiles", tuple(norm.mean), tuple(norm.std), norm.layout)


def _slide_grid(result: ShardResult, job: JobSpec) -> SlideGrid:
    """Where a slide's tiles lie, from its record: level-0 size, tile edge and stride, the level
    read and a read's edge there, and the part of level 0 viewers show (openslide's bounds)."""
    info = result.attrs.get("slide_info") or {}
    extent = float(result.attrs.get("extent_level0", job.tiles.size))
    downsamples = info.get("level_downsamples") or [1.0]
    level = int(result.attrs.get("level", 0))
    bounds = info.get("bounds")
    return SlideGrid(int(info.get("width", 0)), int(info.get("height", 0)),
                     max(extent * (1.0 - job.tiles.overlap), 1.0), extent,
                     float(downsamples[level]) if level < len(downsamples) else 1.0,
                     int(result.attrs.get("read_size", 0)),
                     (int(bounds[0]), int(bounds[1]), int(bounds[2]), int(bounds[3])) if bounds else None)


def slide_key(uri: str) -> str:
    """A short, filesystem-safe, collision-free name for a slide's outputs (shard id, part and
    zarr group names): the file's name and a hash, both of the redacted URI, so no credential
    reaches a file name and a re-signed URL names the same shard (``--resume`` finds it)."""
    shown = redact(uri)
    stem = safe_filename(uri_name(shown) or "slide")
    return f"{stem}-{hashlib.sha1(shown.encode()).hexdigest()[:8]}"


def _slides_of(pattern: str, job: JobSpec, failed: list[dict[str, str]]) -> list[str]:
    """The slides a pattern of ``input.uris`` names; a pattern that matches none, or whose listing
    kept failing, is added to ``failed`` (that pattern, not the run)."""
    from gpubatch.io.listing import expand_uris
    from gpubatch.io.uris import has_magic
    from gpubatch.sources.slides.listing import slide_inputs

    try:
        found = expand_uris([pattern], job.input.storage)
        if has_magic(pattern):  # a named input is kept as named; a glob's matches are grouped
            found = slide_inputs(found, job.input.storage)
    except InputError as exc:
        failed.append({"input": redact(pattern), "error": exc.message})
        return []
    if not found:
        failed.append({"input": redact(pattern), "error": "matches no file (check the path or glob)"})
    return found


class SlideSource(Source):
    kind = "slides"

    def plan(self, job: JobSpec) -> tuple[Sequence[Shard], list[dict[str, str]]]:
        failed: list[dict[str, str]] = []
        shards: dict[str, Shard] = {}  # by shard id: two URIs that differ only in credentials are one slide
        with phase("planning: listing the inputs", len(job.input.uris), "pattern") as said:
            for pattern in said.counting(job.input.uris):  # a listing of many thousands (retried) takes a while
                for uri in _slides_of(pattern, job, failed):
                    shards.setdefault(slide_key(uri), Shard(slide_key(uri), uri, {}))
        return list(shards.values()), failed
    def check_inputs(self, job: JobSpec, shards: Sequence[Shard]) -> tuple[list[dict[str, str]], list[str]]:
        """Each slide opened and its reads planned, as its shard would (``checks``)."""
        from gpubatch.sources.slides.checks import check_slides

        checks = check_slides([s.input_uri for s in shards], job, plan_ahead)
        note = checks.note()
        return checks.failed, [note] if note else []

    def open(self, shard: Shard, job: JobSpec, clocks: StageClocks) -> ShardReader:
        from gpubatch.io.retry import policy_for
        from gpubatch.sources.slides.open import open_slide_input

        backend = open_slide_input(shard.input_uri, clocks, access=job.input.access,
                                   options=job.input.storage,
                                   policy=policy_for(job.run),
                                   read_ahead=job.input.read_ahead_mb << 20,
                                   tissue=job.tiles.tissue.method != "none")
        try:
            configure_backend(backend, job)
            return SlideReader(shard, job, backend, clocks)
        except BaseException:
            backend.close()
            raise

    def before_workers(self, job: JobSpec, first: Sequence[str],
                       storage_profile: dict[str, Any]) -> Callable[[], StageClocks | None]:
        from gpubatch.io.stage_cache import VERSIONS_WAIT_S, StageCache
        from gpubatch.sources.slides.open import prefetch

        config = storage_profile.get("stage_cache") or {}
        # every download at once: each holds its copy's lock from its start, so that a worker
        # opening the slide waits for it instead of downloading it again; its records name the
        # run, whose workers then take each copy's version as asked here (no HEAD of their own)
        cache = StageCache(config.get("dir"), config.get("max_bytes"), max(1, len(first)), config.get("run"))
        started = prefetch(first, job.input.access, job.input.storage, streams=False, cache=cache)
        # their versions asked (a HEAD each, at once) before a worker starts: else a worker that
        # opened one first asked it again beside this process
        cache.wait_recorded(started, VERSIONS_WAIT_S)

        def done() -> StageClocks:
            cache.clear()  # copies no worker took or released (their shards failed)
            return cache.spent

        return done

    def before_shard(self, job: JobSpec, upcoming: Sequence[str]) -> None:
        from gpubatch.io.retry import policy_for
        from gpubatch.sources.slides.open import prefetch

        if upcoming:
            prefetch(upcoming, job.input.access, job.input.storage,
                     policy_for(job.run), job.input.read_ahead_mb << 20,
                     tissue=job.tiles.tissue.method != "none",
                     plan=partial(plan_ahead, job) if plans_ahead() else None)

    def after_commit(self, job: JobSpec, shard: Shard) -> None:
        from gpubatch.sources.slides.open import release

        release(shard.input_uri)

    def open_finds_identity(self, job: JobSpec, shard: Shard) -> bool:
        """A remote TIFF-family slide read by range: the version its open found (its first GET's
        answer, or a HEAD) is the shard's identity; a staged lone file: its staging's HEAD's."""
        from gpubatch.sources.slides.open import choose_access, has_companions, read_in_place

        uri = shard.input_uri
        if not is_remote(uri) or read_in_place(uri):
            return False
        access = choose_access(uri, job.input.access)
        return access == "stream" or access == "stage" and not has_companions(uri)

    def forget_input(self, job: JobSpec, shard: Shard) -> None:
        from gpubatch.sources.slides.open import release

        release(shard.input_uri)

    def constant_columns(self, shard: Shard) -> dict[str, Any]:
        return {"slide": redact(shard.input_uri)}

    def write_outputs(self, job: JobSpec, store: OutputStore, results: Iterable[ShardResult],
                      progress: Phase | None = None) -> None:
        """Per slide, from predictions only: heatmaps, QuPath GeoJSON (``geojson`` format), and
        with a slide head, slide_predictions.parquet. Files are named by the slide's key.

        The records are read once, as they stream past: what is kept per slide is its key and
        grid (a few numbers); the head's slide-level outputs go straight to their table.
        """
        from gpubatch.outputs.geojson import write_slide_geojson
        from gpubatch.outputs.heatmaps import write_heatmaps
        from gpubatch.outputs.slide_outputs import SlidePredictions

        places: dict[str, tuple[str, SlideGrid]] = {}
        with SlidePredictions(store) if job.slide_model is not None else contextlib.nullcontext() as table:
            for r in results:
                places[redact(r.input)] = (r.shard_id, _slide_grid(r, job))
                if table is not None:
                    table.add(r)
        write_heatmaps(store, places, job.output.heatmap, progress)
        if "geojson" in job.output.formats:
            write_slide_geojson(store, places, progress)

    def model_input(self, job: JobSpec, batch_size: int) -> tuple[tuple[int, ...], str]:
        size = job.tiles.size
        item = (3, size, size) if job.model.input.layout == "NCHW" else (size, size, 3)
        return (batch_size, *item), "float32"

    def read_unit_bytes(self, job: JobSpec) -> tuple[int, tuple[str, ...]]:
        """A block's decoded tiles: about ``read_block`` pixels a side, or one tile where a tile
        is larger, each read pixel in 1 / (1 - overlap)^2 tiles, and never over ``max_read_bytes``
        (``grid.block_ids`` keeps a block's tiles under it)."""
        t = job.tiles
        edge = max(t.read_block, t.size) / (1.0 - t.overlap)
        return int(min(3 * edge * edge, t.max_read_bytes)), ("tiles.read_block", "tiles.overlap", "tiles.max_read_bytes")

    def index_schema(self, job: JobSpec) -> list[str]:
        return ["slide", "x", "y", "level"]
