"""Slides from object storage: gpubatch stream and stage at 0, 20 and 80 ms added per request,
against the same job on local files, side by side in one run.

    python bench/bench_slides_remote.py [--latency 0 20 80] [--slides 4] [--out F]

Storage is bench/rangeserver.py (HTTP GET with Range, the protocol S3 and GCS speak) in its own
process on loopback, adding the latency to every request; gpubatch reads it through fsspec's
http filesystem. (The test suite uses moto for S3 semantics; moto copies a whole object per range
request, which makes it useless for timing range reads of 100 MB slides.) The server shares the
2 cores with gpubatch, so its CPU per request is part of what is measured; the table gives the
server's share of the machine's CPU during each run (a real object store spends none of it on
the workers' cores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_slides import gpubatch_job, make_workload, run_gpubatch  # noqa: E402
from common import WORK, machine, save, table  # noqa: E402

CORES = os.cpu_count() or 1


def start_server(root: Path, latency_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(HERE / "rangeserver.py"), str(root), "--latency-ms", str(latency_ms)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, nargs="+", default=[0, 20, 80], help="ms added per request")
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", default="24576x16384")
    ap.add_argument("--readers", type=int, default=4, help="reader threads per shard for remote runs (the job default)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    wl = make_workload("decode", args.slides, (w, h))
    out = WORK / "out-remote"
    last: dict[str, Any] = {}
    local_job = gpubatch_job(224, 0.5, wl["slides"], wl["model"], out / "local", 32)
    local_rates: list[float] = []
    run_gpubatch(local_job, last)  # untimed: the process's first run pays its imports
    rows: list[dict[str, Any]] = []
    for latency in args.latency:
        # The local baseline runs again beside each latency, so that "% of local" compares runs
        # made minutes apart on this shared machine, not one early run against all.
        local_items = run_gpubatch(local_job, last)
        local_rate = local_items / last["report"]["wall_s"]
        local_rates.append(local_rate)
        rows.append({"source": "local files", "access": "local", "latency ms": latency, "items": local_items,
                     "items/s": local_rate, "% of local": 100.0, "starvation": last["report"]["starvation"]})
        proc, base = start_server(wl["slides"][0].parent, latency)
        try:
            uris = [f"{base}/{p.name}" for p in wl["slides"]]
            for access in ("stream", "stage"):
                job = gpubatch_job(224, 0.5, wl["slides"], wl["model"], out / f"{access}-{latency:g}", 32,
                                   uris=uris, readers=args.readers, access=access)
                server = psutil.Process(proc.pid)
                cpu0 = sum(server.cpu_times()[:2])
                items = run_gpubatch(job, last)
                server_cpu = sum(server.cpu_times()[:2]) - cpu0
                rate = items / last["report"]["wall_s"]
                storage = last["report"].get("storage", {})
                rows.append({"source": "http range server", "access": access, "latency ms": latency,
                             "items": items, "items/s": rate, "% of local": 100 * rate / local_rate,
                             "starvation": last["report"]["starvation"], "requests": storage.get("requests"),
                             "p99 ms": storage.get("p99_ms"),
                             "server cpu % of run": 100 * server_cpu / (last["report"]["wall_s"] * CORES)})
                print(f"  {access} at {latency:g} ms: {rate:.0f} items/s ({100 * rate / local_rate:.0f}% of local)", flush=True)
        finally:
            proc.kill()
            proc.wait()
    columns = ["source", "access", "latency ms", "items", "items/s", "% of local", "starvation", "requests", "p99 ms",
               "server cpu % of run"]
    md = table(rows, columns)
    print(md)
    data = {"machine": machine(), "rows": rows, "markdown": md,
            "command": "python bench/bench_slides_remote.py " + " ".join(argv or sys.argv[1:])}
    save(args.out, data)
    return data


if __name__ == "__main__":
    main()
