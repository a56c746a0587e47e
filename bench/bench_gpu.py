"""GPU path benchmark: decode, model per precision, and end to end with the transfer share.

Why these three: the design's claim is that the data path, not the model, decides throughput.
Decode-only compares host libjpeg-turbo (imagecodecs) with nvImageCodec on the same spliced tile
bitstreams; model-only times the engine on device-resident input per precision (TensorRT when
installed, else ONNX Runtime); end-to-end pushes uint8 tiles through the device stage (pinned
staging, H2D, fused normalisation, model, D2H) and reports tiles/s and the share of stage time
spent in transfer. Markdown goes to stdout (paste into BENCHMARKS.md), JSON to --out.

Usage: python bench/bench_gpu.py [--slide PATH] [--tiles 2048] [--batch 64] [--out bench_gpu.json]
Without a CUDA device it prints one SKIP line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _timed(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs after one warm-up (first runs pay for JIT and allocation)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_tile_blobs(slide: Path, count: int) -> tuple[list[bytes], bytes | None, int, tuple[int, int]]:
    """Compressed level-0 tiles of a JPEG TIFF/SVS, repeated to ``count``; plus tables and photometric."""
    import tifffile

    with tifffile.TiffFile(str(slide)) as tif:
        page: Any = tif.pages[0]
        blobs = []
        for offset, size in zip(page.dataoffsets, page.databytecounts, strict=True):
            if size:
                tif.filehandle.seek(offset)
                blobs.append(tif.filehandle.read(size))
        reps = -(-count // len(blobs))
        return (blobs * reps)[:count], page.jpegtables, int(page.photometric), (page.tilelength, page.tilewidth)


def bench_decode(blobs: list[bytes], tables: bytes | None, photometric: int) -> dict[str, Any]:
    from gpubatch.sources.slides import gpu_decode

    result: dict[str, Any] = {"tiles": len(blobs)}
    cpu_s = _timed(lambda: gpu_decode.decode_jpeg_tiles_cpu(blobs, tables, photometric=photometric), 2)
    result["cpu_imagecodecs_tiles_per_s"] = len(blobs) / cpu_s
    ok, why = gpu_decode.gpu_decode_available()
    if ok:
        import cupy

        def gpu() -> None:
            gpu_decode.decode_jpeg_tiles_gpu(blobs, tables, photometric=photometric)
            cupy.cuda.Device().synchronize()

        result["gpu_nvimgcodec_tiles_per_s"] = len(blobs) / _timed(gpu, 2)
    else:
        result["gpu_nvimgcodec_skipped"] = why
    return result


def make_model(workdir: Path, size: int) -> Path:
    """A small ResNet-ish CNN at a fixed tile size with a dynamic batch (TensorRT needs fixed dims)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(), nn.Conv2d(128, 128, 3, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 3),
    ).eval()
    path = workdir / "bench_model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            net, (torch.rand(2, 3, size, size),), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    return path


def make_qdq(model: Path, size: int) -> Path | None:
    """Explicit QDQ int8 copy through gpubatch's own quantizer (the path jobs use), random calibration.

    ``target="gpu"``: symmetric int8 activations. The CPU target's uint8 activations with nonzero
    zero points are what TensorRT refuses (it takes zero-point-0 Q/DQ only), so the int8 row
    measured an engine build failure instead of an engine.
    """
    from gpubatch.models.prepare.quantize import quantize_qdq

    out = model.with_name("bench_model.int8.onnx")
    calibration = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
    quantize_qdq(model, out, calibration, "int8", target="gpu")
    return out


def load_model(path: Path, precision: str, batch: int) -> Any:
    from gpubatch.models.base import backend_available

    if backend_available("tensorrt"):
        from gpubatch.models.tensorrt import TensorRTModel

        return TensorRTModel(str(path), precision=precision, batch_size=batch)
    from gpubatch.models.onnxruntime import OnnxRuntimeModel

    return OnnxRuntimeModel(str(path), precision=precision)


def bench_model(model: Any, batch: int, size: int, iters: int = 50) -> float:
    """Items/s of the model alone, input already on the device (host input for non-device models).

    Every model has ``run_device``; only one that ``supports_device()`` takes a device array, with
    the stream to run on (ONNX Runtime's has no default). The stream is a non-blocking one, as
    the device stage's: TensorRT on the legacy default stream adds device-wide synchronisations.
    """
    x = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(model.input_dtype)
    if model.supports_device():
        import cupy

        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            xd = cupy.asarray(x)
        stream.synchronize()

        def run() -> None:
            for _ in range(iters):
                model.run_device(xd, stream)
            stream.synchronize()
    else:

        def run() -> None:
            for _ in range(iters):
                model.run(x)

    return batch * iters / _timed(run, 2)


def bench_end_to_end(model: Any, tiles: np.ndarray, batch: int, device: str) -> dict[str, Any]:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.engine.device import make_device_stage
    from gpubatch.ops.preprocess import Preprocess

    stage = make_device_stage(model, Preprocess("tiles", MEAN, STD, "NCHW"), device=device)
    batches = [tiles[i : i + batch] for i in range(0, len(tiles), batch)]
    list(stage.map(batches[:2], StageClocks()))  # warm-up: kernels compiled, buffers allocated
    clocks = StageClocks()
    t0 = time.perf_counter()
    for _ in stage.map(batches, clocks):
        pass
    wall = time.perf_counter() - t0
    parts = {k: clocks.parts.get(k, 0.0) for k in ("transfer", "preprocess", "compute")}
    total = sum(parts.values()) or 1.0
    return {"stage": type(stage).__name__, "tiles_per_s": len(tiles) / wall, "parts_s": parts,
            "transfer_share": parts["transfer"] / total}


def decode_tiles(blobs: list[bytes], tables: bytes | None, photometric: int, size: int) -> np.ndarray:
    """uint8 (N, size, size, 3) tiles cropped from decoded stored tiles (host decode, once)."""
    from gpubatch.sources.slides import gpu_decode

    decoded = gpu_decode.decode_jpeg_tiles_cpu(blobs, tables, photometric=photometric)
    if decoded.shape[1] < size or decoded.shape[2] < size:
        reps = (-(-size // decoded.shape[1]), -(-size // decoded.shape[2]))
        decoded = np.tile(decoded, (1, reps[0], reps[1], 1))
    return np.ascontiguousarray(decoded[:, :size, :size, :3])


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"### GPU path ({result['device']})", "", "| measure | value |", "|---|---|"]
    for key, value in result["decode"].items():
        lines.append(f"| decode {key} | {value:.1f} |" if isinstance(value, float) else f"| decode {key} | {value} |")
    for precision, value in result["model"].items():
        lines.append(f"| model {precision} items/s | {value:.1f} |" if isinstance(value, float) else f"| model {precision} | {value} |")
    for name, e2e in result["end_to_end"].items():
        lines.append(f"| end-to-end {name} ({e2e['stage']}) tiles/s | {e2e['tiles_per_s']:.1f} |")
        lines.append(f"| end-to-end {name} transfer share | {e2e['transfer_share']:.1%} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    blobs, tables, photometric, _ = read_tile_blobs(Path(args.slide), args.tiles)
    result: dict[str, Any] = {"device": name, "batch": args.batch, "size": args.size}
    result["decode"] = bench_decode(blobs, tables, photometric)
    tiles = decode_tiles(blobs, tables, photometric, args.size)
    with tempfile.TemporaryDirectory() as work:
        fp32 = make_model(Path(work), args.size)
        result["model"], models = {}, {}
        for precision in args.precisions.split(","):
            try:
                path = make_qdq(fp32, args.size) if precision == "int8" else fp32
                models[precision] = load_model(path, precision, args.batch) if path else None
                result["model"][precision] = bench_model(models[precision], args.batch, args.size)
            except Exception as exc:  # noqa: BLE001 - one precision failing must not lose the others
                models[precision] = None
                result["model"][precision] = f"skipped: {type(exc).__name__}: {exc}"
        model = models.get("fp32") or next(m for m in models.values() if m is not None)
        result["end_to_end"] = {
            "gpu": bench_end_to_end(model, tiles, args.batch, "auto"),
            "cpu_preprocess": bench_end_to_end(model, tiles, args.batch, "cpu"),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", default=str(DEFAULT_SLIDE), help="a JPEG-tiled TIFF or SVS")
    parser.add_argument("--tiles", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precisions", default="fp32,fp16,int8")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gpubatch.ops.kernels_gpu import gpu_available

    if not gpu_available():
        print("bench_gpu: SKIP (no CUDA device visible to CuPy; run on a GPU machine with gpubatch[gpu])")
        if args.out:
            Path(args.out).write_text(json.dumps({"skipped": "no CUDA device"}, indent=2))
        return 0
    result = run(args)
    print(to_markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
