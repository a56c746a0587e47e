"""Tables through cuDF on a GPU machine with the gpu extra, pandas everywhere else.

Prediction tables (one row per tile or window) are assembled, concatenated and read back in the
same few ways everywhere; routing those few calls through this module lets a GPU worker keep them
in device memory (cuDF) without every caller importing cuDF conditionally. The result of
``to_pandas`` is always pandas, so reports and tests see one type. ``GPUBATCH_TABLES=pandas``
forces pandas (for comparing the paths, or when cuDF misbehaves).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd


@functools.lru_cache(maxsize=1)
def _cudf() -> Any | None:
    """The cudf module when it imports and a GPU is visible, else None (decided once)."""
    if os.environ.get("GPUBATCH_TABLES", "").lower() == "pandas":
        return None
    from gpubatch.kernels_gpu import gpu_available

    if not gpu_available():
        return None
    try:
        import cudf
    except Exception:  # noqa: BLE001 - a broken cuDF install must not break the CPU path
        return None
    return cudf


def backend() -> str:
    """'cudf' or 'pandas': which library the functions below use in this process."""
    return "cudf" if _cudf() is not None else "pandas"


def _lib() -> Any:
    return _cudf() or pd


def DataFrame(data: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:  # noqa: N802 - mirrors pd.DataFrame
    """A frame from columns (numpy, CuPy or lists) in the active library."""
    return _lib().DataFrame(data, **kwargs)


def read_parquet(path: str, columns: Sequence[str] | None = None, **kwargs: Any) -> Any:
    """Read a parquet file or directory into the active library's frame."""
    cols = list(columns) if columns is not None else None
    return _lib().read_parquet(path, columns=cols, **kwargs)


def concat(frames: Sequence[Any], ignore_index: bool = True) -> Any:
    """Concatenate frames row-wise; pandas frames are moved to cuDF first when cuDF is active."""
    lib = _lib()
    if lib is not pd:
        frames = [lib.from_pandas(f) if isinstance(f, pd.DataFrame) else f for f in frames]
    return lib.concat(list(frames), ignore_index=ignore_index)


def from_pandas(frame: pd.DataFrame) -> Any:
    cudf = _cudf()
    return cudf.from_pandas(frame) if cudf is not None else frame


def to_pandas(frame: Any) -> pd.DataFrame:
    """Always a pandas frame, whichever library made ``frame``."""
    if isinstance(frame, pd.DataFrame):
        return frame
    return frame.to_pandas()
