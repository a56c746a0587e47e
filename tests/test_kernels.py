"""Array kernels: numpy twins against plain-loop references (always), CuPy kernels against the twins (gpu).

The loop references spell out the documented semantics one element at a time, independently of
the vectorised twins; the GPU kernels must then equal the twins exactly (float32 bit for bit, float16
through the same round-to-nearest-even), which is what lets the device stage switch paths silently.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import gpu_missing

from gpubatch.ops import kernels, kernels_gpu

gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(gpu_missing() is not None, reason=gpu_missing() or "")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
COMPLEMENT = {0: 3, 1: 2, 2: 1, 3: 0}


def _tiles(rng: np.random.Generator, n: int = 3, h: int = 5, w: int = 4, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _codes(rng: np.random.Generator, n: int = 4, length: int = 17) -> np.ndarray:
    return rng.integers(0, 5, size=(n, length), dtype=np.uint8)


# -- plain loop references -------------------------------------------------------------------


def normalize_loop(tiles: np.ndarray, mean, std, layout: str) -> np.ndarray:
    n, h, w, c = tiles.shape
    out = np.zeros((n, c, h, w) if layout == "NCHW" else (n, h, w, c), dtype=np.float64)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                for k in range(c):
                    v = (tiles[i, y, x, k] / 255.0 - mean[k]) / std[k]
                    if layout == "NCHW":
                        out[i, k, y, x] = v
                    else:
                        out[i, y, x, k] = v
    return out


def one_hot_loop(codes: np.ndarray, layout: str, n_value: float, rc: bool) -> np.ndarray:
    n, length = codes.shape
    out = np.zeros((n, length, 4), dtype=np.float64)
    for i in range(n):
        for pos in range(length):
            code = int(codes[i, length - 1 - pos]) if rc else int(codes[i, pos])
            if code >= 4:
                out[i, pos, :] = n_value
            else:
                out[i, pos, COMPLEMENT[code] if rc else code] = 1.0
    return out.transpose(0, 2, 1) if layout == "NCL" else out


def tissue_loop(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    result = []
    for x0, y0, x1, y1 in boxes.tolist():
        x0, y0 = min(max(x0, 0), w), min(max(y0, 0), h)
        x1, y1 = min(max(max(x1, x0 + 1), 0), w), min(max(max(y1, y0 + 1), 0), h)
        count = sum(bool(mask[y, x]) for y in range(y0, y1) for x in range(x0, x1))
        result.append(count / max((x1 - x0) * (y1 - y0), 1))
    return np.array(result)


def _boxes(rng: np.random.Generator, h: int, w: int, k: int = 40) -> np.ndarray:
    """Random boxes plus the edge cases: outside, zero-size, inverted, covering everything."""
    x0 = rng.integers(-5, w + 5, size=k)
    y0 = rng.integers(-5, h + 5, size=k)
    boxes = np.stack([x0, y0, x0 + rng.integers(-2, 12, size=k), y0 + rng.integers(-2, 12, size=k)], 1)
    edge = [[0, 0, w, h], [w, h, w + 3, h + 3], [-9, -9, -1, -1], [3, 3, 3, 3], [4, 4, 2, 2], [0, 0, 1, 1]]
    return np.concatenate([boxes, np.array(edge)]).astype(np.int32)


# -- numpy twins vs loops (always run) --------------------------------------------------------


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_normalize_twin_matches_loop(layout: str, dtype: type) -> None:
    tiles = _tiles(np.random.default_rng(1))
    got = kernels.normalize_tiles(tiles, MEAN, STD, layout, dtype)
    want = normalize_loop(tiles, MEAN, STD, layout)
    assert got.dtype == np.dtype(dtype) and got.shape == want.shape
    tol = 1e-5 if dtype is np.float32 else 2e-3
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["NLC", "NCL"])
@pytest.mark.parametrize("n_value", [0.0, 0.25])
@pytest.mark.parametrize("rc", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_one_hot_twin_matches_loop(layout: str, n_value: float, rc: bool, dtype: type) -> None:
    codes = _codes(np.random.default_rng(2))
    got = kernels.one_hot(codes, layout, n_value, dtype, rc)
    assert got.dtype == np.dtype(dtype) and got.flags.c_contiguous
    np.testing.assert_array_equal(got.astype(np.float64), one_hot_loop(codes, layout, n_value, rc).astype(dtype))
    buffer = np.full(got.shape if layout == "NLC" else (len(codes), codes.shape[1], 4), 9, dtype=dtype)
    again = kernels.one_hot(codes, layout, n_value, dtype, rc, out=buffer)
    assert (again is buffer) == (layout == "NLC")
    np.testing.assert_array_equal(again, got)


def test_normalize_tiles_writes_into_a_fitting_buffer() -> None:
    tiles = np.random.default_rng(4).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    fresh = kernels.normalize_tiles(tiles, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    buffer = np.full_like(fresh, 7.0)
    assert kernels.normalize_tiles(tiles, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), out=buffer) is buffer
    np.testing.assert_array_equal(buffer, fresh)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_normalize_tiles_equals_one_broadcast_bit_for_bit(layout: str) -> None:
    """Whole rows against the repeated scale (NHWC) give exactly the one-broadcast result, as NCHW
    does, for a strided input; an output buffer that is not contiguous is not written into."""
    tiles = _tiles(np.random.default_rng(6), n=11, h=37, w=29, c=3)[:, ::2]
    std = np.asarray(STD, dtype=np.float32)
    scale, offset = (1.0 / (255.0 * std)).astype(np.float32), (-np.asarray(MEAN, np.float32) / std).astype(np.float32)
    src, shape = (tiles.transpose(0, 3, 1, 2), (1, -1, 1, 1)) if layout == "NCHW" else (tiles, (1, 1, 1, -1))
    want = np.multiply(src, scale.reshape(shape)) + offset.reshape(shape)
    np.testing.assert_array_equal(kernels.normalize_tiles(tiles, MEAN, STD, layout), want)
    strided = np.zeros((2 * want.shape[0], *want.shape[1:]), np.float32)[::2]  # not contiguous: not reused
    got = kernels.normalize_tiles(tiles, MEAN, STD, layout, out=strided)
    assert got is not strided and not strided.any()
    np.testing.assert_array_equal(got, want)


def test_encode_dna_codes_by_hand() -> None:
    assert kernels.encode_dna("ACGTNacgtR-").tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4]


def test_encode_dna_drops_line_breaks_in_the_same_pass() -> None:
    fasta_lines = b"ACGTN\nacgtR\r\nYs-\n"
    assert kernels.encode_dna(fasta_lines, delete=b"\r\n").tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4, 4, 4]
    every_byte = bytes(range(256))
    by_loop = [{"A": 0, "C": 1, "G": 2, "T": 3}.get(chr(b).upper(), 4) for b in every_byte]
    assert kernels.encode_dna(every_byte).tolist() == by_loop


@pytest.mark.parametrize("offsets", [[0, 10, 20, 30], [3], [2, 4], [0, 3, 9], [5, 5, 7], [], [0, 10, 95], [95]])
@pytest.mark.parametrize("length", [1, 5])
def test_window_rows_equal_one_copy_per_window(offsets: list[int], length: int) -> None:
    seq = np.random.default_rng(1).integers(0, 5, 100).astype(np.uint8)
    rows = kernels.window_rows(seq, np.array(offsets, dtype=np.int64), length)
    by_loop = np.array([seq[o : o + length] for o in offsets], dtype=np.uint8).reshape(len(offsets), length)
    np.testing.assert_array_equal(rows, by_loop)


def test_window_rows_view_evenly_spaced_windows_read_only() -> None:
    seq = np.arange(50, dtype=np.uint8)
    rows = kernels.window_rows(seq, np.arange(0, 40, 7), 10)
    assert np.shares_memory(rows, seq) and not rows.flags.writeable
    with pytest.raises(IndexError):
        kernels.window_rows(seq, np.array([0, 45]), 10)  # past the end: refused, never read beyond


def test_reverse_complement_of_encoded_sequence() -> None:
    codes = kernels.encode_dna("ACGTNacgtR")[None, :]
    assert kernels.reverse_complement_codes(codes).tolist() == [[4, 0, 1, 2, 3, 4, 0, 1, 2, 3]]


def test_tissue_fraction_twin_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((23, 31)) > 0.6
    boxes = _boxes(rng, *mask.shape)
    np.testing.assert_allclose(kernels.tissue_fraction(mask, boxes), tissue_loop(mask, boxes), rtol=0, atol=1e-12)


# -- sources and names (always run) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("normalize.cu", [f"normalize_{lay}_{dt}" for lay in ("nchw", "nhwc") for dt in ("f32", "f16")]),
        ("onehot.cu", [f"onehot_{lay}_{dt}" for lay in ("nlc", "ncl") for dt in ("f32", "f16")]),
        ("tissue.cu", ["tissue_fraction"]),
    ],
)
def test_kernel_sources_define_the_entry_points_the_loader_calls(source: str, names: list[str]) -> None:
    text = kernels_gpu.kernel_source(source)
    assert "<cuda_fp16.h>" in text or source == "tissue.cu"
    for name in names:
        assert re.search(rf"\b{name}\b", text), f"{name} missing from {source}"


def test_gpu_available_is_a_bool_without_raising() -> None:
    assert isinstance(kernels_gpu.gpu_available(), bool)


# -- CuPy kernels vs numpy twins (gpu) ----------------------------------------------------------


@gpu
@needs_gpu
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_normalize_equals_twin(layout: str, dtype: type) -> None:
    import cupy

    tiles = _tiles(np.random.default_rng(4), n=5, h=37, w=29, c=3)
    got = kernels_gpu.normalize_tiles(cupy.asarray(tiles), MEAN, STD, layout, dtype)
    np.testing.assert_array_equal(cupy.asnumpy(got), kernels.normalize_tiles(tiles, MEAN, STD, layout, dtype))


@gpu
@needs_gpu
def test_gpu_normalize_writes_into_out_buffer() -> None:
    import cupy

    tiles = cupy.asarray(_tiles(np.random.default_rng(5), n=2, h=8, w=8))
    out = cupy.empty((2, 3, 8, 8), dtype=np.float32)
    assert kernels_gpu.normalize_tiles(tiles, MEAN, STD, "NCHW", np.float32, out=out) is out
    with pytest.raises(ValueError):
        kernels_gpu.normalize_tiles(tiles, MEAN, STD, "NHWC", np.float32, out=out)


@gpu
@needs_gpu
@pytest.mark.parametrize("layout", ["NLC", "NCL"])
@pytest.mark.parametrize("n_value", [0.0, 0.25])
@pytest.mark.parametrize("rc", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_one_hot_equals_twin(layout: str, n_value: float, rc: bool, dtype: type) -> None:
    import cupy

    codes = _codes(np.random.default_rng(6), n=7, length=1001)
    got = kernels_gpu.one_hot(cupy.asarray(codes), layout, n_value, dtype, rc)
    np.testing.assert_array_equal(cupy.asnumpy(got), kernels.one_hot(codes, layout, n_value, dtype, rc))


@gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(23, 31), (300, 517)])
def test_gpu_tissue_fraction_equals_twin(shape: tuple[int, int]) -> None:
    import cupy

    rng = np.random.default_rng(7)
    mask = rng.random(shape) > 0.5
    boxes = _boxes(rng, *shape, k=200)
    got = kernels_gpu.tissue_fraction(cupy.asarray(mask), cupy.asarray(boxes))
    np.testing.assert_array_equal(cupy.asnumpy(got), kernels.tissue_fraction(mask, boxes).astype(np.float32))
