"""Opening a slide on a worker: local, streamed by byte range, or staged whole, as ``access`` says.

Which reader: OME-Zarr images (``.zarr`` or a folder with zarr metadata) go to the zarr reader
and DICOM-WSI series (a folder of DICOM files, a ``.dcm`` file, a file with the DICM magic) to
OpenSlide 4 or wsidicom (``dicom``), both read in place, locally or remotely; TIFF-family files
to tifffile; everything else to openslide.

In object storage every request costs tens of milliseconds and some fail transiently. ``stream``
reads TIFF-family slides by byte range: tifffile parses the header through a small readahead-cached
file, then the backend fetches stored tiles coalesced and concurrently through the storage entry
point's range reader, so latency is paid once per batch of requests, not per tile, and nothing is
downloaded whole. ``stage`` downloads whole files ahead of use into the bounded stage cache, for
formats only openslide reads. ``auto`` streams TIFF-family suffixes, stages the rest, falls back
to stage when a TIFF-family file cannot be tile-decoded, and records its choice (``backend.access``,
counters).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.core.threads import background_pool
from gpubatch.io.ranges import RangeFile, RangeReader
from gpubatch.io.readahead import ReadAhead
from gpubatch.io.redact import redact
from gpubatch.io.retry import RetryPolicy, default_policy
from gpubatch.io.stage_cache import StageCache, StagedFile, get_stage_cache
from gpubatch.io.storage import identity_of, open_ranges, stat
from gpubatch.io.uris import is_remote, local_path, uri_name
from gpubatch.sources.slides import preopen
from gpubatch.sources.slides.backends import TIFF_SUFFIXES, SlideBackend
from gpubatch.sources.slides.dicom import (
    DICOM_SUFFIXES,
    WsiDicomBackend,
    folder_holds_dicom,
    looks_like_dicom,
    open_dicom,
)
from gpubatch.sources.slides.omezarr import OmeZarrBackend, folder_is_zarr, is_zarr_uri
from gpubatch.sources.slides.openslide_backend import OpenSlideBackend
from gpubatch.sources.slides.tiff_backend import MalformedTiff, TiffBackend
from gpubatch.sources.slides.tiff_layout import SmallestFirst

#: formats whose data lives in a directory beside the file, named after its stem
COMPANION_SUFFIXES = (".mrxs",)
#: threads asking streamed openings' first header bytes, per process
HEADER_THREADS = 8


def missing_file(path: str) -> str:
    """Why a local path that does not exist is missing: a symbolic link whose target is gone or
    that points back at itself is listed (globs list links) but leads nowhere."""
    if os.path.islink(path):
        return "is a symbolic link that leads nowhere (its target is missing, or it points back at itself)"
    return "file not found"


def choose_access(uri: str, requested: str) -> str:
    """``auto``: stream TIFF-family files by range, stage everything else (openslide formats).

    OME-Zarr images and DICOM-WSI series are always read in place, chunk by chunk or frame by
    frame, by their own readers ("stream"): a folder of objects cannot be staged as one file.
    """
    if read_in_place(uri):
        return "stream"
    if requested != "auto":
        return requested
    return "stream" if uri_name(uri).lower().endswith(TIFF_SUFFIXES) else "stage"


def read_in_place(uri: str) -> bool:
    """Names that say OME-Zarr or DICOM (or a prefix): formats read in place, never staged."""
    return is_zarr_uri(uri) or uri.endswith("/") or uri_name(uri).lower().endswith(DICOM_SUFFIXES)


def has_companions(uri: str) -> bool:
    """Whether the slide comes with a folder of files beside it (MIRAX), staged together."""
    return uri_name(uri).lower().endswith(COMPANION_SUFFIXES)


def _mark(backend: SlideBackend, access: str, clocks: StageClocks) -> SlideBackend:
    backend.access = access  # type: ignore[attr-defined]
    clocks.count(f"storage.access.{access}")
    return backend


def open_slide(path: str, clocks: StageClocks, *, fileobj: Any = None,
               ranges: RangeReader | None = None, prefer: str = "auto") -> SlideBackend:
    """A local slide's backend: OME-Zarr and DICOM-WSI (folders or files) to their readers,
    tifffile for TIFF-family files it can tile-decode, openslide for the rest and as fallback."""
    if fileobj is None:
        special = _open_folder_format(path, clocks)
        if special is not None:
            return special
        if os.path.getsize(path) == 0:
            raise InputError(path, "is an empty (zero-byte) file")
    errors: list[str] = []
    if prefer in ("auto", "tifffile") and (fileobj is not None or path.lower().endswith(TIFF_SUFFIXES)):
        try:
            return TiffBackend(path, fileobj=fileobj, ranges=ranges, clocks=clocks)
        except InputError:
            raise
        except MalformedTiff as exc:
            raise InputError(path, f"{exc}; the file is damaged (another reader would guess its geometry)") from exc
        except SmallestFirst as exc:
            if fileobj is None:
                return _vendor_layout(path, str(exc))
            errors.append(f"tifffile: {exc}")
        except Exception as exc:  # any parse failure: try openslide, keep the reason
            errors.append(f"tifffile: {exc}")
    if fileobj is not None:
        raise InputError(path, "cannot stream this file by byte range (" + "; ".join(errors) + "); use input.access: stage")
    try:
        return OpenSlideBackend(path)
    except InputError as exc:
        if errors:
            raise InputError(path, f"{exc.message}; {'; '.join(errors)}") from exc
        raise


def _vendor_layout(path: str, why: str) -> SlideBackend:
    """openslide's reading of a TIFF whose first image is not its largest, where openslide knows
    the layout as a vendor's; refused for a generic TIFF, whose levels openslide would read with
    the first (smallest) image's resolution: tiles at tiles.mpp from the wrong magnification."""
    backend = OpenSlideBackend(path)
    if backend.info.vendor != "generic-tiff":
        return backend
    backend.close()
    raise InputError(path, f"{why}, which would be read as the slide or with its resolution; write the "
                           "pyramid full resolution first (e.g. vips tiffsave --tile --pyramid, or bfconvert "
                           "-pyramid-resolutions)")


def _open_folder_format(path: str, clocks: StageClocks) -> SlideBackend | None:
    """OME-Zarr images and DICOM-WSI series (a folder, or a DICOM file); None for other files."""
    from gpubatch.io.storage import retried_fs

    if not os.path.exists(path):
        raise InputError(path, missing_file(path))
    folder, (fs, _) = os.path.isdir(path), retried_fs(path)
    if is_zarr_uri(path) or (folder and folder_is_zarr(fs, path)):
        return OmeZarrBackend(path, clocks)
    if folder and folder_holds_dicom(fs, path) or not folder and looks_like_dicom(path):
        return open_dicom(path, clocks)
    if folder:
        raise InputError(path, "is a directory holding neither an OME-Zarr image nor DICOM files, "
                               "not a slide")
    return None


def open_stream(uri: str, options: dict[str, Any] | None, clocks: StageClocks,
                policy: RetryPolicy | None = None, read_ahead: int = 0, *,
                tissue: bool = False) -> SlideBackend:
    """Open a TIFF-family slide for range reads: header through a cached file, tiles by range,
    the planned blocks' tiles fetched up to ``read_ahead`` bytes ahead of the readers.

    ``tissue``: the shard will detect tissue, which reads the coarsest level first; its tiles are
    requested as soon as the header is parsed, in flight during the rest of the opening (the
    decoders' ``is_jfif`` round trip) instead of after it: a round trip less per slide.
    """
    policy = policy or default_policy()
    reader = open_ranges(uri, options, clocks, policy)
    first = _header_and_version(reader)
    try:
        info = first.info or stat(uri, options, policy, clocks)
        if info["type"] == "directory":
            raise InputError(redact(uri), "is an empty object or a prefix (directory), not a slide file")
        if info["size"] <= 0:  # staging (input.access auto) reads what a whole GET gives
            raise InputError(redact(uri), "has no size to read ranges by (an empty object, or a server that "
                                          "sends no Content-Length): set input.access to stage or auto")
        reader.pin(info["etag"])  # the size's version: every read must be of it (where it can tell)
    except BaseException:
        first.chunk.result()  # its errors are its own; the stat's is the one to report
        reader.close()
        raise
    handle = RangeFile(reader, info["size"], uri_name(uri), first=_whole_first(first.chunk.result(), info["size"]))
    try:
        backend = open_slide(redact(uri), clocks, fileobj=handle, ranges=reader, prefer="tifffile")
        backend.opened_identity = identity_of(uri, info)
        if read_ahead > 0 and reader.timed:
            backend.read_ahead = ReadAhead(reader, read_ahead, clocks)  # type: ignore[attr-defined]
            if tissue and hasattr(backend, "read_coarsest_ahead"):
                backend.read_coarsest_ahead()
        _prewarm(backend, reader)
        return backend
    except InputError as exc:
        handle.close()
        raise InputError(redact(uri), redact(exc.message), retryable=exc.retryable) from None
    except BaseException:
        handle.close()
        raise


class _FirstRead(NamedTuple):
    """A streamed slide's first bytes (a future), and the object's size and version where the
    answer to that read told them (else None: the open asks a HEAD)."""

    chunk: Future[bytes | None]
    info: dict[str, Any] | None


def _header_and_version(reader: RangeReader) -> _FirstRead:
    """The header's first bytes, read at once, and the object's size and version in the same
    round trip: from the GET's own answer where the reader gives it (obstore: its Content-Range
    and ETag), a request less per slide than a HEAD beside it; else (fsspec, or a GET that
    failed, whose error the stat then names) ``info`` is None and the open's HEAD goes beside
    the GET, each thread waiting one round trip. The reader is pinned to that version either way."""
    if reader.client != "obstore":
        return _FirstRead(background_pool("open", HEADER_THREADS).submit(_first_chunk, reader), None)
    chunk: Future[bytes | None] = Future()
    chunk.set_result(_first_chunk(reader))
    return _FirstRead(chunk, reader.answered())


def _first_chunk(reader: RangeReader) -> bytes | None:
    """The bytes RangeFile's first request asks for (tifffile reads the 8-byte header first), or
    None after a failed request (the header is then read as it would have been). Asked before
    the object's size is known, so that the size (a HEAD) and the header (a GET) cost one round
    trip, not two; an object shorter than the request comes back whole."""
    try:
        got = reader.fetch_spans([(0, RangeFile.FIRST_READ)])[0]
    except Exception:  # noqa: BLE001 - an optimisation only: the open reads the header itself
        return None
    return None if got.error is not None or got.data is None else bytes(got.data)


def _whole_first(chunk: bytes | None, size: int) -> bytes | None:
    """``chunk`` if it is all of the object's first bytes that were asked for (not the answer of
    another version of the object, shorter or longer than the size just read), else None."""
    return chunk if chunk is not None and len(chunk) == min(size, RangeFile.FIRST_READ) else None


def _prewarm(backend: SlideBackend, reader: RangeReader) -> None:
    """Fill tifffile's lazy ``is_jfif`` for every level at open, in one concurrent round trip.

    Left lazy, it seeks and reads the shared file handle on each level's first decode: a round trip
    mid-pipeline, from racing reader threads.
    """
    pages = [p for p in getattr(backend, "pages", ())
             if p.compression in {6, 7, 34892, 33007} and len(p.dataoffsets)
             and p.dataoffsets[0] and p.databytecounts[0] >= 11]
    spans = [(int(p.dataoffsets[0]) + 6, int(p.dataoffsets[0]) + 10) for p in pages]
    for page, head in zip(pages, reader.fetch_many(spans), strict=True):
        page.__dict__["is_jfif"] = head == b"JFIF"


class StagedBackend(SlideBackend):
    """A slide opened from its staged local copy; closing it unpins the copy so it may be evicted."""

    def __init__(self, inner: SlideBackend, staged: StagedFile):
        self.inner, self.info, self._staged = inner, inner.info, staged
        # the class's defaults would hide the inner backend's (and skip the read-limit check)
        self.grayscale, self.stored_tile_bytes = inner.grayscale, inner.stored_tile_bytes

    def read_boxes(self, level: int, boxes: np.ndarray, clocks: StageClocks) -> np.ndarray:
        return self.inner.read_boxes(level, boxes, clocks)

    def read_subsampled(self, level: int, step: int, block: int, clocks: StageClocks) -> np.ndarray:
        return self.inner.read_subsampled(level, step, block, clocks)

    def expect_reads(self, level: int, blocks: Iterable[np.ndarray]) -> None:
        self.inner.expect_reads(level, blocks)

    def use_gpu_decode(self) -> None:
        self.inner.use_gpu_decode()

    def accept_corrupt_tiles(self) -> None:
        self.inner.accept_corrupt_tiles()

    def integrity_notes(self) -> list[str]:
        return self.inner.integrity_notes()

    def notes(self, level: int) -> list[str]:  # the class's default would hide the inner backend's
        return self.inner.notes(level)

    def input_version(self) -> str | None:
        return self._staged.etag

    def input_identity(self) -> dict[str, Any] | None:
        """The version the copy is of, as staging's HEAD found it: the shard's start identity,
        with no HEAD of its own (the copy is that one version throughout, however late it runs)."""
        return self._staged.identity

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self._staged.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)


def open_staged(uri: str, options: dict[str, Any] | None, clocks: StageClocks,
                policy: RetryPolicy | None = None, cache: StageCache | None = None) -> SlideBackend:
    """Open the stage cache's local copy of a remote slide (downloaded now if not ahead of time)."""
    cache = cache or get_stage_cache()
    staged = cache.open(uri, options, clocks, policy, companions=has_companions(uri))
    try:  # local preads are not storage traffic: keep them out of the storage counters
        return StagedBackend(open_slide(staged.path, StageClocks()), staged)
    except InputError as exc:
        staged.close()
        message = exc.message.replace(staged.path, os.path.basename(staged.path))
        raise InputError(redact(uri), redact(message), retryable=exc.retryable) from None
    except BaseException:
        staged.close()
        raise


def open_slide_input(uri: str, clocks: StageClocks, *, access: str = "auto",
                     options: dict[str, Any] | None = None,
                     policy: RetryPolicy | None = None, read_ahead: int = 0,
                     tissue: bool = False) -> SlideBackend:
    """Open a slide on a worker: local, streamed or staged, as ``backend.access`` records;
    ``read_ahead``: bytes of a streamed slide's tiles fetched ahead of its readers, at most;
    ``tissue``: tissue detection follows (a streamed slide fetches its coarsest level at once)."""
    if not is_remote(uri):
        path = local_path(uri)
        if not os.path.exists(path):
            raise InputError(uri, missing_file(path))
        return _mark(open_slide(path, clocks), "local", clocks)
    in_place = open_in_place(uri, options, clocks, policy)
    if in_place is not None:
        return _mark(in_place, "stream", clocks)
    chosen = choose_access(uri, access)
    if chosen == "stream":
        try:
            return _mark(_taken_or_opened(uri, options, clocks, policy, read_ahead, tissue), "stream", clocks)
        except InputError as exc:
            if access != "auto" or is_storage_failure(exc):
                raise
            clocks.count("storage.stream_fallbacks")
    return _mark(open_staged(uri, options, clocks, policy), "stage", clocks)


def open_in_place(uri: str, options: dict[str, Any] | None, clocks: StageClocks,
                  policy: RetryPolicy | None = None) -> SlideBackend | None:
    """A remote OME-Zarr image or DICOM-WSI series opened where it lies; None for single-file
    formats. A prefix (folder) is looked into: zarr metadata, else DICOM files, else an error."""
    from gpubatch.io.storage import retried_fs

    if is_zarr_uri(uri):
        return OmeZarrBackend(uri, clocks, options=options, policy=policy)
    if uri_name(uri).lower().endswith(TIFF_SUFFIXES):
        return None
    info = stat(uri, options, policy, clocks)  # folders are often named by a UID with dots in it
    if info["type"] != "directory":
        return WsiDicomBackend(uri, clocks, options=options) if read_in_place(uri) else None
    fs, path = retried_fs(uri, options, policy, clocks)
    if folder_is_zarr(fs, path):
        return OmeZarrBackend(uri, clocks, options=options, policy=policy)
    if folder_holds_dicom(fs, path):
        return WsiDicomBackend(uri, clocks, options=options)
    raise InputError(redact(uri), "is a prefix (folder) holding neither an OME-Zarr image nor "
                                  "DICOM files, not a slide")


def opens_in_place(uri: str, options: dict[str, Any] | None, policy: RetryPolicy | None = None) -> bool:
    """Whether a remote ``uri`` goes to :func:`open_in_place` (an OME-Zarr image, a DICOM-WSI file
    or prefix): what fails there fails the shard, with no download to fall back on. Asks the
    store (one stat) only for a name that does not say; a failed stat says nothing either way."""
    if is_zarr_uri(uri) or read_in_place(uri):
        return True
    if uri_name(uri).lower().endswith(TIFF_SUFFIXES):
        return False
    try:
        return bool(stat(uri, options, policy)["type"] == "directory")
    except InputError:
        return False


def _taken_or_opened(uri: str, options: dict[str, Any] | None, clocks: StageClocks,
                     policy: RetryPolicy | None, read_ahead: int, tissue: bool) -> SlideBackend:
    """The slide opened ahead in this process (waiting for the rest of its opening), or opened
    now. An opening ahead that failed is tried again here, where its error is the shard's."""
    opening = preopen.take(uri)
    if opening is not None and not opening.future.cancel():  # still queued: open it here, now
        t0 = time.perf_counter()
        try:
            backend: SlideBackend | None = opening.future.result()
        except Exception:  # noqa: BLE001 - opened again below, which raises what the shard sees
            backend = None
        clocks.count("storage.wait_s", time.perf_counter() - t0)
        if backend is not None:
            opening.clocks.hand_over(clocks)  # its requests, and its readers' from now on
            clocks.count("storage.opened_ahead")
            return backend
    return open_stream(uri, options, clocks, policy, read_ahead, tissue=tissue)


def is_storage_failure(exc: InputError) -> bool:
    """Failures that staging would hit again (missing, forbidden, unreachable, an object cut
    short or whose tile tables do not fit it: its download is the same bytes): no fallback."""
    return exc.retryable or exc.message.startswith(("object not found", "access denied", "storage",
                                                    "is an empty", "file not found", "truncated",
                                                    "malformed IFD"))


def prefetch(uris: Iterable[str], access: str, options: dict[str, Any] | None,
             policy: RetryPolicy | None = None, read_ahead: int = 0, *, streams: bool = True,
             cache: StageCache | None = None, tissue: bool = False,
             plan: Callable[[SlideBackend, str, StageClocks], None] | None = None) -> list[str]:
    """Start background downloads of the slides among ``uris`` that will be staged, and
    background openings of those that will be streamed (``preopen``).

    Call on a worker with the next few shards' URIs when a shard starts: their downloads and
    openings then overlap this shard's compute. Local slides are ignored; a download that would not
    fit the stage cache is skipped (the slide downloads when opened). Returns the URIs started.
    ``streams`` False: staging only (a process that will not read the slides); ``cache``: this
    stage cache instead of the process's; ``tissue``: the shards detect tissue, so a slide opened
    ahead fetches its coarsest level too; ``plan(backend, uri, clocks)``: run on a slide opened
    ahead once it is open (the source plans its reads, so they are in flight before its shard);
    when it fails, the opening fails and the shard opens the slide itself.
    """
    remote = [u for u in uris if is_remote(u)]
    streamed = [u for u in remote if streams and not read_in_place(u) and choose_access(u, access) == "stream"]

    def opener(uri: str, clocks: StageClocks) -> SlideBackend:
        backend = open_stream(uri, options, clocks, policy, read_ahead, tissue=tissue)
        if plan is not None:
            try:
                plan(backend, uri, clocks)
            except BaseException:
                backend.close()
                raise
        return backend

    started = preopen.open_ahead(streamed, opener)
    cache = cache or get_stage_cache()
    for uri in remote:
        if choose_access(uri, access) == "stage":
            started += cache.prefetch([uri], options, companions=has_companions(uri))
    return started


def release(uri: str) -> None:
    """Drop a slide's staged files once its shard has committed (no-op if it was not staged)."""
    if is_remote(uri):
        get_stage_cache().release(uri)
        preopen.discard(uri)
