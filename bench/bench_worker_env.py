"""The workers' malloc settings, side by side: the genome bench's gpubatch job in fresh processes,
with gpubatch's worker environment against the same with one setting put back.

    python bench/bench_worker_env.py [--bases 100000000] [--repeats 3] [--out F]

A worker process reads its malloc settings once, at start (it forks from a forkserver that read
them at its own start), so each run is a new ``python`` process; the contestants alternate.
gpubatch's WORKER_ENV only adds what the environment does not set, so the environment is where
a setting is tried: here ``MALLOC_MMAP_THRESHOLD_`` at 4 MiB, which keeps blocks up to that size
on the heap (WORKER_ENV's trim threshold stops glibc from raising its 128 KiB threshold itself,
so each larger block is a fresh mapping, faulted in and zeroed on every use). Reported per
contestant: windows/s over the whole run and over its shards, and the page faults of the run's
whole process tree (client, forkserver, workers), counted by ``perf stat`` where perf is
installed (``getrusage`` would miss the workers: the forkserver, not the run, reaps them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_genome import make_genome, make_model  # noqa: E402
from common import WORK, machine, save, steady_seconds, table  # noqa: E402

CONTESTANTS = {
    "gpubatch's worker environment": {},
    "with blocks up to 4 MiB kept on the heap": {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)},
}

_RUN_ONCE = """
import sys
import gpubatch
from gpubatch.spec import parse_job
fasta, model, out = sys.argv[1:4]
job = parse_job({"name": "bench-worker-env", "kind": "genome",
                 "windows": {"reference": fasta, "regions": "genome", "length": 1000, "stride": 1000,
                             "windows_per_shard": 4000},
                 "model": {"path": model, "backend": "onnxruntime", "batch_size": 64},
                 "output": {"uri": out, "formats": ["parquet"]},
                 "run": {"profile": "local", "readers": 2}})
if __name__ == "__main__":
    print(gpubatch.run(job, show_progress=False, overwrite=True).report["items"])
"""


def run_once(env: dict[str, str], fasta: Path, model: Path, out: Path) -> dict[str, float]:
    """One run in a fresh process tree: items, wall seconds, shards-only seconds, page faults."""
    script, counts = WORK / "worker_env_run.py", WORK / "worker_env_faults.csv"
    script.write_text(_RUN_ONCE)
    counts.unlink(missing_ok=True)
    perf = ["perf", "stat", "-e", "page-faults", "-x,", "-o", str(counts), "--"] if shutil.which("perf") else []
    t0 = time.perf_counter()
    done = subprocess.run([*perf, sys.executable, str(script), str(fasta), str(model), str(out)],
                          env={**os.environ, **env}, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    lines = counts.read_text().splitlines() if counts.exists() else []
    faults = next((float(line.split(",")[0]) for line in lines if "page-faults" in line), float("nan"))
    return {"items": int(done.stdout.split()[-1]), "wall": wall, "steady": steady_seconds(out),
            "faults": faults}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bases", type=int, default=100_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    fasta, model, out = make_genome(args.bases), make_model(1000), WORK / "out-worker-env"
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in CONTESTANTS}
    names = list(CONTESTANTS)
    for r in range(args.repeats):
        for name in names[r % 2:] + names[: r % 2]:
            got = run_once(CONTESTANTS[name], fasta, model, out)
            print(f"  round {r + 1} {name}: {got['items']} windows, {got['wall']:.2f} s, "
                  f"shards {got['steady']:.2f} s, {got['faults']:.0f} page faults", flush=True)
            runs[name].append(got)
    rows = []
    for name, got in runs.items():
        items = got[0]["items"]
        rows.append({"worker environment": name, "windows": items,
                     "windows/s": items / statistics.median(g["wall"] for g in got),
                     "shards windows/s": items / statistics.median(g["steady"] for g in got),
                     "page faults": statistics.median(g["faults"] for g in got)})
    md = table(rows, ["worker environment", "windows", "windows/s", "shards windows/s", "page faults"])
    print(md)
    data = {"machine": machine(), "rows": rows, "markdown": md, "runs": runs,
            "command": "python bench/bench_worker_env.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    save(args.out, data)
    return data


if __name__ == "__main__":
    main()
