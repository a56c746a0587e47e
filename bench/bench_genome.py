"""Genome windows: gpubatch against a pysam + torch DataLoader baseline, same model and windows.

    python bench/bench_genome.py [--length 1000] [--stride L] [--bases 20000000] [--repeats 3] [--out F]

The baseline is the usual script: a Dataset whose __getitem__ fetches one window with
pysam.FastaFile.fetch and one-hot encodes it in numpy, DataLoader(num_workers=2), ONNX Runtime
in the main process. "plain pysam loop" is the same work in one loop in one process; "model only"
is ONNX Runtime alone on ready one-hot batches with as many intra-op threads as the machine has
cores (gpubatch's worker processes together use that many), the ceiling of the whole pipeline. gpubatch reads long stretches in one call, slices windows, one-hot encodes
on the device stage and overlaps it all. ``--stride`` (default: the length) below the length
makes overlapping windows, as issue 17's workload does (1 kb at stride 10 over 1 Mb: 100,000).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, alternate, machine, save, shards_only_row, steady_seconds, table  # noqa: E402

CORES = os.cpu_count() or 1


def make_genome(bases: int) -> Path:
    from gpubatch.cli.demo import write_synthetic_genome

    path = WORK / f"genome-{bases}.fa"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        write_synthetic_genome(path, {"chr1": bases // 2, "chr2": bases - bases // 2}, seed=3)
    return path


def make_model(length: int) -> Path:
    from gpubatch.cli.demo_models import make_genome_model

    path = WORK / f"genome-model-{length}.onnx"
    if not path.exists():
        make_genome_model(path, length)
    return path


def windows(fasta: Path, length: int, stride: int = 0) -> list[tuple[str, int]]:
    lengths = {line.split("\t")[0]: int(line.split("\t")[1]) for line in Path(str(fasta) + ".fai").read_text().splitlines()}
    return [(c, s) for c, n in lengths.items() for s in range(0, n - length + 1, stride or length)]


class WindowDataset:
    """Fetch one window per item with pysam and one-hot it in numpy: the common baseline."""

    table = np.zeros((256, 4), np.float32)
    for i, b in enumerate(b"ACGT"):
        table[b, i] = 1.0
        table[ord(chr(b).lower()), i] = 1.0

    def __init__(self, fasta: Path, items: list[tuple[str, int]], length: int):
        self.fasta, self.items, self.length = str(fasta), items, length
        self.handle: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> Any:
        import pysam

        if self.handle is None:
            self.handle = pysam.FastaFile(self.fasta)
        chrom, start = self.items[k]
        seq = self.handle.fetch(chrom, start, start + self.length).encode()
        return self.table[np.frombuffer(seq, np.uint8)]


def run_baseline(fasta: Path, model: Path, length: int, batch: int, out: Path, stride: int = 0) -> int:
    import onnxruntime as ort
    import pandas as pd
    from torch.utils.data import DataLoader

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    ds = WindowDataset(fasta, windows(fasta, length, stride), length)
    loader = DataLoader(ds, batch_size=batch, num_workers=2)
    preds = np.concatenate([sess.run(None, {name: b.numpy()})[0] for b in loader])
    pd.DataFrame(preds).to_parquet(out / "baseline.parquet")
    return len(preds)


def run_plain_loop(fasta: Path, model: Path, length: int, batch: int, out: Path, stride: int = 0) -> int:
    """The plainest script: one process, pysam fetch -> one-hot -> ONNX Runtime per batch."""
    import onnxruntime as ort
    import pandas as pd
    import pysam

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    handle, items, table = pysam.FastaFile(str(fasta)), windows(fasta, length, stride), WindowDataset.table
    preds = []
    for i in range(0, len(items), batch):
        x = np.stack([table[np.frombuffer(handle.fetch(c, st, st + length).encode(), np.uint8)]
                      for c, st in items[i : i + batch]])
        preds.append(sess.run(None, {name: x})[0])
    pd.DataFrame(np.concatenate(preds)).to_parquet(out / "plain.parquet")
    return sum(len(p) for p in preds)


def run_model_only(fasta: Path, model: Path, length: int, batch: int, threads: int, stride: int = 0) -> int:
    """ONNX Runtime alone, ``threads`` intra-op threads, on as many batches as the windows make
    (16 distinct one-hot batches, made beforehand, reused): the model's speed with no data path."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    batches = [np.eye(4, dtype=np.float32)[rng.integers(0, 4, (batch, length))] for _ in range(16)]
    n = len(windows(fasta, length, stride))
    for i in range(0, n, batch):
        sess.run(None, {name: batches[(i // batch) % 16][: n - i]})
    return n


def run_gpubatch(fasta: Path, model: Path, length: int, batch: int, out: Path, last: dict[str, Any],
                 stride: int = 0) -> int:
    import gpubatch
    from gpubatch.spec import parse_job

    job = parse_job({
        "name": "bench-genome", "kind": "genome",
        "windows": {"reference": str(fasta), "regions": "genome", "length": length, "stride": stride or length,
                    "windows_per_shard": max(64, 4_000_000 // length)},
        "model": {"path": str(model), "backend": "onnxruntime", "batch_size": batch},
        "output": {"uri": str(out / "gpubatch"), "formats": ["parquet"]},
        "run": {"profile": "local", "readers": 2},
    })
    result = gpubatch.run(job, show_progress=False, overwrite=True)
    last["report"] = result.report
    last.setdefault("steady_s", []).append(steady_seconds(Path(result.output_uri)))
    return int(result.report["items"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--stride", type=int, default=0, help="default: the window length (no overlap)")
    ap.add_argument("--bases", type=int, default=20_000_000)
    ap.add_argument("--batch", type=int, default=0, help="default: 64 for 1 kb, fewer for longer windows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of every contestant first")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    args.batch = args.batch or max(4, 64_000 // args.length)  # about 1 MB of codes per batch
    fasta, model = make_genome(args.bases), make_model(args.length)
    out = WORK / "out-genome"
    out.mkdir(parents=True, exist_ok=True)
    last: dict[str, Any] = {}
    results = alternate({
        "gpubatch": lambda: run_gpubatch(fasta, model, args.length, args.batch, out, last, args.stride),
        "pysam+DataLoader": lambda: run_baseline(fasta, model, args.length, args.batch, out, args.stride),
        "plain pysam loop": lambda: run_plain_loop(fasta, model, args.length, args.batch, out, args.stride),
        f"model only ({CORES} threads)": lambda: run_model_only(fasta, model, args.length, args.batch, CORES,
                                                                args.stride),
    }, args.repeats, args.warmup)
    last["steady_s"] = last["steady_s"][args.warmup:]  # the timed rounds' only
    g = results["gpubatch"]
    rows = [{"contestant": m.name, "windows": m.items, "median s": m.median_s, "windows/s": m.items_per_s,
             "gpubatch x": g.items_per_s / m.items_per_s} for m in results.values()]
    rows.insert(1, shards_only_row(g, last["steady_s"], "windows", "windows/s"))
    print(table(rows, ["contestant", "windows", "median s", "windows/s", "gpubatch x"]))
    data = {"length": args.length, "machine": machine(), "rows": rows,
            "starvation": last["report"]["starvation"], "verdict": last["report"]["verdict"]["text"],
            "model_only": last["report"].get("model_only_items_per_s"),
            "command": "python bench/bench_genome.py " + " ".join(argv or sys.argv[1:])}
    save(args.out, data)
    return data


if __name__ == "__main__":
    main()
