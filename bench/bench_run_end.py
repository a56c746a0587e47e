"""A run's end: gpubatch's against each of its earlier ways, side by side.

    python bench/bench_run_end.py [--slides 4] [--repeats 5] [--out F]

A run ends (after its last shard) by merging predictions, writing the report and the per-slide
outputs, and handing freed memory back to the system, which includes a full garbage
collection. The contestants, each gpubatch with one part of its end put back as it was:
- the collection walks every object the process tracks, where gpubatch freezes the objects from
  before the run out of it (gpubatch.core.memory.collections_of_this_run);
- each slide's heatmap PNG written with ``optimize`` (zlib's highest level, tried every way),
  and report.html decoding each picture to read its caption, where gpubatch writes zlib's
  default level and reads the caption's text chunks, which come before the pixels.
All run the decode-bound slides job in this one process, alternating, as an analysis script
calling ``gpubatch.run`` does (the process also holds the benchmark's own imports: Dask, pandas,
pyarrow, ONNX Runtime). Reported: the medians of the run's end (its last shard's end to its
``run_finish`` record), its start (the call to its first shard's start) and the whole call.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slides import gpubatch_job, make_workload, run_gpubatch  # noqa: E402
from common import WORK, publish, slides_bench_args  # noqa: E402

GPUBATCH = "gpubatch"
WALKED = "every object walked (before)"
PICTURES = "heatmaps optimized, decoded for their captions (before)"


@contextlib.contextmanager
def _put_back(module: Any, name: str, before: Any) -> Iterator[None]:
    now = getattr(module, name)
    setattr(module, name, before)
    try:
        yield
    finally:
        setattr(module, name, now)


def _png_optimized(image: Any, coloured: Any) -> bytes:
    """The heatmap's PNG as it was written before: ``optimize``."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("gpubatch:colour", coloured.name)
    info.add_text("gpubatch:range", f"{coloured.low:.6g} {coloured.high:.6g}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info, optimize=True)
    return buffer.getvalue()


def _decoding(read_heatmaps: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
    """report.html's pictures read as they were before: each decoded for its text chunks."""
    from PIL import Image

    opened = Image.open

    def decoded(*args: Any, **kwargs: Any) -> Any:
        image = opened(*args, **kwargs)
        image.load()
        return image

    def read(store: Any, report: dict[str, Any]) -> list[Any]:
        with _put_back(Image, "open", decoded):
            return read_heatmaps(store, report)
    return read


@contextlib.contextmanager
def _contestant(name: str) -> Iterator[None]:
    from gpubatch.outputs import heatmaps
    from gpubatch.report import html
    from gpubatch.runtime import runner

    if name == WALKED:
        with _put_back(runner, "collections_of_this_run", contextlib.nullcontext):
            yield
    elif name == PICTURES:
        with _put_back(heatmaps, "png", _png_optimized), _put_back(html, "read_heatmaps", _decoding(html.read_heatmaps)):
            yield
    else:
        yield


def _phases(out: Path, called: float, returned: float) -> dict[str, float]:
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    shards = [r for r in records if r["event"] == "shard_committed"]
    finish = next(r["time"] for r in records if r["event"] == "run_finish")
    last_end = max(r["end"] for r in shards)
    return {"end": finish - last_end, "start": min(r["start"] for r in shards) - called, "call": returned - called}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, (w, h) = slides_bench_args(__doc__, argv, slides=4, repeats=5)
    wl = make_workload("decode", args.slides, (w, h))
    out = WORK / "out-run-end"
    job = gpubatch_job(224, 0.5, wl["slides"], wl["model"], out, 32)
    last: dict[str, Any] = {}
    run_gpubatch(job, last)  # untimed: the process's first run pays its imports
    names = [GPUBATCH, WALKED, PICTURES]
    seen: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            with _contestant(name):
                called = time.time()
                run_gpubatch(job, last)
                seen[name].append(_phases(out, called, time.time()))
            print(f"  round {r + 1}, {name}: end {seen[name][-1]['end']:.3f} s", flush=True)
    rows = []
    ours = statistics.median(p["end"] for p in seen[GPUBATCH])
    for name in names:
        med = {k: statistics.median(p[k] for p in seen[name]) for k in ("end", "start", "call")}
        rows.append({"contestant": name, "runs": len(seen[name]), "median end s": med["end"],
                     "median start s": med["start"], "median call s": med["call"], "end x gpubatch's": med["end"] / ours})
    return publish("bench_run_end.py", rows, list(rows[0]), args.out, argv)


if __name__ == "__main__":
    main()
