"""What grows with the input: a slides run's peak RSS scaled along one dimension at a time.

    python bench/bench_slide_memory.py [--cases tiles slides wide] [--tiles 2000 20000 80000]
        [--slides 200 2000] [--widths 16 512 1024] [--trace] [--out F]

Every run is a fresh ``gpubatch.run`` process under the ``inline`` profile (its shards run in
that process, so its peak covers both the worker's side and the client's); a thread samples its
RSS every 5 ms. ``base_mb`` is the RSS once imports are done, before the run: ``growth_mb`` (peak
less base) is what the run itself held. ``--trace`` adds tracemalloc's peak (Python and numpy
allocations only, not Arrow's pool or zarr's codecs; slower). Cases, each scaled alone:

- tiles: one slide of N tiles (32 px tiles at level 0, no tissue filter), parquet + zarr +
  GeoJSON + heatmap;
- slides: N slides of 16 tiles each, parquet + zarr + heatmap;
- wide: one slide of 20,000 tiles whose model returns an embedding of W floats (zarr only).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, PeakRss, publish  # noqa: E402

TILE = 32
MPP = 0.25  # the synthetic slides' level-0 mpp: tiles at level 0


def embedding_model(path: Path, width: int) -> Path:
    """ONNX: per-channel mean of the tile, times a fixed (3, width) matrix: ``emb`` of width floats
    (width 1: one scalar output, which the heatmap takes). Built with onnx's helpers, no torch."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = numpy_helper.from_array(np.random.default_rng(0).random((3, width), dtype=np.float32), "w")
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["emb"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["b", 3, "h", "w_"])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", width])],
                              initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def square_slide(tiles: int) -> Path:
    """A one-level-0 synthetic slide of about ``tiles`` 32 px tiles (square grid)."""
    from gpubatch.cli.demo import write_synthetic_slide

    side = math.isqrt(tiles) * TILE
    path = WORK / "slidemem" / f"square{side}.tif"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_slide(path, side, side, seed=3, levels=3)
    return path


def tiny_slides(n: int) -> list[Path]:
    """``n`` slides of 128 x 128 px (16 tiles of 32 px), shared by every count."""
    from gpubatch.cli.demo import write_synthetic_slide

    folder = WORK / "slidemem" / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"t{i:05d}.tif" for i in range(n)]
    for i, p in enumerate(paths):
        if not p.exists():
            write_synthetic_slide(p, 128, 128, seed=i, levels=1, tile=128)
    return paths


def job(name: str, slides: list[Path], model: Path, formats: list[str], profile: str = "inline",
        folder: str = "slidemem") -> Path:
    """A slides job of ``slides`` under WORK/``folder`` (its output beside it), ``profile``'s workers."""
    spec = {
        "name": name, "kind": "slides", "input": {"uris": [str(p) for p in slides]},
        "tiles": {"size": TILE, "mpp": MPP, "tissue": {"method": "none"}},
        "model": {"path": str(model), "backend": "onnxruntime", "batch_size": 256,
                  "input": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}},
        "output": {"uri": str(WORK / folder / "out" / name), "formats": formats},
        "run": {"profile": profile, "readers": 2, "prefetch_batches": 4, "retries": 0},
    }
    path = WORK / folder / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def child(path: str, trace: bool) -> None:
    """In the measured process: imports, the base RSS, the run under a sampler, one JSON line."""
    import time
    import tracemalloc

    import gpubatch
    from gpubatch.runtime import runner  # noqa: F401  (its imports are base, not the run's)

    with PeakRss() as rss:
        if trace:
            tracemalloc.start()
        t0 = time.perf_counter()
        gpubatch.run(path, overwrite=True)
        seconds = time.perf_counter() - t0
        traced = tracemalloc.get_traced_memory()[1] if trace else 0
    base, peak = rss.base, rss.peak
    print(json.dumps({"base_mb": base / 2**20, "peak_mb": peak / 2**20, "growth_mb": (peak - base) / 2**20,
                      "traced_mb": traced / 2**20, "seconds": seconds}))


def measure(path: Path, trace: bool) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", str(path)] + (["--trace"] if trace else []),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def cases(args: argparse.Namespace) -> list[tuple[str, int, Path]]:
    """(case, its size, job file) for every run asked for."""
    narrow = embedding_model(WORK / "slidemem" / "emb1.onnx", 1)
    runs = []
    if "tiles" in args.cases:
        for n in args.tiles:
            slide = square_slide(n)
            runs.append(("tiles", math.isqrt(n) ** 2, job(f"tiles-{n}", [slide], narrow,
                                                          ["parquet", "zarr", "geojson"])))
    if "slides" in args.cases:
        every = tiny_slides(max(args.slides))
        for n in args.slides:
            runs.append(("slides", n, job(f"slides-{n}", every[:n], narrow, ["parquet", "zarr"])))
    if "wide" in args.cases:
        slide = square_slide(20_000)
        for w in args.widths:
            model = embedding_model(WORK / "slidemem" / f"emb{w}.onnx", w)
            runs.append(("wide", w, job(f"wide-{w}", [slide], model, ["zarr"])))
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["tiles", "slides", "wide"])
    ap.add_argument("--tiles", type=int, nargs="+", default=[2000, 20000, 80000])
    ap.add_argument("--slides", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 512, 1024])
    ap.add_argument("--trace", action="store_true", help="also tracemalloc's peak (slower)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.trace)
        return {}
    rows = []
    for case, size, path in cases(args):
        row = {"case": case, "size": size, **measure(path, args.trace)}
        print(f"  {case} {size}: peak {row['peak_mb']:.0f} MB (+{row['growth_mb']:.0f} over base), "
              f"traced {row['traced_mb']:.1f} MB, {row['seconds']:.1f} s", flush=True)
        rows.append(row)
    return publish("bench_slide_memory.py", rows, ["case", "size", "base_mb", "peak_mb", "growth_mb", "traced_mb",
                                                   "seconds"], args.out, argv)


if __name__ == "__main__":
    main()
