"""The workers' malloc settings, side by side: a gpubatch job in fresh processes, with gpubatch's
worker environment against the same with one setting put back.

    python bench/bench_worker_env.py [--workload slides|genome] [--repeats 5] [--out F]

A worker process reads its malloc settings once, at start (it forks from a forkserver that read
them at its own start), so each run is a new ``python`` process; the contestants alternate.
gpubatch's WORKER_ENV only adds what the environment does not set, so the environment is where
a setting is tried. The setting here is ``MALLOC_MMAP_THRESHOLD_``: WORKER_ENV's trim threshold
stops glibc from raising its 128 KiB mmap threshold itself, so without it every larger block (a
decoded tile, a read unit's tiles, a megabase read) is a fresh mapping, faulted in and zeroed on
every use; WORKER_ENV keeps blocks up to 4 MiB on the heap, and the other contestant puts glibc's
128 KiB back. Reported per contestant: items/s over the whole run and over its shards, the CPU
time and the page faults of the run's whole process tree (client, forkserver, workers), counted
by ``perf stat`` where perf is installed (``getrusage`` would miss the workers: the forkserver,
not the run, reaps them).

Workloads: ``slides``, the decode-bound slides job of bench/bench_slides.py (16 synthetic slides
of 8192 x 8192 px); ``genome``, 1 kb windows over a synthetic genome (bench/bench_genome.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, publish, steady_seconds  # noqa: E402

CONTESTANTS = {
    "gpubatch's worker environment (blocks up to 4 MiB on the heap)": {},
    "glibc's 128 KiB mmap threshold put back": {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)},
}

_RUN_ONCE = """
import json, sys
import gpubatch
from gpubatch.spec import parse_job
if __name__ == "__main__":
    job = parse_job(json.loads(open(sys.argv[1]).read()))
    print(gpubatch.run(job, show_progress=False, overwrite=True).report["items"])
"""


def make_job(workload: str, bases: int, out: Path) -> dict[str, Any]:
    """The job each run does: the slides or genome bench's own gpubatch job."""
    if workload == "slides":
        from bench_slides import gpubatch_job, make_workload

        wl = make_workload("decode", 16, (8192, 8192))
        return gpubatch_job(224, 0.5, wl["slides"], wl["model"], out, 32)
    from bench_genome import make_genome, make_model

    return {"name": "bench-worker-env", "kind": "genome",
            "windows": {"reference": str(make_genome(bases)), "regions": "genome", "length": 1000,
                        "stride": 1000, "windows_per_shard": 4000},
            "model": {"path": str(make_model(1000)), "backend": "onnxruntime", "batch_size": 64},
            "output": {"uri": str(out), "formats": ["parquet"]},
            "run": {"profile": "local", "readers": 2}}


def run_once(env: dict[str, str], job: Path, out: Path) -> dict[str, float]:
    """One run in a fresh process tree: items, wall seconds, shards-only seconds, CPU, page faults."""
    script, counts = WORK / "worker_env_run.py", WORK / "worker_env_perf.csv"
    script.write_text(_RUN_ONCE)
    counts.unlink(missing_ok=True)
    perf = (["perf", "stat", "-e", "page-faults,task-clock", "-x,", "-o", str(counts), "--"]
            if shutil.which("perf") else [])
    t0 = time.perf_counter()
    done = subprocess.run([*perf, sys.executable, str(script), str(job)],
                          env={**os.environ, **env}, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    lines = counts.read_text().splitlines() if counts.exists() else []

    def counted(event: str) -> float:
        return next((float(line.split(",")[0]) for line in lines if event in line), float("nan"))

    return {"items": int(done.stdout.split()[-1]), "wall": wall, "steady": steady_seconds(out),
            "faults": counted("page-faults"), "cpu_s": counted("task-clock") / 1000}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["slides", "genome"], default="slides")
    ap.add_argument("--bases", type=int, default=100_000_000, help="genome size (genome workload)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    out = WORK / f"out-worker-env-{args.workload}"
    job = WORK / f"worker_env_{args.workload}.json"
    job.write_text(json.dumps(make_job(args.workload, args.bases, out)))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONTESTANTS}
    names = list(CONTESTANTS)
    for r in range(args.repeats):
        for name in names[r % 2:] + names[: r % 2]:
            got = run_once(CONTESTANTS[name], job, out)
            print(f"  round {r + 1} {name}: {got['items']} items, {got['wall']:.2f} s, shards "
                  f"{got['steady']:.2f} s, CPU {got['cpu_s']:.2f} s, {got['faults']:.0f} page faults", flush=True)
            runs[name].append(got)
    rows = []
    for name, got in runs.items():
        items = got[0]["items"]
        rows.append({"worker environment": name, "items": items,
                     "items/s": items / statistics.median(g["wall"] for g in got),
                     "shards items/s": items / statistics.median(g["steady"] for g in got),
                     "CPU ms/item": 1000 * statistics.median(g["cpu_s"] for g in got) / items,
                     "page faults": statistics.median(g["faults"] for g in got)})
    return publish("bench_worker_env.py", rows, ["worker environment", "items", "items/s", "shards items/s",
                                                 "CPU ms/item", "page faults"], args.out, argv,
                   runs=runs, workload=args.workload)


if __name__ == "__main__":
    main()
