"""The client: its memory against the number of shards, and what a SLURM run costs against local.

    python bench/bench_client.py --workload memory [--shards 100 1000 10000 100000] [--out F]
    python bench/bench_client.py --workload slurm [--repeats 3] [--out F]

``memory``: a genome windows job with one tiny window per shard (so the shard count is what
varies), run by `gpubatch run` with the local profile and one worker; the client process's RSS
is sampled every 20 ms (its workers are separate processes and not counted). The client plans
lazily, keeps a bounded window of tasks in flight and folds results as they arrive, so its peak
should not grow with the number of shards.

``slurm``: one slides job run with the `local` profile and with a `slurm` profile on the
single-node SLURM of .ci/slurm-up.sh (same worker count), in alternating order: wall time,
items/s and the time to the first committed shard (what the batch scheduler adds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, machine, save, table  # noqa: E402

WINDOW = 32


def _genome_job(shards: int) -> Path:
    from gpubatch.cli.demo import write_synthetic_genome
    from gpubatch.cli.demo_models import make_genome_model

    d = WORK / "client"
    d.mkdir(parents=True, exist_ok=True)
    fasta = d / f"genome-{shards}.fa"
    if not fasta.exists():
        write_synthetic_genome(fasta, {"chr1": shards * WINDOW}, seed=5)
    model = d / "model.onnx"
    if not model.exists():
        make_genome_model(model, WINDOW)
    job = {"name": f"client-{shards}", "kind": "genome",
           "windows": {"reference": str(fasta), "regions": "genome", "length": WINDOW, "windows_per_shard": 1},
           "model": {"path": str(model), "backend": "onnxruntime", "batch_size": 1},
           "output": {"uri": str(d / f"out-{shards}"), "formats": ["parquet"]},
           "run": {"profile": "local", "workers": 1, "readers": 1, "prefetch_batches": 1}}
    path = d / f"job-{shards}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _peak_rss(cmd: list[str]) -> tuple[float, float, int]:
    """(peak client RSS in MB, seconds, exit code) of a command, sampled every 20 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, peak = psutil.Process(proc.pid), [0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], client.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    code = proc.wait()
    watcher.join()
    return peak[0] / 2**20, time.perf_counter() - t0, code


def bench_memory(counts: list[int]) -> dict[str, Any]:
    rows = []
    for n in counts:
        job = _genome_job(n)
        mb, seconds, code = _peak_rss([sys.executable, "-m", "gpubatch", "run", str(job), "--overwrite"])
        if code != 0:
            raise SystemExit(f"the {n}-shard run failed with exit code {code}")
        rows.append({"shards": n, "client peak MB": mb, "seconds": seconds, "shards/s": n / seconds})
        print(f"  {n} shards: client peak {mb:.0f} MB in {seconds:.0f} s", flush=True)
    base = rows[0]["client peak MB"]
    for r in rows:
        r["growth"] = f"{r['client peak MB'] / base - 1:+.1%}"
    return {"rows": rows, "markdown": table(rows, ["shards", "client peak MB", "growth", "seconds", "shards/s"])
            + "\n\nPeak RSS of the client process (planning, submission, folding results, the final "
              "merge), workers excluded; one tiny window per shard, the local profile with one worker."}


def _slides_job(profile: str) -> Path:
    from bench_slides import make_workload

    workload = make_workload("decode", 4, (4096, 3072))
    slides, model = workload["slides"], workload["model"]
    d = WORK / "client" / f"slurm-{Path(profile).stem}"
    d.mkdir(parents=True, exist_ok=True)
    job = {"name": "slurm-vs-local", "kind": "slides", "input": {"uris": [str(s) for s in slides]},
           "tiles": {"size": 224, "level": 0, "tissue": {"method": "none"}},
           "model": {"path": str(model), "backend": "onnxruntime", "batch_size": 64},
           "output": {"uri": str(d / "out"), "formats": ["parquet"]},
           "run": {"profile": profile, "workers": 1}}
    path = d / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _slurm_profile() -> Path:
    path = WORK / "client" / "slurm-bench.yaml"
    settings = {"queue": "debug", "cores": 2, "processes": 1, "memory": "4GB", "walltime": "01:00:00",
                "interface": "lo", "scheduler_options": {"dashboard_address": "127.0.0.1:0"},
                "worker_extra_args": ["--dashboard-address", "127.0.0.1:0", "--nthreads", "2"]}
    path.write_text(yaml.safe_dump({"cluster": "slurm", "workers": 1, "threads_per_worker": 2, "slurm": settings}))
    return path


def bench_slurm(repeats: int) -> dict[str, Any]:
    if shutil.which("sinfo") is None:
        raise SystemExit("SLURM is not running here: bash .ci/slurm-up.sh first")
    profiles = {"local": "local", "slurm": str(_slurm_profile())}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in profiles}
    for r in range(repeats):
        for name in list(profiles)[r % 2:] + list(profiles)[: r % 2]:
            job = _slides_job(profiles[name])
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gpubatch", "run", str(job), "--overwrite"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            out = job.parent / "out"
            report = json.loads((out / "report.json").read_text())
            audit = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
            start = next(x["time"] for x in audit if x["event"] == "run_start")
            first = min(x["end"] for x in audit if x["event"] == "shard_committed")
            runs[name].append({"wall": wall, "items": report["items"], "first": first - start})
            print(f"  round {r + 1} {name}: {wall:.1f} s", flush=True)
    rows = []
    for name, rs in runs.items():
        wall = statistics.median(x["wall"] for x in rs)
        rows.append({"profile": name, "median s": wall, "items/s": rs[0]["items"] / wall,
                     "to first commit s": statistics.median(x["first"] for x in rs)})
    local = rows[0]["median s"]
    for r in rows:
        r["vs local"] = f"{r['median s'] / local:.2f}x"
    return {"rows": rows, "markdown": table(rows, ["profile", "median s", "items/s", "to first commit s", "vs local"])
            + "\n\nThe same 4-slide job (one worker, two threads) through the `local` profile and "
              "through dask-jobqueue on the single-node SLURM of .ci/slurm-up.sh, alternating."}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["memory", "slurm"], required=True)
    ap.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    data = bench_memory(args.shards) if args.workload == "memory" else bench_slurm(args.repeats)
    data["machine"] = machine()
    data["command"] = "python bench/bench_client.py " + " ".join(argv if argv is not None else sys.argv[1:])
    save(args.out, data)
    print(data["markdown"])


if __name__ == "__main__":
    main()
