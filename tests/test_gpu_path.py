"""The GPU path: device stage, TensorRT engines, tables, JPEG table splicing, kernel compilation.

Tests that need a device are marked ``gpu`` and skip without one; their CPU twins, the pure-byte
JPEG splicing and the nvcc compile check run everywhere (the last wherever nvcc is on PATH).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import gpu_missing, shared_file

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import GpubatchError
from gpubatch.engine.device import CpuDeviceStage, DeviceStage, make_device_stage
from gpubatch.ops import kernels
from gpubatch.ops.kernels_gpu import gpu_available
from gpubatch.ops.preprocess import Preprocess
from gpubatch.sources.slides import gpu_decode

REPO = Path(__file__).resolve().parents[1]
KERNELS = sorted((REPO / "kernels").glob("*.cu"))
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(gpu_missing() is not None, reason=gpu_missing() or "")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _export(module, example, path: Path) -> Path:
    import torch

    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module, (example,), str(path), input_names=["input"], output_names=["out"],
            dynamic_axes={"input": {0: "batch"}, "out": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def tile_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny conv net on fixed 32x32 NCHW tiles with a dynamic batch (what TRT profiles need)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 4),
    )
    return _export(net, torch.rand(2, 3, 32, 32), tmp_path_factory.mktemp("m") / "tiles.onnx")


@pytest.fixture(scope="module")
def dna_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpubatch.cli.demo_models import make_genome_model

    return make_genome_model(tmp_path_factory.mktemp("m") / "dna.onnx", length=64, layout="NLC")


def _ort(path: Path):
    from gpubatch.models.onnxruntime import OnnxRuntimeModel

    return OnnxRuntimeModel(str(path))


# -- CPU twin and stage selection (always run) ------------------------------------------------------


def test_cpu_stage_equals_numpy_then_model(tile_model: Path) -> None:
    model = _ort(tile_model)
    stage = make_device_stage(model, Preprocess("tiles", MEAN, STD, "NCHW"), device="cpu")
    assert isinstance(stage, CpuDeviceStage)
    items = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    clocks = StageClocks()
    got = stage(items, clocks)
    want = model.run(kernels.normalize_tiles(items, MEAN, STD, "NCHW"))
    np.testing.assert_array_equal(got["out"], want["out"])
    assert clocks.parts["preprocess"] > 0 and clocks.parts["compute"] > 0


def test_cpu_stage_map_keeps_order(dna_model: Path) -> None:
    model = _ort(dna_model)
    stage = make_device_stage(model, Preprocess("dna", layout="NLC", reverse_complement=True), device="cpu")
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 5, (n, 64), dtype=np.uint8) for n in (3, 1, 4)]
    results = list(stage.map(batches, StageClocks()))
    for items, got in zip(batches, results, strict=True):
        want = model.run(kernels.one_hot(items, "NLC", 0.0, np.float32, True))
        np.testing.assert_array_equal(got["scores"], want["scores"])


def test_auto_picks_cpu_twin_without_gpu_and_cuda_refuses(tile_model: Path) -> None:
    if gpu_available():
        pytest.skip("a GPU is present: the refusal path is for GPU-less machines")
    model = _ort(tile_model)
    assert isinstance(make_device_stage(model, Preprocess("tiles")), CpuDeviceStage)
    with pytest.raises(GpubatchError, match="cuda"):
        make_device_stage(model, Preprocess("tiles"), device="cuda")


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "audio"}, {"kind": "tiles", "layout": "NLC"}, {"kind": "dna", "layout": "NCHW"}, {"dtype": "int8"}],
)
def test_preprocess_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(GpubatchError):
        Preprocess(**kwargs)


# -- GPU device stage vs CPU twin (gpu) -----------------------------------------------------------------


def _compare_stages(model, kind: str, items: list[np.ndarray], atol: float, **params) -> StageClocks:
    cpu = make_device_stage(model, Preprocess(kind, **params), device="cpu")
    dev = make_device_stage(model, Preprocess(kind, **params), device="cuda")
    assert isinstance(dev, DeviceStage)
    clocks = StageClocks()
    for batch, got in zip(items, dev.map(items, clocks), strict=True):
        want = cpu(batch, StageClocks())
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=atol)
    return clocks


@gpu
@needs_gpu
def test_device_stage_matches_cpu_twin_with_ort_cuda(tile_model: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) not installed")
    model = _ort(tile_model)
    rng = np.random.default_rng(2)
    batches = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (8, 8, 3)]
    clocks = _compare_stages(model, "tiles", batches, 1e-4, mean=MEAN, std=STD, layout="NCHW")
    assert {"transfer", "preprocess", "compute"} <= set(clocks.parts)


@gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["tiles", "dna"])
def test_device_stage_matches_cpu_twin_with_tensorrt(kind: str, tile_model: Path, dna_model: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trt_model = _trt_or_skip(tile_model if kind == "tiles" else dna_model, tmp_path, monkeypatch, "fp32")
    rng = np.random.default_rng(3)
    if kind == "tiles":
        batches = [rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (8, 5, 8)]
        params: dict = {"mean": MEAN, "std": STD, "layout": "NCHW"}
    else:
        batches = [rng.integers(0, 5, (n, 64), dtype=np.uint8) for n in (8, 5, 8)]
        params = {"layout": "NLC", "n_value": 0.25}
    clocks = _compare_stages(trt_model, kind, batches, 1e-3, **params)
    assert clocks.parts["transfer"] > 0 and clocks.parts["compute"] > 0


# -- TensorRT engine build and cache (gpu) ------------------------------------------------------------


def _trt_or_skip(onnx_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, precision: str, batch_size: int = 8):
    pytest.importorskip("tensorrt")
    monkeypatch.setenv("GPUBATCH_CACHE", str(cache))
    from gpubatch.models.tensorrt import TensorRTModel

    return TensorRTModel(str(onnx_path), precision=precision, batch_size=batch_size)


@gpu
@needs_gpu
@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("fp16", 2e-2)])
def test_tensorrt_builds_caches_and_matches_ort(precision: str, atol: float, tile_model: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _trt_or_skip(tile_model, tmp_path, monkeypatch, precision)
    assert not first.cache_hit and first.engine_path.exists()
    assert list((tmp_path / "trt").glob("timing-*.cache"))
    second = _trt_or_skip(tile_model, tmp_path, monkeypatch, precision)
    assert second.cache_hit and second.engine_path == first.engine_path
    x = kernels.normalize_tiles(
        np.random.default_rng(4).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), MEAN, STD
    )  # 20 > max batch 16: exercises the chunked path too
    got = second.run(x)["out"]
    want = _ort(tile_model).run(x)["out"]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=atol)
    assert second.describe()["batch_profile"] == [1, 8, 16]


@gpu
@needs_gpu
def test_tensorrt_chunks_that_start_off_256_bytes_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """23 windows of 63 x 4 float32 (1,008 bytes each) through a profile of max 10: the second chunk
    starts 10,080 bytes in, not 256-byte aligned as setTensorAddress requires; it is copied first."""
    from gpubatch.cli.demo_models import make_genome_model

    onnx_path = make_genome_model(tmp_path / "dna63.onnx", length=63, layout="NLC")
    model = _trt_or_skip(onnx_path, tmp_path, monkeypatch, "fp32", batch_size=5)
    codes = np.random.default_rng(8).integers(0, 5, (23, 63), dtype=np.uint8)
    x = kernels.one_hot(codes, "NLC", 0.25)
    np.testing.assert_allclose(model.run(x)["scores"], _ort(onnx_path).run(x)["scores"], rtol=1e-3, atol=1e-4)


@gpu
@needs_gpu
def test_ort_run_device_binds_a_strided_or_other_typed_input_correctly(tile_model: Path) -> None:
    """IO binding reads the input by pointer as C-ordered input_dtype: a view or a float64 array
    must be made so first, or ORT computes on the wrong bytes."""
    import cupy
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) not installed")
    model = _ort(tile_model)
    x = kernels.normalize_tiles(np.random.default_rng(9).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), MEAN, STD)
    want = model.run(x[::2])["out"]
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:  # uploaded on the stream run_device is given: it does not wait for the default stream
        strided = cupy.asarray(x)[::2]
        wide = cupy.asarray(x[::2]).astype(np.float64)
    assert not strided.flags.c_contiguous
    for dev in (strided, wide):
        got = cupy.asnumpy(model.run_device(dev, stream)["out"])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@gpu
@needs_gpu
def test_tensorrt_int8_refuses_a_model_without_qdq(tile_model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(GpubatchError, match="QDQ"):
        _trt_or_skip(tile_model, tmp_path, monkeypatch, "int8")


# -- JPEG table splicing (always) and GPU decode (gpu) ------------------------------------------------


def _page_tiles(path: Path, count: int = 8):
    import tifffile

    tif = tifffile.TiffFile(str(path))
    page = tif.pages[0]
    blobs = []
    for i in range(min(count, len(page.dataoffsets))):
        tif.filehandle.seek(page.dataoffsets[i])
        blobs.append(tif.filehandle.read(page.databytecounts[i]))
    shape = (page.tilelength, page.tilewidth, -1)
    refs = [np.asarray(page.decode(b, i, jpegtables=page.jpegtables)[0]).reshape(shape) for i, b in enumerate(blobs)]
    return tif, page, blobs, refs


def _assert_spliced_decode_equals_tifffile(path: Path) -> None:
    import imagecodecs

    tif, page, blobs, refs = _page_tiles(path)
    with tif:
        assert page.compression == 7 and page.jpegtables is not None
        streams = gpu_decode.tile_bitstreams(blobs, page.jpegtables, page.photometric)
        for stream, ref in zip(streams, refs, strict=True):
            assert stream[:2] == gpu_decode.SOI
            np.testing.assert_array_equal(imagecodecs.jpeg_decode(stream)[..., :3], ref[..., :3])


def test_splice_decodes_like_tifffile_on_aperio_svs() -> None:
    """Aperio tiles are RGB-coded without JFIF: the Adobe marker is what makes colours right."""
    path = shared_file("slides", "CMU-1-Small-Region.svs")
    _assert_spliced_decode_equals_tifffile(path)
    import imagecodecs

    tif, page, blobs, refs = _page_tiles(path, 1)
    with tif:
        plain = imagecodecs.jpeg_decode(gpu_decode.splice_jpeg_tables(blobs[0], page.jpegtables))
        assert np.abs(plain.astype(int) - refs[0].astype(int)).max() > 16  # unmarked = wrong colours


def _segments(stream: bytes) -> list[tuple[int, bytes]]:
    i, out = 2, []
    while i < len(stream):
        marker = stream[i + 1]
        if marker == 0xDA:  # scan: the rest up to EOI
            return [*out, (marker, stream[i:-2])]
        length = struct.unpack(">H", stream[i + 2 : i + 4])[0]
        out.append((marker, stream[i : i + 2 + length]))
        i += 2 + length
    return out


def test_splice_decodes_like_tifffile_on_synthetic_jpegtables_tiff(tmp_path: Path) -> None:
    """A TIFF written with shared JPEGTables and abbreviated tiles, as scanners write them."""
    import imagecodecs
    import tifffile

    rng = np.random.default_rng(5)
    img = np.clip(np.cumsum(rng.integers(0, 9, (128, 128, 3)), axis=1), 0, 255).astype(np.uint8)
    tables_seg, tiles = b"", []
    for ty in range(2):
        for tx in range(2):
            full = imagecodecs.jpeg_encode(img[ty * 64 : ty * 64 + 64, tx * 64 : tx * 64 + 64], level=90)
            segs = _segments(full)
            tables_seg = b"".join(s for m, s in segs if m in (0xDB, 0xC4))
            tiles.append(gpu_decode.SOI + b"".join(s for m, s in segs if m not in (0xDB, 0xC4)) + gpu_decode.EOI)
    jpegtables = gpu_decode.SOI + tables_seg + gpu_decode.EOI
    path = tmp_path / "tables.tif"
    tifffile.imwrite(
        path, iter(tiles), shape=img.shape, dtype=np.uint8, tile=(64, 64), compression="jpeg",
        photometric="rgb", extratags=[(347, 7, len(jpegtables), jpegtables, True)],
    )
    _assert_spliced_decode_equals_tifffile(path)
    with pytest.raises(RuntimeError):
        imagecodecs.jpeg_decode(tiles[0])  # abbreviated alone: no tables, not decodable


def test_splice_without_tables_and_bad_input() -> None:
    tile = gpu_decode.SOI + b"\xff\xc0rest" + gpu_decode.EOI
    assert gpu_decode.splice_jpeg_tables(tile, None) == tile
    assert gpu_decode.splice_jpeg_tables(tile, None, rgb=True)[2:18] == gpu_decode.ADOBE_RGB
    with pytest.raises(ValueError):
        gpu_decode.splice_jpeg_tables(b"notjpeg", None)
    ok, why = gpu_decode.gpu_decode_available()
    assert isinstance(ok, bool) and why


@gpu
@needs_gpu
def test_gpu_decode_matches_cpu_decode_of_aperio_tiles() -> None:
    ok, why = gpu_decode.gpu_decode_available()
    if not ok:
        pytest.skip(why)
    import cupy

    tif, page, blobs, _ = _page_tiles(shared_file("slides", "CMU-1-Small-Region.svs"))
    with tif:
        cpu = gpu_decode.decode_jpeg_tiles_cpu(blobs, page.jpegtables, photometric=page.photometric)
        dev = cupy.asnumpy(gpu_decode.decode_jpeg_tiles_gpu(blobs, page.jpegtables, photometric=page.photometric))
    assert dev.shape == cpu.shape
    diff = np.abs(dev.astype(int) - cpu.astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 16  # nvJPEG and libjpeg-turbo IDCTs differ slightly


# -- CUDA sources compile (wherever nvcc is) -----------------------------------------------------------


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", KERNELS, ids=[p.name for p in KERNELS])
@pytest.mark.parametrize("define", ["", "-DGPUBATCH_NO_FP16_HEADER"])
def test_kernel_compiles_to_ptx(source: Path, arch: str, define: str, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    from gpubatch.ops.kernels_gpu import kernel_source

    inlined = tmp_path / source.name  # what NVRTC compiles: local includes inlined, no include path
    inlined.write_text(kernel_source(source.name))
    out = tmp_path / f"{source.stem}.ptx"
    cmd = [nvcc, "--ptx", f"-arch={arch}", *([define] if define else []), str(inlined), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert ".entry" in out.read_text()


@pytest.mark.gpu
@needs_gpu
def test_run_on_gpu_uses_the_device_stage(tmp_path: Path, slide_path: Path, classifier: Path) -> None:
    """A whole run with a CUDA model goes through the fused-kernel stage: transfer is timed apart."""
    from conftest import slide_job, write_job

    import gpubatch

    job = slide_job([str(slide_path)], classifier, tmp_path / "out")
    cpu_job = slide_job([str(slide_path)], classifier, tmp_path / "cpu")
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    os.environ["GPUBATCH_ORT_PROVIDERS"] = "CPUExecutionProvider"
    try:
        cpu = gpubatch.run(write_job(tmp_path / "cpu.yaml", cpu_job))
    finally:
        del os.environ["GPUBATCH_ORT_PROVIDERS"]
    assert result.report["parts"].get("transfer", 0) > 0
    a, b = result.predictions(), cpu.predictions()
    np.testing.assert_allclose(a.filter(like="probs").to_numpy(), b.filter(like="probs").to_numpy(), atol=1e-3)


# -- GPU JPEG decode wired into the slide reader (tiles.decoder: gpu) -----------------------------------


def test_gpu_decoder_refused_clearly_without_a_device(slide_path: Path) -> None:
    from gpubatch.sources.slides.open import open_slide

    if gpu_available():
        pytest.skip("a GPU is present: the refusal path is for GPU-less machines")
    backend = open_slide(str(slide_path), StageClocks())
    try:
        with pytest.raises(GpubatchError, match="tiles.decoder: gpu.*(no CUDA device|not importable)"):
            backend.use_gpu_decode()
    finally:
        backend.close()


@gpu
@needs_gpu
def test_gpu_decoder_reads_the_same_pixels_as_the_host(slide_path: Path) -> None:
    from gpubatch.sources.slides.gpu_decode import gpu_decode_available
    from gpubatch.sources.slides.open import open_slide

    ok, why = gpu_decode_available()
    if not ok:
        pytest.skip(why)
    boxes = np.array([[0, 0, 512, 512], [256, 256, 512, 512]])
    host, device = open_slide(str(slide_path), StageClocks()), open_slide(str(slide_path), StageClocks())
    try:
        device.use_gpu_decode()
        want, got = host.read_boxes(0, boxes, StageClocks()), device.read_boxes(0, boxes, StageClocks())
        assert np.abs(want.astype(int) - got.astype(int)).mean() < 1.0  # JPEG decoders may round apart
    finally:
        host.close()
        device.close()
