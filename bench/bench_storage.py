"""Object-storage read throughput: stream vs stage vs a sequential per-tile reader, by latency.

A moto S3 server and fault proxies adding 0, 20 and 80 ms per request run in a child process (so
that their Python threads do not contend with the readers for the GIL). Every stored tile of every
level of the same slides is read and decoded through gpubatch's TiffBackend:

* ``stream``: byte ranges, coalesced and concurrent, ``--readers`` threads each reading blocks;
* ``stage``: whole-file download into the stage cache, then the same local reads;
* ``per-tile``: one range request per stored tile, serially (the naive remote reader), on the
  first ``--seq-tiles`` tiles, its rate extrapolated.

    python bench/bench_storage.py [--readers 4 16] [--latency 0 20 80] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gpubatch.core.clocks import StageClocks  # noqa: E402
from gpubatch.io.metrics import storage_summary  # noqa: E402
from gpubatch.io.retry import RetryPolicy  # noqa: E402
from gpubatch.io.stage_cache import StageCache  # noqa: E402
from gpubatch.sources.slides.open import open_staged, open_stream  # noqa: E402


def _serve(latencies: list[float], conn: Any) -> None:
    """Child process: moto + one proxy per latency; reports endpoints, then waits to be told to stop."""
    from s3_fixtures import FaultProxy, Faults, start_s3_stack

    stack = start_s3_stack("bench")
    host, port = stack.server.get_host_and_port()
    proxies = {ms: FaultProxy((host, port), Faults(latency_s=ms / 1000)) for ms in latencies}
    conn.send({"endpoint": stack.endpoint, "proxies": {ms: p.url for ms, p in proxies.items()}})
    conn.recv()
    for p in proxies.values():
        p.close()
    stack.close()


def _options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "key": "bench", "secret": "bench-secret",
            "client_kwargs": {"region_name": "us-east-1"}}


def _slides(workdir: Path, n: int, size: int) -> list[Path]:
    from s3_fixtures import CMU_SMALL, write_pyramid_tiff

    out = [write_pyramid_tiff(workdir / f"synthetic{i}.tif", size, size * 3 // 4, seed=i)
           for i in range(n)]
    return out + ([CMU_SMALL] if CMU_SMALL.exists() else [])


def _read_all(backend: Any, readers: int, block: int, clocks: StageClocks) -> tuple[int, int]:
    """Every stored tile of every level through read_boxes, blocks spread over reader threads."""
    jobs = []
    for level, (w, h) in enumerate(backend.info.level_dimensions):
        jobs += [(level, x, y) for y in range(0, h, block) for x in range(0, w, block)]

    def read(job: tuple[int, int, int]) -> None:
        level, x, y = job
        backend.read_boxes(level, np.array([[x, y, block, block]]), clocks)

    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(read, jobs))
    pages = backend.pages
    return sum(len(p.dataoffsets) for p in pages), sum(int(np.sum(p.databytecounts)) for p in pages)


def run_stream(uri: str, options: dict, readers: int, block: int) -> dict[str, Any]:
    clocks = StageClocks()
    t0 = time.perf_counter()
    backend = open_stream(uri, options, clocks)
    opened = time.perf_counter() - t0
    try:
        tiles, nbytes = _read_all(backend, readers, block, clocks)
    finally:
        backend.close()
    return _result(tiles, nbytes, time.perf_counter() - t0, clocks, opened)


def run_stage(uri: str, options: dict, readers: int, block: int, cache_dir: str) -> dict[str, Any]:
    clocks = StageClocks()
    cache = StageCache(cache_dir, 1 << 34)
    t0 = time.perf_counter()
    backend = open_staged(uri, options, clocks, cache=cache)
    opened = time.perf_counter() - t0
    try:
        tiles, nbytes = _read_all(backend, readers, block, clocks)
    finally:
        backend.close()
        cache.clear()
    return _result(tiles, nbytes, time.perf_counter() - t0, clocks, opened)


def run_per_tile(uri: str, options: dict, max_tiles: int) -> dict[str, Any]:
    """The naive reader: one request per stored tile, one after another, each decoded."""
    clocks = StageClocks()
    t0 = time.perf_counter()
    backend = open_stream(uri, options, clocks, RetryPolicy())
    tiles = nbytes = 0
    try:
        for page in backend.pages:  # type: ignore[attr-defined]
            for index, (off, n) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=True)):
                if tiles >= max_tiles:
                    break
                blob = backend.ranges.fetch(int(off), int(off) + int(n))  # type: ignore[attr-defined]
                backend._decode(page, blob, index)  # type: ignore[attr-defined]
                tiles, nbytes = tiles + 1, nbytes + int(n)
    finally:
        backend.close()
    return _result(tiles, nbytes, time.perf_counter() - t0, clocks)


def _result(tiles: int, nbytes: int, seconds: float, clocks: StageClocks,
            open_s: float = 0.0) -> dict[str, Any]:
    s = storage_summary(clocks.counters, seconds)
    return {"tiles": tiles, "tile_bytes": nbytes, "seconds": round(seconds, 3), "open_s": open_s,
            "tiles_per_s": round(tiles / seconds, 1), "mb_per_s": round(nbytes / 1e6 / seconds, 2),
            "requests": s["requests"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
            "retries": s["retries"]}


def _sum(results: list[dict[str, Any]]) -> dict[str, Any]:
    tiles = sum(r["tiles"] for r in results)
    nbytes = sum(r["tile_bytes"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    open_s = sum(r["open_s"] for r in results)
    return {"tiles": tiles, "seconds": round(seconds, 3), "tiles_per_s": round(tiles / seconds, 1),
            "open_s": round(open_s, 3), "read_tiles_per_s": round(tiles / max(seconds - open_s, 1e-9), 1),
            "mb_per_s": round(nbytes / 1e6 / seconds, 2), "requests": sum(r["requests"] for r in results),
            "p50_ms": max(r["p50_ms"] or 0 for r in results), "p99_ms": max(r["p99_ms"] or 0 for r in results)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, nargs="+", default=[0, 20, 80], help="ms added per request")
    ap.add_argument("--readers", type=int, nargs="+", default=[4, 16], help="reader threads (stream, stage)")
    ap.add_argument("--slides", type=int, default=2, help="synthetic slides (plus CMU-1-Small-Region when present)")
    ap.add_argument("--size", type=int, default=6144, help="synthetic slide width, pixels")
    ap.add_argument("--block", type=int, default=2048, help="edge of one read_boxes call, pixels")
    ap.add_argument("--seq-tiles", type=int, default=120, help="tiles per slide for the per-tile reader")
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs per cell")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args.latency, child), daemon=True)
    server.start()
    info = parent.recv()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = _bench(args, info, Path(tmp))
    finally:
        parent.send("stop")
        server.join(10)
    _print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args), "cpus": os.cpu_count()}, indent=2))
    return 0


def _bench(args: argparse.Namespace, info: dict, tmp: Path) -> list[dict[str, Any]]:
    import s3fs

    slides = _slides(tmp, args.slides, args.size)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **_options(info["endpoint"]))
    uris = []
    for path in slides:
        fs.put_file(str(path), f"bench/{path.name}")
        uris.append(f"s3://bench/{path.name}")
    methods: list[tuple[str, int]] = [("stream", r) for r in args.readers]
    methods += [("stage", r) for r in args.readers] + [("per-tile", 1)]
    rows = []
    for ms in args.latency:
        options = _options(info["proxies"][ms])
        for method, readers in methods:
            best = None
            for _ in range(args.repeat if method != "per-tile" else 1):
                res = [_one(method, u, options, readers, args, str(tmp / "stage")) for u in uris]
                total = _sum(res)
                best = total if best is None or total["tiles_per_s"] > best["tiles_per_s"] else best
            assert best is not None
            rows.append({"latency_ms": ms, "method": method, "readers": readers, **best})
            print(f"{ms:>4} ms {method:<8} readers={readers:<3} {best['tiles_per_s']:>8} tiles/s "
                  f"{best['mb_per_s']:>7} MB/s", file=sys.stderr)
    base = {(r["method"], r["readers"]): r["tiles_per_s"] for r in rows if r["latency_ms"] == args.latency[0]}
    for r in rows:
        r["vs_first_latency"] = round(r["tiles_per_s"] / base[(r["method"], r["readers"])], 3)
    return rows


def _one(method: str, uri: str, options: dict, readers: int, args: argparse.Namespace, stage_dir: str) -> dict:
    if method == "stream":
        return run_stream(uri, options, readers, args.block)
    if method == "stage":
        return run_stage(uri, options, readers, args.block, stage_dir)
    return run_per_tile(uri, options, args.seq_tiles)


def _print_table(rows: list[dict[str, Any]]) -> None:
    print("| latency/request | method | readers | tiles | tiles/s | MB/s | vs 0 ms | open s | tiles/s after open "
          "| requests | p50 ms | p99 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['latency_ms']:g} ms | {r['method']} | {r['readers']} | {r['tiles']} | {r['tiles_per_s']} | "
              f"{r['mb_per_s']} | {r['vs_first_latency']:.0%} | {r['open_s']} | {r['read_tiles_per_s']} | "
              f"{r['requests']} | {r['p50_ms']} | {r['p99_ms']} |")


if __name__ == "__main__":
    raise SystemExit(main())
