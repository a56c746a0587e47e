"""A run's end: the collector walking only what the run made against everything, side by side.

    python bench/bench_run_end.py [--slides 4] [--repeats 5] [--out F]

A run ends (after its last shard) by merging predictions, writing the report and the per-slide
outputs, and handing freed memory back to the system, which includes a full garbage
collection. That collection walks every object the process tracks; gpubatch freezes the objects
from before the run out of it (gpubatch.core.memory.collections_of_this_run). The other
contestant runs the same job with nothing frozen. Both run the decode-bound slides job in this
one process, alternating, as an analysis script calling ``gpubatch.run`` does (the process also
holds the benchmark's own imports: Dask, pandas, pyarrow, ONNX Runtime). Reported: the medians
of the run's end (its last shard's end to its ``run_finish`` record), its start (the call to
its first shard's start) and the whole call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slides import gpubatch_job, make_workload, run_gpubatch  # noqa: E402
from common import WORK, publish  # noqa: E402

FROZEN, WALKED = "objects from before the run frozen (gpubatch)", "every object walked (before)"


@contextlib.contextmanager
def _contestant(name: str) -> Iterator[None]:
    from gpubatch.runtime import runner

    if name == FROZEN:
        yield
        return
    frozen = runner.collections_of_this_run
    runner.collections_of_this_run = contextlib.nullcontext  # type: ignore[assignment]
    try:
        yield
    finally:
        runner.collections_of_this_run = frozen  # type: ignore[assignment]


def _phases(out: Path, called: float, returned: float) -> dict[str, float]:
    records = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    shards = [r for r in records if r["event"] == "shard_committed"]
    finish = next(r["time"] for r in records if r["event"] == "run_finish")
    last_end = max(r["end"] for r in shards)
    return {"end": finish - last_end, "start": min(r["start"] for r in shards) - called, "call": returned - called}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", default="8192x8192")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    wl = make_workload("decode", args.slides, (w, h))
    out = WORK / "out-run-end"
    job = gpubatch_job(224, 0.5, wl["slides"], wl["model"], out, 32)
    last: dict[str, Any] = {}
    run_gpubatch(job, last)  # untimed: the process's first run pays its imports
    names = [FROZEN, WALKED]
    seen: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names[r % 2:] + names[: r % 2]:
            with _contestant(name):
                called = time.time()
                run_gpubatch(job, last)
                seen[name].append(_phases(out, called, time.time()))
            print(f"  round {r + 1}, {name}: end {seen[name][-1]['end']:.3f} s", flush=True)
    rows = []
    for i, name in enumerate(names):
        med = {k: statistics.median(p[k] for p in seen[name]) for k in ("end", "start", "call")}
        other = statistics.median(p["end"] for p in seen[names[1 - i]])
        rows.append({"contestant": name, "runs": len(seen[name]), "median end s": med["end"],
                     "median start s": med["start"], "median call s": med["call"], "end x the other": med["end"] / other})
    return publish("bench_run_end.py", rows, list(rows[0]), args.out, argv)


if __name__ == "__main__":
    main()
