"""fp32 vs int8 (QDQ) throughput with ONNX Runtime on CPU for a ResNet-18-sized CNN.

    python bench/bench_quantize.py [--repeats 5] [--batch 32] [--out results.json]

The network is ResNet-18's layout written by hand (torchvision is not a dependency): 7x7 stem,
four stages of two basic blocks (64-128-256-512 channels), global pool, 1000-way head; about 1.8
GFLOPs per 224x224 tile. Weights are random (no downloads), so the top-1 agreement figure measures
how much int8 rounding moves a randomly initialised network's decisions, which is harsher than a
trained one with confident margins; the logits' Pearson correlation is shown beside it.

Calibration and validation tiles are cut from a synthetic H&E-like slide (gpubatch.cli.demo), drawn
disjointly. Both sessions live in one process and are timed in alternating repeats (fp32, int8,
int8, fp32, ...) so that thermal or neighbour noise hits both alike; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpubatch.models.onnxruntime import OnnxRuntimeModel
from gpubatch.models.prepare.quantize import quantize_qdq
from gpubatch.models.prepare.validate import classifier_figures, regressor_figures, run_batches

TILE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def resnet18_like(classes: int = 1000) -> Any:
    """ResNet-18's layers (basic blocks, batch norm, projection shortcuts), built from torch.nn."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.short(x))

    torch.manual_seed(0)  # before any layer exists: the same weights every run
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers).eval()


def export(path: Path) -> Path:
    import torch

    from gpubatch.cli.demo import _export

    return _export(resnet18_like(), torch.rand(2, 3, TILE, TILE), path, ["logits"])


def tissue_tiles(workdir: Path, n: int) -> np.ndarray:
    """``n`` normalised NCHW tiles cut from a synthetic slide's full-resolution level."""
    import tifffile

    from gpubatch.cli.demo import write_synthetic_slide

    side = int(np.ceil(np.sqrt(n))) * TILE
    img = tifffile.imread(write_synthetic_slide(workdir / "bench.tif", side, side, levels=1, seed=3))
    k = side // TILE
    tiles = img.reshape(k, TILE, k, TILE, 3).transpose(0, 2, 1, 3, 4).reshape(-1, TILE, TILE, 3)[:n]
    x = (tiles.astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def time_batches(model: OnnxRuntimeModel, batch: np.ndarray, runs: int) -> float:
    t0 = time.perf_counter()
    for _ in range(runs):
        model.run(batch)
    return len(batch) * runs / (time.perf_counter() - t0)


def alternate(models: dict[str, OnnxRuntimeModel], batch: np.ndarray, repeats: int, runs: int) -> dict[str, list[float]]:
    """items/s per repeat for each model, the order flipping every repeat."""
    for m in models.values():
        m.run(batch)  # warm-up: arena allocation, kernel selection
    out: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(time_batches(models[name], batch, runs))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runs", type=int, default=2, help="batches per timed repeat")
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--validation", type=int, default=64)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32_path = export(work / "resnet18.onnx")
        x = tissue_tiles(work, args.calibration + args.validation)
        calib, valid = x[: args.calibration], x[args.calibration :]
        qinfo = quantize_qdq(fp32_path, work / "resnet18.int8.onnx", calib)
        models = {"fp32": OnnxRuntimeModel(str(fp32_path)),
                  "int8": OnnxRuntimeModel(str(work / "resnet18.int8.onnx"))}
        ref, test = (run_batches(models[k], valid, args.batch)["logits"] for k in ("fp32", "int8"))
        speeds = alternate(models, np.ascontiguousarray(np.resize(valid, (args.batch, *valid.shape[1:]))),
                           args.repeats, args.runs)
    result = summarise(args, speeds, classifier_figures(ref, test), regressor_figures(ref, test), qinfo)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


def summarise(args: argparse.Namespace, speeds: dict[str, list[float]], cls: dict[str, float],
              reg: dict[str, float], qinfo: dict[str, Any]) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in speeds.items()}
    return {
        "model": "resnet18-like (random weights)", "tile": TILE, "batch": args.batch, "repeats": args.repeats,
        "cpu_count": os.cpu_count(), "provider": "CPUExecutionProvider",
        "items_per_s": med, "items_per_s_all": speeds, "int8_over_fp32": med["int8"] / med["fp32"],
        "top1_agreement": cls["top1_agreement"], "logits_pearson": reg["pearson"],
        "logits_relative_error": reg["relative_error"], "validation_items": args.validation,
        "calibration_items": args.calibration, "quantize_seconds": qinfo["seconds"],
    }


def table(r: dict[str, Any]) -> str:
    rows = [f"ResNet-18-like, {r['tile']}x{r['tile']} tiles, batch {r['batch']}, ONNX Runtime CPU "
            f"({r['cpu_count']} cores), median of {r['repeats']} alternating repeats", "",
            "| precision | items/s | min-max | vs fp32 | top-1 agreement | logits Pearson |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in ("fp32", "int8"):
        v = r["items_per_s_all"][name]
        ratio = r["items_per_s"][name] / r["items_per_s"]["fp32"]
        agree = "1 (reference)" if name == "fp32" else f"{r['top1_agreement']:.3f} ({r['validation_items']} tiles)"
        pearson = "1" if name == "fp32" else f"{r['logits_pearson']:.4f}"
        rows.append(f"| {name} | {r['items_per_s'][name]:.1f} | {min(v):.1f}-{max(v):.1f} | {ratio:.2f}x "
                    f"| {agree} | {pearson} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
