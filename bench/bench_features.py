"""Patch features with a ViT-S/16-sized encoder: gpubatch against the TRIDENT-style loop.

    python bench/bench_features.py [--slides 2] [--size 12288x8192] [--repeats 3] [--out F]

The field's commonest overnight job: every tissue tile of every slide through a foundation-model
encoder (UNI, Virchow, H-optimus: ViTs), features saved per slide for MIL. Contestants, on the same
slides, the same tile list and the same encoder weights (random, seeded: ViT-S/16, 384 wide, 12
blocks, 6 heads, 224 px), in alternating order:

- trident-style: what TRIDENT and most CLAM-derived pipelines do: a torch Dataset calling
  openslide.read_region per tile, a DataLoader with worker processes, the encoder in torch under
  inference_mode, features saved per slide;
- gpubatch (onnxruntime): the job through ``gpubatch.run`` with the encoder exported to ONNX;
- gpubatch (torch): the same job with the TorchScript of the same encoder (backend torch), so the
  model runtime is TRIDENT's and the difference is the data path alone.

Beside the end-to-end rates: each runtime's model-only rate (a batch of tiles already in memory),
gpubatch's starvation and verdict, and the largest difference between gpubatch's features and the
TRIDENT-style loop's for the same tiles (they must agree: same pixels, same weights).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slides import TileDataset, gpubatch_job, make_workload, tile_lists  # noqa: E402
from common import WORK, alternate, machine, save, shards_only_row, steady_seconds, table  # noqa: E402

VIT_S16 = {"img": 224, "patch": 16, "dim": 384, "depth": 12, "heads": 6, "registers": 0, "seed": 0}


def make_encoders(depth: int) -> dict[str, Path]:
    """The same seeded ViT as ONNX (onnxruntime) and TorchScript (torch backend)."""
    from gpubatch.cli.pathology_models import make_vit

    spec = {**VIT_S16, "depth": depth}
    paths = {}
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
        path = WORK / f"vit-s16-d{depth}.{suffix}"
        if not path.exists():
            make_vit(path, fmt=fmt, **spec)
        paths[fmt] = path
    return paths


def run_trident_style(tiles: list[dict[str, Any]], depth: int, batch: int, out: Path, workers: int) -> int:
    """openslide.read_region per tile in a DataLoader, the encoder in torch, features per slide."""
    import torch
    from torch.utils.data import DataLoader

    from gpubatch.cli.pathology_models import build_vit

    encoder = build_vit(**{**VIT_S16, "depth": depth})
    loader = DataLoader(TileDataset(tiles), batch_size=batch, num_workers=workers, shuffle=False)
    features = []
    with torch.inference_mode():
        for x in loader:
            features.append(encoder(x).numpy())
    stacked = np.concatenate(features) if features else np.zeros((0, VIT_S16["dim"]), np.float32)
    start = 0
    for i, t in enumerate(tiles):  # TRIDENT writes one features file per slide
        n = len(t["xs"])
        np.save(out / f"trident-{i}.npy", stacked[start : start + n])
        start += n
    return len(stacked)


def run_gpubatch(job: dict[str, Any], last: dict[str, Any]) -> int:
    """One fresh run (its output folder emptied first: every repeat computes every tile)."""
    import shutil

    import gpubatch
    from gpubatch.spec import parse_job

    shutil.rmtree(job["output"]["uri"], ignore_errors=True)
    result = gpubatch.run(parse_job(job), show_progress=False)
    last["result"] = result
    last.setdefault("steady_s", []).append(steady_seconds(Path(result.output_uri)))
    return int(result.report["items"])


def model_only(paths: dict[str, Path], depth: int, batch: int, repeats: int = 3) -> dict[str, float]:
    """Tiles/s of each runtime on one batch already in memory (the model's ceiling here)."""
    import onnxruntime as ort
    import torch

    from gpubatch.cli.pathology_models import build_vit

    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    session = ort.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    encoder = build_vit(**{**VIT_S16, "depth": depth})

    def rate(fn: Any) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return repeats * batch / (time.perf_counter() - t0)

    with torch.inference_mode():
        torch_rate = rate(lambda: encoder(torch.from_numpy(x)))
    return {"onnxruntime": rate(lambda: session.run(None, {"tiles": x})), "torch": torch_rate}


def agreement(result: Any, tiles: list[dict[str, Any]], out: Path) -> float:
    """Largest |gpubatch - trident-style| over every feature of every tile, matched by position."""
    worst = 0.0
    for i, t in enumerate(tiles):
        ours, coords = result.embeddings(t["path"])
        theirs = np.load(out / f"trident-{i}.npy")
        order = {(x, y): k for k, (x, y) in enumerate(zip(t["xs"], t["ys"], strict=True))}
        index = [order[(int(x), int(y))] for x, y in zip(coords["x"], coords["y"], strict=True)]
        worst = max(worst, float(np.abs(ours - theirs[index]).max(initial=0.0)))
    return worst


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--size", default="12288x8192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--depth", type=int, default=VIT_S16["depth"], help="ViT blocks (12 is ViT-S)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the TRIDENT-style loop")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    wl = make_workload("decode", args.slides, (w, h))
    tiles = tile_lists(wl["slides"], 224, 0.5)
    encoders = make_encoders(args.depth)
    out = WORK / "features"
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {"onnxruntime": {}, "torch": {}}
    jobs = {}
    for runtime, fmt in (("onnxruntime", "onnx"), ("torch", "torchscript")):
        job = gpubatch_job(224, 0.5, wl["slides"], encoders[fmt], out / f"gpubatch-{runtime}", args.batch)
        job["model"]["backend"] = runtime
        job["output"]["formats"] = ["zarr", "parquet"]
        jobs[runtime] = job
    contestants = {
        "trident-style": lambda: run_trident_style(tiles, args.depth, args.batch, out, args.workers),
        "gpubatch (onnxruntime)": lambda: run_gpubatch(jobs["onnxruntime"], runs["onnxruntime"]),
        "gpubatch (torch)": lambda: run_gpubatch(jobs["torch"], runs["torch"]),
    }
    print(f"ViT-S/16 (depth {args.depth}): {len(tiles)} slides, {sum(len(t['xs']) for t in tiles)} tissue tiles")
    results = alternate(contestants, args.repeats)
    base = results["trident-style"]
    rows = [{"contestant": m.name, "tiles": m.items, "median s": m.median_s, "tiles/s": m.items_per_s,
             "vs trident-style": m.items_per_s / base.items_per_s} for m in results.values()]
    for runtime in ("torch", "onnxruntime"):
        g = results[f"gpubatch ({runtime})"]
        steady = shards_only_row(g, runs[runtime]["steady_s"], "tiles", "tiles/s")
        steady["contestant"] = f"gpubatch ({runtime}), shards only"
        steady["vs trident-style"] = steady["tiles/s"] / base.items_per_s
        rows.append(steady)
    ceiling = model_only(encoders, args.depth, args.batch)
    reports = {r: runs[r]["result"].report for r in runs}
    diffs = {r: agreement(runs[r]["result"], tiles, out) for r in runs}
    columns = ["contestant", "tiles", "median s", "tiles/s", "vs trident-style"]
    print(table(rows, columns))
    print("model only (tiles/s):", {k: round(v, 1) for k, v in ceiling.items()},
          "| starvation:", {r: f"{reports[r]['starvation']:.1%}" for r in reports},
          "| max |gpubatch - trident-style|:", {r: f"{d:.2e}" for r, d in diffs.items()})
    data = {"machine": machine(), "rows": rows, "columns": columns, "model_only_tiles_per_s": ceiling,
            "starvation": {r: reports[r]["starvation"] for r in reports},
            "verdict": {r: reports[r]["verdict"]["text"] for r in reports}, "max_abs_diff": diffs,
            "encoder": {**VIT_S16, "depth": args.depth}, "batch": args.batch, "workers": args.workers,
            "command": "python bench/bench_features.py " + " ".join(argv or sys.argv[1:])}
    save(args.out, data)
    return data


if __name__ == "__main__":
    main()
