"""`gpubatch demo`: synthetic pyramidal slides, a small CNN in ONNX, a job spec, one real run.

Everything is generated locally (no downloads): JPEG-compressed tiled pyramidal TIFFs written with
tifffile, with stained-looking tissue blobs on glass, and a small classifier exported with torch.
The job spec lands in the work dir so the user can copy it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DEMO_MPP = 0.25


class _TissueScene:
    """Near-white glass with H&E-coloured elliptical blobs and texture, rendered tile by tile.

    Any region at any downsample is computed on demand, so slides of any size are written tile by
    tile with memory of one tile, and every pyramid level shows the same scene.
    """

    PINK = np.array([200, 110, 170], dtype=np.float32)
    PURPLE = np.array([120, 70, 160], dtype=np.float32)

    def __init__(self, width: int, height: int, seed: int, blobs: int = 5):
        rng = np.random.default_rng(seed)
        self.cx = rng.uniform(0.15, 0.85, blobs) * width
        self.cy = rng.uniform(0.15, 0.85, blobs) * height
        self.rx = rng.uniform(0.12, 0.3, blobs) * width
        self.ry = rng.uniform(0.12, 0.3, blobs) * height
        self.seed = seed

    def region(self, x0: float, y0: float, w: int, h: int, ds: float, k: int = 0) -> np.ndarray:
        """(h, w, 3) uint8 of the scene from level-0 (x0, y0), one output pixel per ``ds`` px."""
        xs = x0 + ds * np.arange(w, dtype=np.float32)
        ys = (y0 + ds * np.arange(h, dtype=np.float32))[:, None]
        inside = np.zeros((h, w), dtype=bool)
        for cx, cy, rx, ry in zip(self.cx, self.cy, self.rx, self.ry, strict=True):
            inside |= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
        mix = ((np.sin(xs / 37.0) * np.cos(ys / 23.0) + 1.0) / 2.0)[..., None]
        noise = np.random.default_rng((self.seed, k)).normal(0, 12, (h, w, 1)).astype(np.float32)
        tissue = self.PINK * (1 - mix) + self.PURPLE * mix + noise
        return np.clip(np.where(inside[..., None], tissue, 238 + noise / 4), 0, 255).astype(np.uint8)

    def tiles(self, width: int, height: int, ds: float, tile: int) -> Iterator[np.ndarray]:
        for k, (y, x) in enumerate((y, x) for y in range(0, height, tile) for x in range(0, width, tile)):
            yield self.region(x * ds, y * ds, tile, tile, ds, k + int(ds) * 1_000_003)


def write_synthetic_slide(path: str | Path, width: int = 4096, height: int = 3072, *, mpp: float | None = DEMO_MPP,
                          levels: int = 3, tile: int = 256, seed: int = 0, quality: int = 85,
                          image: np.ndarray | None = None) -> Path:
    """Write a tiled, JPEG-compressed pyramidal TIFF (each level half the previous one).

    The scene is rendered tile by tile (any size, memory of one tile); ``image`` writes a given
    array instead. ``mpp=None`` writes no resolution tags, like files whose scanner recorded none.
    """
    import tifffile

    path = Path(path)
    kwargs: Any = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": quality},
                   "photometric": "rgb"}
    scene = _TissueScene(width, height, seed)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tif:
        for level in range(levels):
            ds = 2 ** level
            w, h = width // ds, height // ds
            extra: Any = {"subfiletype": 1 if level else 0}
            if level == 0 and mpp:
                extra.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
            if image is not None:
                data: Any = image[::ds, ::ds][:h, :w]
            else:
                data = scene.tiles(w, h, ds, tile)
            tif.write(data, shape=(h, w, 3), dtype=np.uint8, **extra, **kwargs)
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
    from gpubatch.cli.demo_models import make_genome_model

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
