"""Array kernels of the device stage: numpy reference implementations.

Items travel as uint8 and become float only here, on the device stage: 4x less data through
queues and host-to-device copies than float32. The CuPy path (``gpubatch.ops.kernels_gpu``) runs the
fused CUDA sources in kernels/*.cu behind the same signatures; these numpy twins are the reference
its tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: uint8 base codes; anything else (N, IUPAC ambiguity codes) is code 4
BASE_CODES = {"A": 0, "C": 1, "G": 2, "T": 3, "N": 4}
_ASCII_TO_CODE = np.full(256, 4, dtype=np.uint8)
for _base, _code in (("A", 0), ("C", 1), ("G", 2), ("T", 3)):
    _ASCII_TO_CODE[ord(_base)] = _code
    _ASCII_TO_CODE[ord(_base.lower())] = _code
_ASCII_TO_CODE_TABLE = _ASCII_TO_CODE.tobytes()
COMPLEMENT_CODES = np.array([3, 2, 1, 0, 4], dtype=np.uint8)


def normalize_tiles(
    tiles: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    layout: str = "NCHW",
    dtype: np.dtype | type = np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 (N, H, W, C) -> float (x / 255 - mean) / std in NCHW or NHWC.

    /255, -mean and /std are folded into one scale and one offset per channel: one multiply and
    one add over the batch. NCHW broadcasts them over the transposed view. NHWC treats each image
    row as one run of W*C values against the scale and offset repeated W times: broadcast
    against the C channels alone, numpy's inner loop was C (3) long and the step took 4x as long
    (bench/bench_preprocess.py). ``out`` (float32, the result's shape, contiguous) is reused when
    given: a fresh 20 MB batch per call costs page faults on every batch.
    """
    if tiles.dtype != np.uint8 or tiles.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) tiles, got {tiles.dtype} {tiles.shape}")
    std_arr = np.asarray(std, dtype=np.float32)
    scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
    offset = (-np.asarray(mean, dtype=np.float32) / std_arr).astype(np.float32)
    n, h, w, c = tiles.shape
    shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    if out is None or out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        out = np.empty(shape, dtype=np.float32)
    if layout == "NCHW":
        np.multiply(tiles.transpose(0, 3, 1, 2), scale.reshape(1, -1, 1, 1), out=out)
        out += offset.reshape(1, -1, 1, 1)
    else:
        rows = out.reshape(n * h, w * c)
        np.multiply(tiles.reshape(n * h, w * c), np.tile(scale, w), out=rows)
        rows += np.tile(offset, w)
    return out if np.dtype(dtype) == np.float32 else out.astype(dtype)


def encode_dna(seq: bytes | str, delete: bytes = b"") -> np.ndarray:
    """ASCII sequence -> read-only uint8 codes A=0 C=1 G=2 T=3, anything else 4 (N); the bytes in
    ``delete`` (a FASTA read's line breaks) are dropped in the same pass.

    One ``bytes.translate`` through a 256-byte table: a C loop over the bytes. numpy's
    ``table[codes]`` first casts every byte to an 8-byte index, an 8 MB temporary per megabase
    that the allocator maps and the kernel zeroes on every read (2-3x slower in a worker).
    """
    raw = seq.encode() if isinstance(seq, str) else seq
    return np.frombuffer(raw.translate(_ASCII_TO_CODE_TABLE, delete), dtype=np.uint8)


def window_rows(seq: np.ndarray, offsets: np.ndarray, length: int) -> np.ndarray:
    """(n, length) windows of a 1-D ``seq`` starting at ``offsets``: a read-only strided view of
    ``seq`` when the offsets are evenly spaced (tiled windows), a copy otherwise.

    The view is free; the batch assembly's concatenation, or the one-hot that reads it, is then
    the windows' only copy where fancy indexing made two.
    """
    n, step = len(offsets), int(offsets[1] - offsets[0]) if len(offsets) > 1 else 1
    even = n > 0 and step > 0 and (n < 3 or bool(np.all(np.diff(offsets) == step)))
    if even and offsets[0] >= 0 and int(offsets[0]) + step * (n - 1) + length <= len(seq):
        unit = seq.strides[0]
        return np.lib.stride_tricks.as_strided(seq[int(offsets[0]):], shape=(n, length),
                                               strides=(step * unit, unit), writeable=False)
    return np.lib.stride_tricks.sliding_window_view(seq, length)[offsets]


def reverse_complement_codes(codes: np.ndarray) -> np.ndarray:
    """Reverse complement of uint8 codes along the last axis (N stays N)."""
    return COMPLEMENT_CODES[codes[..., ::-1]]


def one_hot(
    codes: np.ndarray,
    layout: str = "NLC",
    n_value: float = 0.0,
    dtype: np.dtype | type = np.float32,
    reverse_complement: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """uint8 codes (N, L) -> one-hot (N, L, 4) or (N, 4, L); N (code 4) becomes n_value everywhere.

    ``out`` is reused for the NLC layout when its shape and dtype fit (the gather writes into it).
    """
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"expected uint8 (N, L) codes, got {codes.dtype} {codes.shape}")
    if reverse_complement:
        codes = reverse_complement_codes(codes)
    table = np.zeros((5, 4), dtype=dtype)
    table[np.arange(4), np.arange(4)] = 1
    table[4, :] = n_value
    fits = layout == "NLC" and out is not None and out.shape == (*codes.shape, 4) and out.dtype == table.dtype
    # codes above 4 clip to N; a table gather is 10x faster than table[codes]
    encoded = np.take(table, codes, axis=0, mode="clip", out=out if fits else None)
    return np.ascontiguousarray(encoded.transpose(0, 2, 1)) if layout == "NCL" else encoded


def tissue_fraction(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Fraction of True pixels of a 2-D mask inside each box (x0, y0, x1, y1), via an integral image."""
    # int32 and in place: a 1024-px mask's integral is 4 MB, where int64 plus a temporary was 16
    # MB on every slide open.
    dtype = np.int32 if mask.size < 2**31 else np.int64
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=dtype)
    inner = integral[1:, 1:]
    np.cumsum(mask, axis=1, dtype=dtype, out=inner)
    # down the columns a row at a time: numpy's cumsum over axis 0 walks memory with a row's
    # stride in its inner loop, 5x slower on a 1024-px mask (10 against 2 ms per slide)
    for row in range(1, inner.shape[0]):
        np.add(inner[row], inner[row - 1], out=inner[row])
    h, w = mask.shape
    x0 = np.clip(boxes[:, 0], 0, w)
    y0 = np.clip(boxes[:, 1], 0, h)
    x1 = np.clip(np.maximum(boxes[:, 2], x0 + 1), 0, w)
    y1 = np.clip(np.maximum(boxes[:, 3], y0 + 1), 0, h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return total / area
