"""A run's merge of many small parts from S3: read one at a time (as before) against read ahead.

    python bench/bench_merge_remote.py [--parts 500] [--latency-ms 20] [--repeats 2]

merge_parquet of ``--parts`` tiny committed parts on the tests' S3 server (moto, on loopback)
behind their fault proxy, which adds ``--latency-ms`` to every request: serial (PARTS_AHEAD = 1,
the merge before it read ahead) and read ahead (PARTS_AHEAD as shipped), alternating, in one
process, the same parts and the same file checked after. Run once with ``--latency-ms 0`` too:
that is the server's and the proxy's own time, which both contestants pay.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from s3_fixtures import start_s3_stack

from gpubatch.outputs import merge
from gpubatch.outputs.layout import PARTS_DIR, PREDICTIONS
from gpubatch.outputs.manifest import CommitRef
from gpubatch.outputs.store import OutputStore
from gpubatch.outputs.writer import parquet_writer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", type=int, default=500)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    stack = start_s3_stack("bench")
    try:
        files, refs = {}, []
        for i in range(args.parts):
            t = pa.table({"slide": [f"s{i}"] * 4, "x": np.arange(4, dtype=np.int64), "y": np.full(4, i, np.int64),
                          "level": np.zeros(4, np.int32), "score": np.random.default_rng(i).random(4).astype(np.float32)})
            buf = io.BytesIO()
            with parquet_writer(buf, t.schema) as w:
                w.write_table(t)
            files[f"bench/out/{PARTS_DIR}/{i:05d}.parquet"] = buf.getvalue()
            refs.append(CommitRef(f"{i:05d}", f"{i:05d}.parquet", None))
        stack.fs().pipe(files)
        store = OutputStore(stack.uri("out"), stack.options())
        stack.proxy.configure(latency_s=args.latency_ms / 1000)
        shipped = merge.PARTS_AHEAD
        seen: dict[str, list[float]] = {"serial (before)": [], f"read ahead ({shipped})": []}
        merge.merge_parquet(store, refs[:8], ["slide", "x", "y", "level"])  # warm: clients, pools
        for r in range(args.repeats):
            for name in (list(seen) if r % 2 == 0 else list(seen)[::-1]):
                merge.PARTS_AHEAD = 1 if name.startswith("serial") else shipped
                stack.proxy.gets_open = stack.proxy.most_gets_open = 0
                t0 = time.perf_counter()
                rows = merge.merge_parquet(store, refs, ["slide", "x", "y", "level"])
                seen[name].append(time.perf_counter() - t0)
                assert rows == 4 * args.parts
                print(f"  {name}: {seen[name][-1]:.2f} s, most GETs in flight {stack.proxy.most_gets_open}", flush=True)
        merged = pq.read_table(io.BytesIO(store.read_bytes(PREDICTIONS)))
        assert merged.column("y").to_pylist() == [i for i in range(args.parts) for _ in range(4)]
        print(f"{args.parts} parts, {args.latency_ms:g} ms per request:")
        for name, times in seen.items():
            print(f"  {name}: best {min(times):.2f} s, runs {', '.join(f'{t:.2f}' for t in times)}")
    finally:
        stack.close()


if __name__ == "__main__":
    main()
