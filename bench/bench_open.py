"""Opening streamed slides: the header asked beside the object's size against after it, side by side;
with ``--at-once N``, N slides opened at once in one process, tifffile's cached properties
lock-free against locked.

    python bench/bench_open.py [--slides 8] [--latency 0 80] [--repeats 3] [--at-once N] [--out F]

An opening of a streamed TIFF-family slide (gpubatch.sources.slides.open.open_stream, with the
job defaults: read-ahead 64 MB, tissue detection following) asks the object's size (a HEAD) and
its first bytes (a GET from byte 0); gpubatch sends both at once. The other contestant makes the
opening as it was before that change: the size first, and the header's GET only once the size
came back (its first-bytes request is switched off, so RangeFile reads the header itself). The
server is SeaweedFS behind bench/latency_proxy.py, as in bench/bench_remote.py; the contestants
alternate, each opening every slide once per round in this one process. Reported: the median
seconds per opening and the requests per opening.

``--at-once N`` opens the slides N at a time from N threads, as a worker process does with its
shards' own slides and those it opens ahead of them. The contestants are then gpubatch's opening
(tifffile's cached properties lock-free, :func:`gpubatch.core.threads.unlock_cached_properties`)
and the same with them locked, as Python 3.11's ``functools.cached_property`` has them: one lock
per attribute across every instance, held while ``TiffFile.series`` reads the pyramid's IFDs.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_remote import BUCKET, KEY, SECRET, start_proxy, start_seaweedfs, stop_seaweedfs, upload  # noqa: E402
from bench_slides import make_workload  # noqa: E402
from common import WORK, publish  # noqa: E402

BESIDE, AFTER = "header asked beside the size (gpubatch)", "header asked after the size (before)"
LOCK_FREE, LOCKED = "cached properties lock-free (gpubatch)", "cached properties locked (Python 3.11, before)"


@contextlib.contextmanager
def _contestant(name: str) -> Iterator[None]:
    """For AFTER: no first-bytes request beside the size, which is the opening before the change;
    for LOCKED: tifffile's cached properties as Python 3.11's functools makes them."""
    from gpubatch.sources.slides import open as slide_open

    if name == LOCKED:
        with _locked_cached_properties():
            yield
        return
    if name != AFTER:
        yield
        return
    beside = slide_open._first_chunk
    slide_open._first_chunk = lambda reader: None  # type: ignore[assignment]
    try:
        yield
    finally:
        slide_open._first_chunk = beside


@contextlib.contextmanager
def _locked_cached_properties() -> Iterator[None]:
    """tifffile's classes with ``functools.cached_property`` as it is (locked on Python 3.11) in
    place of the lock-free ones gpubatch gives them, put back after."""
    import functools

    import tifffile

    from gpubatch.sources.slides.tiff_backend import import_tifffile

    import_tifffile()
    swapped = []
    for cls in (tifffile.TiffFile, tifffile.TiffPage, tifffile.TiffFrame, tifffile.TiffPageSeries, tifffile.TiffTag):
        for attr_name, attr in list(vars(cls).items()):
            if isinstance(attr, functools.cached_property) and type(attr) is not functools.cached_property:
                locked = functools.cached_property(attr.func)
                locked.__set_name__(cls, attr_name)
                setattr(cls, attr_name, locked)
                swapped.append((cls, attr_name, attr))
    try:
        yield
    finally:
        for cls, attr_name, attr in swapped:
            setattr(cls, attr_name, attr)


def _open_one(uri: str, storage: dict[str, Any]) -> tuple[float, float]:
    """Seconds and requests of one opening (closed after)."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.sources.slides.open import open_stream

    clocks = StageClocks()
    t0 = time.perf_counter()
    backend = open_stream(uri, storage, clocks, read_ahead=64 << 20, tissue=True)
    seconds = time.perf_counter() - t0
    backend.close()
    return seconds, clocks.counters.get("storage.requests", 0.0)


def _open_all(uris: list[str], storage: dict[str, Any], at_once: int = 1) -> tuple[list[float], list[float]]:
    """Seconds and requests of each opening, ``at_once`` at a time from as many threads."""
    with ThreadPoolExecutor(at_once) as pool:
        done = list(pool.map(lambda uri: _open_one(uri, storage), uris))
    return [s for s, _ in done], [q for _, q in done]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", default="8192x8192")
    ap.add_argument("--latency", type=float, nargs="+", default=[0, 80], help="ms added per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--at-once", type=int, default=1,
                    help="slides opened at once (threads); above 1, lock-free against locked cached properties")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    wl = make_workload("decode", args.slides, (w, h))
    tmp = Path(tempfile.mkdtemp(prefix="bench-open-", dir=WORK))
    weed, port = start_seaweedfs(tmp / "weed")
    rows: list[dict[str, Any]] = []
    try:
        upload(port, wl["slides"])
        uris = [f"s3://{BUCKET}/{p.name}" for p in wl["slides"]]
        for ms in args.latency:
            proxy, proxy_port = start_proxy(port, ms)
            storage = {"endpoint_url": f"http://127.0.0.1:{proxy_port}", "key": KEY, "secret": SECRET,
                       "client_kwargs": {"region_name": "us-east-1"}}
            try:
                rows += _measure(uris, storage, ms, args.repeats, args.at_once)
            finally:
                proxy.kill()
                proxy.wait()
    finally:
        stop_seaweedfs(weed)
        shutil.rmtree(tmp, ignore_errors=True)
    return publish("bench_open.py", rows, ["latency ms", "opening", "at once", "openings", "median s per opening",
                                           "requests per opening", "x the other"], args.out, argv)


def _measure(uris: list[str], storage: dict[str, Any], ms: float, repeats: int,
             at_once: int = 1) -> list[dict[str, Any]]:
    names = [BESIDE, AFTER] if at_once == 1 else [LOCK_FREE, LOCKED]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    requests: dict[str, list[float]] = {n: [] for n in names}
    with _contestant(BESIDE):
        _open_all(uris[:1], storage)  # untimed: the process's first opening pays its imports
    for r in range(repeats):
        for name in names[r % 2:] + names[: r % 2]:
            with _contestant(name):
                s, q = _open_all(uris, storage, at_once)
            seconds[name] += s
            requests[name] += q
            print(f"  {ms:g} ms, round {r + 1}, {name}: median {statistics.median(s):.3f} s", flush=True)
    medians = {n: statistics.median(seconds[n]) for n in names}
    return [{"latency ms": ms, "opening": n, "at once": at_once, "openings": len(seconds[n]), "median s per opening": medians[n],
             "requests per opening": statistics.median(requests[n]),
             "x the other": medians[n] / medians[names[1 - i]]} for i, n in enumerate(names)]


if __name__ == "__main__":
    main()
