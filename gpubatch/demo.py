"""`gpubatch demo`: synthetic pyramidal slides, a small CNN in ONNX, a job spec, one real run.

Everything is generated locally (no downloads): JPEG-compressed tiled pyramidal TIFFs written with
tifffile, with stained-looking tissue blobs on glass, and a small classifier exported with torch.
The job spec lands in the work dir so the user can copy it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

DEMO_MPP = 0.25


def _tissue_image(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Near-white glass with a few H&E-coloured blobs with texture, built in row bands."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    n_blobs = 5
    cx = rng.uniform(0.15, 0.85, n_blobs) * width
    cy = rng.uniform(0.15, 0.85, n_blobs) * height
    rx = rng.uniform(0.12, 0.3, n_blobs) * width
    ry = rng.uniform(0.12, 0.3, n_blobs) * height
    pink = np.array([200, 110, 170], dtype=np.float32)
    purple = np.array([120, 70, 160], dtype=np.float32)
    xs = np.arange(width, dtype=np.float32)
    for y0 in range(0, height, 512):
        ys = np.arange(y0, min(y0 + 512, height), dtype=np.float32)[:, None]
        inside = np.zeros((len(ys), width), dtype=bool)
        for i in range(n_blobs):
            inside |= ((xs - cx[i]) / rx[i]) ** 2 + ((ys - cy[i]) / ry[i]) ** 2 <= 1.0
        mix = (np.sin(xs / 37.0) * np.cos(ys / 23.0) + 1.0) / 2.0
        tissue = pink * (1 - mix[..., None]) + purple * mix[..., None]
        noise = rng.normal(0, 12, (len(ys), width, 1)).astype(np.float32)
        band = np.where(inside[..., None], tissue + noise, 238 + noise / 4)
        img[y0 : y0 + len(ys)] = np.clip(band, 0, 255).astype(np.uint8)
    return img


def write_synthetic_slide(path: str | Path, width: int = 4096, height: int = 3072, *, mpp: float | None = DEMO_MPP,
                          levels: int = 3, tile: int = 256, seed: int = 0, quality: int = 85,
                          image: np.ndarray | None = None) -> Path:
    """Write a tiled, JPEG-compressed pyramidal TIFF (each level half the previous one).

    ``mpp=None`` writes no resolution tags, like files whose scanner recorded no pixel size.
    """
    import tifffile

    rng = np.random.default_rng(seed)
    img = image if image is not None else _tissue_image(width, height, rng)
    path = Path(path)
    kwargs: Any = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": quality},
                              "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        res: Any = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
        tif.write(img, subfiletype=0, **res, **kwargs)
        level = img
        for _ in range(1, levels):
            h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
            level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
            tif.write(level, subfiletype=1, **kwargs)
    return path


def _export(module: Any, example: Any, path: Path, output_names: list[str], spatial: bool = False) -> Path:
    """Export with a dynamic batch axis (and dynamic H, W when ``spatial``)."""
    import torch

    module.eval()
    axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=output_names,
                      dynamic_axes={"input": axes, **{n: {0: "batch"} for n in output_names}},
                      opset_version=17, dynamo=False)
    return path


def make_classifier(path: str | Path, classes: int = 3, size: int = 224, seed: int = 0) -> Path:
    """A small CNN (3 conv layers, global pool, linear, softmax) exported to ONNX; output ``probs``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes), nn.Softmax(dim=1),
    )
    return _export(net, torch.rand(2, 3, size, size), Path(path), ["probs"], spatial=True)


class _MeanColour:
    """Per-channel mean of the input: a model whose output is checkable against the pixels."""

    @staticmethod
    def build() -> Any:
        from torch import nn

        class MeanColour(nn.Module):
            def forward(self, x: Any) -> Any:
                return x.mean(dim=(2, 3))

        return MeanColour()


def make_mean_colour_model(path: str | Path, size: int = 224) -> Path:
    """ONNX model returning each tile's per-channel mean of the normalised NCHW input; output ``mean``."""
    import torch

    return _export(_MeanColour.build(), torch.rand(2, 3, size, size), Path(path), ["mean"], spatial=True)


def demo_job(workdir: Path, slides: list[Path], model: Path) -> dict[str, Any]:
    return {
        "name": "demo-wsi-classify",
        "kind": "slides",
        "input": {"uris": [str(Path("slides") / "*.tif")], "access": "auto"},
        "tiles": {"size": 224, "mpp": 0.5, "overlap": 0.0, "tissue": {"method": "otsu", "min_fraction": 0.5}},
        "model": {"path": model.name, "backend": "onnxruntime", "precision": "fp32", "batch_size": 32,
                  "input": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layout": "NCHW"}},
        "output": {"uri": "results/demo-wsi-classify", "formats": ["zarr", "parquet"]},
        "run": {"profile": "local", "readers": 4, "prefetch_batches": 8, "retries": 2},
    }


def write_synthetic_genome(path: str | Path, contigs: dict[str, int], seed: int = 0) -> Path:
    """A FASTA (60 bases a line) with its .fai, random bases and a run of N in each contig."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    fai_lines, offset = [], 0
    with path.open("wb") as f:
        for name, length in contigs.items():
            seq = rng.choice(np.frombuffer(b"ACGT", np.uint8), length)
            seq[length // 3 : length // 3 + 500] = ord("N")
            header = f">{name}\n".encode()
            f.write(header)
            offset += len(header)
            body = b"".join(seq[i : i + 60].tobytes() + b"\n" for i in range(0, length, 60))
            f.write(body)
            fai_lines.append(f"{name}\t{length}\t{offset}\t60\t61\n")
            offset += len(body)
    Path(str(path) + ".fai").write_text("".join(fai_lines))
    return path


def genome_demo_job() -> dict[str, Any]:
    return {
        "name": "demo-genome-windows",
        "kind": "genome",
        "windows": {"reference": "genome/demo.fa", "regions": "genome", "length": 1000, "stride": 1000,
                    "reverse_complement": "average", "encoding": {"layout": "NLC", "n_value": 0.25},
                    "windows_per_shard": 256},
        "model": {"path": "genome_model.onnx", "backend": "onnxruntime", "batch_size": 64},
        "output": {"uri": "results/demo-genome-windows", "formats": ["zarr", "parquet"]},
        "run": {"profile": "local", "readers": 2, "prefetch_batches": 8, "retries": 2},
    }


def prepare_genome_demo(workdir: str | Path) -> Path:
    """Write a small synthetic genome, a sequence model and a windows job; returns the job path."""
    from gpubatch.demo_models import make_genome_model

    workdir = Path(workdir)
    (workdir / "genome").mkdir(parents=True, exist_ok=True)
    fasta = workdir / "genome" / "demo.fa"
    if not fasta.exists():
        write_synthetic_genome(fasta, {"chrA": 300_000, "chrB": 200_000, "chrC": 100_000})
    model = workdir / "genome_model.onnx"
    if not model.exists():
        make_genome_model(model, 1000)
    job_path = workdir / "genome-windows.yaml"
    job_path.write_text("# Written by `gpubatch demo`: 1 kb windows over a synthetic genome.\n"
                        + yaml.safe_dump(genome_demo_job(), sort_keys=False))
    return job_path


def prepare_demo(workdir: str | Path, n_slides: int = 4, size: tuple[int, int] = (6144, 4096)) -> Path:
    """Write slides, model and job spec into ``workdir``; returns the job spec path."""
    workdir = Path(workdir)
    (workdir / "slides").mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(n_slides):
        p = workdir / "slides" / f"demo-{i:02d}.tif"
        if not p.exists():
            write_synthetic_slide(p, *size, seed=i)
        slides.append(p)
    model = workdir / "classifier.onnx"
    if not model.exists():
        make_classifier(model)
    job_path = workdir / "wsi-classify.yaml"
    job_path.write_text("# Written by `gpubatch demo`; copy and edit it for your own slides.\n"
                        + yaml.safe_dump(demo_job(workdir, slides, model), sort_keys=False))
    return job_path
