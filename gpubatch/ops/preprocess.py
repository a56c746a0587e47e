"""What turns a batch of uint8 items into the model's input: one declaration, two derived paths.

A reader declares a :class:`Preprocess` value (normalise tiles, or one-hot encode DNA, with its
settings); the host path (numpy kernels) and the GPU path (the fused CUDA kernels through CuPy)
are both derived from that one value, so they cannot disagree. Items travel as uint8 until here:
4x less data through queues and host-to-device copies than float32.

DNA items may be variant pairs, (k, 2, L) ref then alt codes, which the model sees as one batch
of 2k rows (all refs, then all alts); with ``both_strands`` every row is followed, as a second
half of the batch, by its reverse complement. The model input then has ``rows_per_item`` rows per
item, and the reader folds the outputs back (``ShardReader.from_model_output``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gpubatch.core.errors import GpubatchError
from gpubatch.ops import kernels

TILE_LAYOUTS = ("NCHW", "NHWC")
DNA_LAYOUTS = ("NLC", "NCL")


@dataclass(frozen=True)
class Preprocess:
    """The settings of the uint8 -> float step; the same value drives host and device."""

    kind: str = "tiles"  # tiles | dna
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"  # tiles: NCHW | NHWC; dna: NLC | NCL
    n_value: float = 0.0
    #: dna: reverse-complement every row (a whole batch of minus-strand windows)
    reverse_complement: bool = False
    #: dna: items are (k, 2, L) ref/alt pairs; the model sees [all refs; all alts]
    pairs: bool = False
    #: dna: the model also sees every row's reverse complement, as the second half of the batch
    both_strands: bool = False
    dtype: str = "float32"  # float32 | float16

    def __post_init__(self) -> None:
        allowed = TILE_LAYOUTS if self.kind == "tiles" else DNA_LAYOUTS if self.kind == "dna" else ()
        if not allowed:
            raise GpubatchError(f"preprocess kind must be 'tiles' or 'dna', not {self.kind!r}")
        if self.layout not in allowed:
            raise GpubatchError(f"{self.kind} layout must be one of {allowed}, not {self.layout!r}")
        if np.dtype(self.dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise GpubatchError(f"model input dtype must be float32 or float16, not {self.dtype}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def rows_per_item(self) -> int:
        """Model-input rows per item: 2 for variant pairs, twice that again for both strands."""
        return (2 if self.pairs else 1) * (2 if self.both_strands else 1)

    def with_dtype(self, dtype: Any) -> Preprocess:
        """The same step producing ``dtype`` (the model's own input type decides it)."""
        return replace(self, dtype=str(np.dtype(dtype)))

    def _rows(self, items: Any, xp: Any) -> Any:
        """DNA codes as the model's rows: pairs unstacked, reverse complements appended."""
        codes = xp.concatenate([items[:, 0], items[:, 1]]) if self.pairs else items
        if self.both_strands:
            complement = xp.asarray(kernels.COMPLEMENT_CODES)
            codes = xp.concatenate([codes, complement[codes[:, ::-1]]])
        return xp.ascontiguousarray(codes)

    def on_host(self, items: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The numpy path (reference semantics); ``out`` is reused when its shape and dtype fit."""
        if self.kind == "tiles":
            return kernels.normalize_tiles(items, self.mean, self.std, self.layout, self.np_dtype, out=out)
        return kernels.one_hot(self._rows(items, np), self.layout, self.n_value, self.np_dtype,
                               self.reverse_complement, out=out)

    def on_device(self, items: Any, out: Any | None = None) -> Any:
        """The CuPy path, same results; ``out`` reuses a slot's preallocated buffer."""
        import cupy

        from gpubatch.ops import kernels_gpu

        if self.kind == "tiles":
            return kernels_gpu.normalize_tiles(items, self.mean, self.std, self.layout, self.np_dtype, out=out)
        return kernels_gpu.one_hot(self._rows(items, cupy), self.layout, self.n_value, self.np_dtype,
                                   self.reverse_complement, out=out)

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Model-input shape for a batch of items of ``shape``."""
        if self.kind == "tiles":
            n, h, w, c = shape
            return (n, c, h, w) if self.layout == "NCHW" else (n, h, w, c)
        n, length = shape[0] * self.rows_per_item, shape[-1]
        return (n, length, 4) if self.layout == "NLC" else (n, 4, length)
