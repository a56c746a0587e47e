"""CuPy path of the array kernels: the fused CUDA sources in kernels/*.cu behind numpy's signatures.

Each function here has a numpy twin in ``gpubatch.ops.kernels`` with the same arguments and the same
results (bit for bit for float32; float16 is the same round-to-nearest-even conversion), so the
device stage can switch between host and device without the callers knowing. Inputs and outputs
are CuPy arrays; nothing here copies to or from the host.

The sources ship inside the wheel as the package ``gpubatch._kernels`` (the top-level kernels/
folder, mapped in pyproject); a source checkout falls back to ``<repo>/kernels``. Compiled modules
are cached per process (and by CuPy on disk), so NVRTC runs once per kernel file per machine.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: package that holds the .cu files in an installed wheel
KERNEL_PACKAGE = "gpubatch._kernels"
#: NVRTC define that avoids <cuda_fp16.h> where the header cannot be compiled (see normalize.cu)
NO_FP16_HEADER = "-DGPUBATCH_NO_FP16_HEADER"
_BLOCK = 256
_MAX_GRID = 65535 * 4

_MODULES: dict[str, Any] = {}
_CONSTANTS: dict[tuple[Any, ...], Any] = {}
_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device; any failure means no GPU."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:  # noqa: BLE001 - missing driver, no device, broken install: all "no GPU"
        return False


_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)


def kernel_source(name: str) -> str:
    """Text of one kernels/*.cu file with its local ``#include "x.cuh"`` lines inlined, so NVRTC
    needs no include path; from the installed package or else the source checkout."""
    return _INCLUDE.sub(lambda m: _raw_source(m.group(1)), _raw_source(name))


def _raw_source(name: str) -> str:
    try:
        resource = importlib.resources.files(KERNEL_PACKAGE).joinpath(name)
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
        pass
    path = Path(__file__).resolve().parents[2] / "kernels" / name
    if not path.is_file():
        raise FileNotFoundError(f"CUDA kernel source {name} not found in {KERNEL_PACKAGE} or {path.parent}")
    return path.read_text(encoding="utf-8")


def _module(name: str) -> Any:
    """Compiled RawModule for one .cu file, compiled once per process (per current device)."""
    import cupy

    key = f"{cupy.cuda.runtime.getDevice()}:{name}"
    with _LOCK:
        module = _MODULES.get(key)
        if module is None:
            module = _compile(cupy, kernel_source(name))
            _MODULES[key] = module
        return module


def _compile(cupy: Any, source: str) -> Any:
    """Compile with <cuda_fp16.h>; retry without it when this NVRTC cannot compile that header."""
    try:
        module = cupy.RawModule(code=source, options=("--std=c++14",))
        module.compile()
        return module
    except cupy.cuda.compiler.CompileException:
        module = cupy.RawModule(code=source, options=("--std=c++14", NO_FP16_HEADER))
        module.compile()
        return module


def _grid(total: int) -> tuple[int]:
    return (max(1, min((total + _BLOCK - 1) // _BLOCK, _MAX_GRID)),)


def _suffix(dtype: np.dtype | type) -> str:
    dt = np.dtype(dtype)
    if dt == np.float32:
        return "f32"
    if dt == np.float16:
        return "f16"
    raise ValueError(f"GPU kernels write float32 or float16, not {dt}")


def _scale_offset(mean: Sequence[float], std: Sequence[float]) -> tuple[Any, Any]:
    """Per-channel scale and offset on the device, computed on the host exactly as the twin does."""
    import cupy

    key = (cupy.cuda.runtime.getDevice(), tuple(map(float, mean)), tuple(map(float, std)))
    cached = _CONSTANTS.get(key)
    if cached is None:
        std_arr = np.asarray(std, dtype=np.float32)
        scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
        offset = (-np.asarray(mean, dtype=np.float32) / std_arr).astype(np.float32)
        cached = (cupy.asarray(scale), cupy.asarray(offset))
        # the upload is asynchronous on the current stream and may still be in flight when this
        # returns; a stage on another stream (another thread's) would then read it unfinished
        cupy.cuda.get_current_stream().synchronize()
        _CONSTANTS[key] = cached
    return cached


def normalize_tiles(
    tiles: Any,
    mean: Sequence[float],
    std: Sequence[float],
    layout: str = "NCHW",
    dtype: np.dtype | type = np.float32,
    out: Any | None = None,
) -> Any:
    """uint8 (N, H, W, C) CuPy tiles -> (x / 255 - mean) / std in NCHW or NHWC, one fused kernel.

    ``out`` lets the device stage reuse one preallocated buffer per slot instead of allocating a
    batch-sized array for every batch.
    """
    import cupy

    if tiles.dtype != np.uint8 or tiles.ndim != 4:
        raise ValueError(f"expected uint8 (N, H, W, C) tiles, got {tiles.dtype} {tiles.shape}")
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be NCHW or NHWC, not {layout!r}")
    n, h, w, c = tiles.shape
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values, got {len(mean)} and {len(std)}")
    shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
    out = _check_out(out, shape, dtype) if out is not None else cupy.empty(shape, dtype=dtype)
    src = cupy.ascontiguousarray(tiles)
    scale, offset = _scale_offset(mean, std)
    kernel = _module("normalize.cu").get_function(f"normalize_{layout.lower()}_{_suffix(dtype)}")
    kernel(_grid(src.size), (_BLOCK,), (src, out, scale, offset, np.int64(n), np.int64(h * w), np.int32(c)))
    return out


def one_hot(
    codes: Any,
    layout: str = "NLC",
    n_value: float = 0.0,
    dtype: np.dtype | type = np.float32,
    reverse_complement: bool = False,
    out: Any | None = None,
) -> Any:
    """uint8 codes (N, L) on the device -> one-hot (N, L, 4) or (N, 4, L); N -> n_value everywhere.

    The reverse complement is read on the fly by the kernel, so the reverse strand costs no
    extra array or pass.
    """
    import cupy

    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"expected uint8 (N, L) codes, got {codes.dtype} {codes.shape}")
    if layout not in ("NLC", "NCL"):
        raise ValueError(f"layout must be NLC or NCL, not {layout!r}")
    n, length = codes.shape
    shape = (n, length, 4) if layout == "NLC" else (n, 4, length)
    out = _check_out(out, shape, dtype) if out is not None else cupy.empty(shape, dtype=dtype)
    src = cupy.ascontiguousarray(codes)
    kernel = _module("onehot.cu").get_function(f"onehot_{layout.lower()}_{_suffix(dtype)}")
    args = (src, out, np.int64(n), np.int64(length), np.float32(n_value), np.int32(bool(reverse_complement)))
    kernel(_grid(src.size), (_BLOCK,), args)
    return out


def tissue_fraction(mask: Any, boxes: Any) -> Any:
    """Fraction of nonzero mask pixels in each (x0, y0, x1, y1) box: float32 (K,), one block per box.

    Same box semantics as the numpy twin (boxes clipped to the mask, at least 1 px wide and high);
    the mask counts nonzero pixels, which equals the twin for boolean or 0/1 masks.
    """
    import cupy

    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    m = cupy.ascontiguousarray(mask if mask.dtype == np.uint8 else (mask != 0).astype(np.uint8))
    b = cupy.ascontiguousarray(cupy.asarray(boxes, dtype=np.int32).reshape(-1, 4))
    k = int(b.shape[0])
    out = cupy.zeros((k,), dtype=np.float32)
    if k:
        kernel = _module("tissue.cu").get_function("tissue_fraction")
        h, w = m.shape
        kernel((k,), (_BLOCK,), (m, np.int32(h), np.int32(w), b, np.int32(k), out))
    return out


def _check_out(out: Any, shape: tuple[int, ...], dtype: np.dtype | type) -> Any:
    if tuple(out.shape) != tuple(shape) or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {np.dtype(dtype)} {shape}, got {out.dtype} {out.shape}")
    return out
