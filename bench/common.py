"""Shared pieces of the benchmarks: workloads, timing, the bound, markdown tables.

Every contestant sees the same slides, the same tile list and the same ONNX model, and runs in
the same process tree in alternating order, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "_work"


@dataclass
class Measurement:
    name: str
    items: int
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def items_per_s(self) -> float:
        return self.items / self.median_s


def machine() -> dict[str, Any]:
    import onnxruntime

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "date": time.strftime("%Y-%m-%d")}


def alternate(contestants: dict[str, Callable[[], int]], repeats: int, warmup: int = 0) -> dict[str, Measurement]:
    """Run each contestant ``repeats`` times, rotating the order every round, after ``warmup``
    untimed rounds of each (a process's first run of anything pays its imports and first-use
    set-up, which is not what the rounds compare)."""
    names = list(contestants)
    for r in range(warmup):
        for name in names:
            t0 = time.perf_counter()
            contestants[name]()
            print(f"  warm-up {r + 1} {name}: {time.perf_counter() - t0:.2f} s (untimed)", flush=True)
    results = {n: Measurement(n, 0) for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            items = contestants[name]()
            results[name].seconds.append(time.perf_counter() - t0)
            results[name].items = items
            print(f"  round {r + 1} {name}: {items} items in {results[name].seconds[-1]:.2f} s", flush=True)
    return results


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def publish(script: str, rows: list[dict[str, Any]], columns: list[str], out: str | None,
            argv: list[str] | None, **extra: Any) -> dict[str, Any]:
    """A bench's last step: its table printed, and saved to ``out`` with the machine, the rows,
    ``extra`` and the command that made it (``python bench/<script> <argv>``)."""
    md = table(rows, columns)
    print(md)
    args = argv if argv is not None else sys.argv[1:]
    data = {"machine": machine(), "rows": rows, "markdown": md, **extra,
            "command": f"python bench/{script} " + " ".join(args)}
    save(out, data)
    return data


def save(out: str | None, data: dict[str, Any]) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))


def cpu_seconds(fn: Callable[[], Any]) -> float:
    """Process CPU time (all threads) spent in fn: the work, whatever the parallelism."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def steady_seconds(outdir: Path) -> float:
    """First shard start to last shard end of a gpubatch run: the run less its fixed costs
    (cluster start-up, model preparation before, report merging after)."""
    lines = [json.loads(line) for line in (outdir / "audit.jsonl").read_text().splitlines() if line]
    shards = [x for x in lines if x.get("event") == "shard_committed"]
    return float(max(x["end"] for x in shards) - min(x["start"] for x in shards))


def shards_only_row(g: Measurement, steady: list[float], count: str, rate: str) -> dict[str, Any]:
    """The "gpubatch, shards only" table row: the same runs, timed over their shards only, which
    is what a long run approaches once its fixed costs are spread over hours."""
    seconds = statistics.median(steady)
    return {"contestant": "gpubatch, shards only", count: g.items, "median s": seconds,
            rate: g.items / seconds, "gpubatch x": ""}


def slides_bench_args(doc: str | None, argv: list[str] | None, slides: int,
                      repeats: int) -> tuple[argparse.Namespace, tuple[int, int]]:
    """The command line of a bench over synthetic slides: --slides, --size WxH, --repeats, --out;
    the parsed arguments and the size as (width, height)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=slides)
    ap.add_argument("--size", default="8192x8192")
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    return args, (w, h)


class PeakRss:
    """This process's peak RSS while the block runs, sampled every 5 ms on a thread (psutil):
    ``base`` at entry, ``peak`` after; the memory benches' one sampler."""

    def __enter__(self) -> PeakRss:
        import threading

        import psutil

        self._me = psutil.Process()
        self.base = self.peak = self._me.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._me.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._me.memory_info().rss)

