"""A shard's output writer at its fixed cost: many small shards (a biopsy's 16 tiles each), two
versions of gpubatch side by side, alternating fresh processes.

    python bench/bench_shard_writer.py --before /path/to/old/checkout [--after .] [--shards 200]
        [--rows 16] [--repeats 5]

Each process writes ``--shards`` shards through ``outputs.writer.ShardWriter`` (parquet and
zarr: two index columns, a 2-wide and an 8-wide output, a slide shard's 14 attributes) into a
fresh local output and commits each. The figure is CPU (and wall) milliseconds per shard, the median over the repeats: the
per-shard cost a run of thousands of small slides pays beside its tiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys, tempfile, time
import numpy as np
from gpubatch.outputs.store import OutputStore
from gpubatch.outputs.writer import ShardWriter
shards, rows = int(sys.argv[1]), int(sys.argv[2])
store = OutputStore(tempfile.mkdtemp())
rng = np.random.default_rng(0)
# a slide shard's attributes as a run writes them (a 128 px biopsy's; 14 keys before the names)
ATTRS = {"slide": "", "level": 0, "tile_size": 32, "mpp": 0.25, "read_size": 32, "extent_level0": 32.0,
         "grid_tiles": 16, "tissue_tiles": 16, "notes": [], "model_sha256": "f" * 64, "backend": "onnxruntime",
         "precision": "fp32", "gpubatch_version": "0.1.0",
         "slide_info": {"width": 128, "height": 128, "level_count": 1, "level_dimensions": [[128, 128]],
                        "level_downsamples": [1.0], "mpp": 0.25, "mpp_source": "TIFF XResolution",
                        "magnification": None, "vendor": "generic-tiff", "backend": "tifffile", "bounds": None}}
t0, c0 = time.perf_counter(), time.process_time()
for i in range(shards):
    w = ShardWriter(store, f"s{i}", "a1", {"slide": f"slide{i}.tif"}, dict(ATTRS, slide=f"slide{i}.tif"), ["parquet", "zarr"])
    w.write({"x": np.arange(rows, dtype=np.int64), "y": np.arange(rows, dtype=np.int64)},
            {"prob": rng.random((rows, 2), dtype=np.float32), "emb": rng.random((rows, 8), dtype=np.float32)})
    w.commit()
import gpubatch
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "package": gpubatch.__file__}))
'''


def one(root: str, shards: int, rows: int) -> dict[str, float]:
    # -P: no current directory first on sys.path, which from a checkout's root shadowed ``root``
    # (both contestants were that checkout); the child says which gpubatch it imported
    out = subprocess.run([sys.executable, "-P", "-c", CHILD, str(shards), str(rows)],
                         env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    if not Path(result.pop("package")).is_relative_to(Path(root).resolve()):
        raise RuntimeError(f"the child imported gpubatch from outside {root}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the package root of the version to compare with")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    trees = [("before", args.before), ("after", args.after)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for r in range(args.repeats):
        for name, root in (trees if r % 2 == 0 else trees[::-1]):
            runs[name].append(one(root, args.shards, args.rows))
    for name, rows in runs.items():
        cpu = statistics.median(x["cpu"] for x in rows) / args.shards * 1e3
        wall = statistics.median(x["wall"] for x in rows) / args.shards * 1e3
        print(f"{name}: {cpu:.1f} ms CPU, {wall:.1f} ms wall per shard of {args.rows} rows (median of {args.repeats})")


if __name__ == "__main__":
    main()
