"""gpubatch's parquet writer against pyarrow's default dictionary encoding, side by side.

    python bench/bench_parquet.py [--rows 100000] [--repeats 7] [--out F]

Every shard's part and the merged predictions.parquet go through
``gpubatch.outputs.writer.parquet_writer``: zstd, with dictionary pages for text and flag
columns only. The other contestant is the writer as it was, zstd with pyarrow's default of a
dictionary for every column. The tables are shaped like the two workloads' outputs: genome
windows (chrom, start, end, strand and three class scores, 1 kb windows at stride 10, as issue
17's genome job writes) and slide tiles (slide, x, y, level and two class probabilities over
six slides). Scores are softmaxes of normal logits, as a classifier's are. Reported per table
and contestant: the median CPU time of writing the table to memory and of reading it back,
over alternating rounds, and the file's size; both files read back equal to the table.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

GPUBATCH, BEFORE = "gpubatch (dictionary for text only)", "every column a dictionary (before)"


def _scores(rng: np.random.Generator, rows: int, classes: int, prefix: str) -> dict[str, np.ndarray]:
    logits = rng.normal(size=(rows, classes))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return {f"{prefix}_{i}": p[:, i].astype(np.float32) for i in range(classes)}


def genome_table(rows: int) -> pa.Table:
    start = np.arange(rows, dtype=np.int64) * 10
    return pa.table({"chrom": pa.array(["chr1"] * rows), "start": start, "end": start + 1000,
                     "strand": pa.array(["+"] * rows), **_scores(np.random.default_rng(0), rows, 3, "scores")})


def slides_table(rows: int) -> pa.Table:
    per_slide, side = -(-rows // 6), 200
    i = np.arange(rows)
    return pa.table({"slide": pa.array([f"/data/cohort/slide-{k // per_slide:02d}.svs" for k in i]),
                     "x": (i % per_slide % side) * 224, "y": (i % per_slide // side) * 224,
                     "level": np.zeros(rows, np.int32), **_scores(np.random.default_rng(1), rows, 2, "probs")})


def _write(table: pa.Table, contestant: str) -> bytes:
    from gpubatch.outputs.writer import parquet_writer

    buffer = io.BytesIO()
    writer = (parquet_writer(buffer, table.schema) if contestant == GPUBATCH
              else pq.ParquetWriter(buffer, table.schema, compression="zstd"))
    with writer:
        writer.write_table(table)
    return buffer.getvalue()


def _cpu_ms(fn: Any) -> tuple[float, Any]:
    t0 = time.process_time()
    value = fn()
    return 1e3 * (time.process_time() - t0), value


def measure(name: str, table: pa.Table, repeats: int) -> list[dict[str, Any]]:
    names = [GPUBATCH, BEFORE]
    seen: dict[str, dict[str, list[float]]] = {n: {"write": [], "read": []} for n in names}
    size = {}
    for r in range(repeats + 1):  # the first round untimed
        for contestant in names[r % 2:] + names[: r % 2]:
            write_ms, data = _cpu_ms(lambda c=contestant: _write(table, c))
            read_ms, back = _cpu_ms(lambda d=data: pq.read_table(io.BytesIO(d)))
            if not back.equals(table):
                raise AssertionError(f"{contestant}: the file does not read back as the table")
            size[contestant] = len(data)
            if r:
                seen[contestant]["write"].append(write_ms)
                seen[contestant]["read"].append(read_ms)
    ours = statistics.median(seen[GPUBATCH]["write"])
    return [{"table": f"{name} ({table.num_rows:,} rows)", "contestant": c,
             "write cpu ms": statistics.median(seen[c]["write"]), "read cpu ms": statistics.median(seen[c]["read"]),
             "MB": size[c] / 1e6, "write x gpubatch's": statistics.median(seen[c]["write"]) / ours,
             "size x gpubatch's": size[c] / size[GPUBATCH]} for c in names]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = measure("genome windows", genome_table(args.rows), args.repeats)
    rows += measure("slide tiles", slides_table(args.rows), args.repeats)
    columns = ["table", "contestant", "write cpu ms", "read cpu ms", "MB", "write x gpubatch's", "size x gpubatch's"]
    return publish("bench_parquet.py", rows, columns, args.out, argv)


if __name__ == "__main__":
    main()
