"""Memory is bounded by configuration, not by input: peak RSS for 2 against 20 slides.

    python bench/bench_memory.py [--counts 2 4 20] [--repeats 3] [--out F]

Each run is a fresh `gpubatch run` process (client + its LocalCluster workers); the whole process
tree's RSS is sampled every 10 ms and the peak of the worker processes and of the tree is kept,
with the worker's peak anonymous RSS (RSS less file-backed pages: what the process allocated, as
opposed to library code it has touched, which is shared and which the kernel may reclaim). The
counts run in alternating order ``--repeats`` times; the table gives medians and the spread.
"""

from __future__ import annotations

import argparse
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
from bench_slides import MEAN, STD, make_workload  # noqa: E402
from common import WORK, machine, save, table  # noqa: E402


def _tree_rss(root: psutil.Process) -> tuple[int, int, int, int]:
    """(RSS of the whole tree, largest RSS of one child, that child's anonymous RSS, the root's
    own RSS: the client's) in bytes."""
    procs = [root] + root.children(recursive=True)
    sizes = []
    for p in procs:
        try:
            info = p.memory_info()
        except psutil.Error:
            continue
        sizes.append((info.rss, info.rss - info.shared))
    largest = max(sizes[1:], default=(0, 0))
    return sum(rss for rss, _ in sizes), largest[0], largest[1], sizes[0][0] if sizes else 0


def peak_rss(cmd: list[str]) -> dict[str, float]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peak = {"tree": 0, "worker": 0, "anon": 0, "client": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                tree, worker, anon, client = _tree_rss(root)
            except psutil.Error:
                break
            peak["tree"], peak["worker"] = max(peak["tree"], tree), max(peak["worker"], worker)
            peak["anon"], peak["client"] = max(peak["anon"], anon), max(peak["client"], client)
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    code = proc.wait()
    done.set()
    t.join()
    if code != 0:
        raise RuntimeError(f"{cmd} exited {code}")
    return {"tree_mb": peak["tree"] / 2**20, "worker_mb": peak["worker"] / 2**20,
            "worker_anon_mb": peak["anon"] / 2**20, "client_mb": peak["client"] / 2**20,
            "seconds": time.perf_counter() - t0}


def job_file(slides: list[Path], model: Path, name: str) -> Path:
    job = {
        "name": name, "kind": "slides", "input": {"uris": [str(p) for p in slides]},
        "tiles": {"size": 224, "mpp": 0.5, "tissue": {"method": "otsu", "min_fraction": 0.5}},
        "model": {"path": str(model), "backend": "onnxruntime", "batch_size": 32, "input": {"mean": MEAN, "std": STD}},
        "output": {"uri": str(WORK / "out-memory" / name), "formats": ["zarr", "parquet"]},
        "run": {"profile": "local", "workers": 1, "readers": 4, "prefetch_batches": 8},
    }
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 4, 20], help="slide counts; the last is the largest")
    ap.add_argument("--size", default="4096x3072")
    ap.add_argument("--repeats", type=int, default=3, help="runs per count, in alternating order")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    wl = make_workload("decode", max(args.counts), (w, h))
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.counts}
    for r in range(args.repeats):
        order = args.counts if r % 2 == 0 else list(reversed(args.counts))
        for n in order:
            path = job_file(wl["slides"][:n], wl["model"], f"mem-{n}")
            peak = peak_rss([sys.executable, "-m", "gpubatch", "run", str(path), "--overwrite"])
            runs[n].append(peak)
            print(f"  round {r + 1}, {n} slides: tree {peak['tree_mb']:.0f} MB, largest worker {peak['worker_mb']:.0f} MB "
                  f"({peak['worker_anon_mb']:.0f} MB anonymous)", flush=True)
    rows = [_summary(n, runs[n]) for n in args.counts]
    for row in rows:
        row["growth to largest"] = f"{rows[-1]['worker_mb'] / row['worker_mb'] - 1:+.1%}"
        row["anon growth"] = f"{rows[-1]['worker_anon_mb'] / row['worker_anon_mb'] - 1:+.1%}"
    print(table(rows, ["slides", "tree_mb", "worker_mb", "worker_range_mb", "worker_anon_mb", "seconds",
                       "growth to largest", "anon growth"]))
    data = {"machine": machine(), "rows": rows, "runs": {str(n): v for n, v in runs.items()},
            "command": "python bench/bench_memory.py " + " ".join(argv or sys.argv[1:])}
    save(args.out, data)
    return data


def _summary(n: int, runs: list[dict[str, float]]) -> dict[str, Any]:
    """Medians over the repeats; the worker's range shows how much one run can differ."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    spread = [r["worker_mb"] for r in runs]
    return {"slides": n, **med, "worker_range_mb": f"{min(spread):.0f}-{max(spread):.0f}"}


if __name__ == "__main__":
    main()
