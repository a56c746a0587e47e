"""Array kernels for track outputs: (N, bins, tracks) per item, as Enformer, Borzoi, gReLU,
baskerville and CREsted models predict them.

Pure numpy on host arrays of one batch, so memory is bounded by the batch: a worker reduces its
outputs here before they reach the writer, and nothing of shape (N, bins, tracks) travels further
unless the job asks to keep it.

Sums run in float64 and results are float32: a variant's ``sad`` is a small difference of two
large sums, which float32 accumulation over hundreds of bins would blur.
"""

from __future__ import annotations

import numpy as np

REDUCTIONS = ("sum", "mean", "max", "center")
SCORES = ("sad", "log2fc", "maxabs")


def strand_average(values: np.ndarray, *, flip_bins: bool) -> np.ndarray:
    """The mean of a batch's two halves: forward rows, then their reverse complements.

    The reverse complement's bins run the other way along the genome, so for per-bin outputs
    (``flip_bins``) its bins axis is reversed before averaging; per-item scores average as they are.
    """
    half = len(values) // 2
    forward, reverse = values[:half], values[half:]
    if flip_bins:
        reverse = reverse[:, ::-1]
    return (forward + reverse) / 2


def central_bins(n_bins: int, k: int | None) -> slice:
    """The ``k`` central bins of ``n_bins`` (all when ``k`` is None): start = (n_bins - k) // 2."""
    if k is None:
        return slice(0, n_bins)
    if k > n_bins:
        raise ValueError(f"bins: {k} asks for more central bins than the output has ({n_bins})")
    start = (n_bins - k) // 2
    return slice(start, start + k)


def reduce_bins(values: np.ndarray, how: str, bins: int | None = None) -> np.ndarray:
    """(N, bins, tracks) -> (N, tracks): sum, mean or max over the ``bins`` central bins (all by
    default); ``center`` is the mean of the central bins, one bin unless ``bins`` says more."""
    if values.ndim != 3:
        raise ValueError(f"a reduction over bins needs an (N, bins, tracks) output, got shape {values.shape}")
    if how not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {how!r}")
    window = values[:, central_bins(values.shape[1], 1 if how == "center" and bins is None else bins)]
    if how == "max":
        return window.max(axis=1).astype(np.float32)
    total = window.sum(axis=1, dtype=np.float64)
    return (total if how == "sum" else total / window.shape[1]).astype(np.float32)


def variant_scores(ref: np.ndarray, alt: np.ndarray, names: tuple[str, ...] | list[str],
                   pseudocount: float = 1.0) -> dict[str, np.ndarray]:
    """Per-track scores of alt against ref, both (N, bins, tracks), bins compared position for
    position (baskerville's SAD family): each named score is (N, tracks) float32.

    ``sad`` = sum(alt) - sum(ref); ``log2fc`` = log2((sum(alt) + c) / (sum(ref) + c)) with
    ``c = pseudocount``; ``maxabs`` = max over bins of |alt - ref|.
    """
    if ref.shape != alt.shape or ref.ndim != 3:
        raise ValueError(f"ref and alt must both be (N, bins, tracks), got {ref.shape} and {alt.shape}")
    unknown = [s for s in names if s not in SCORES]
    if unknown:
        raise ValueError(f"unknown variant scores {unknown}; known: {SCORES}")
    out: dict[str, np.ndarray] = {}
    if "sad" in names or "log2fc" in names:
        s_ref, s_alt = ref.sum(axis=1, dtype=np.float64), alt.sum(axis=1, dtype=np.float64)
        if "sad" in names:
            out["sad"] = (s_alt - s_ref).astype(np.float32)
        if "log2fc" in names:
            with np.errstate(divide="ignore", invalid="ignore"):
                out["log2fc"] = np.log2((s_alt + pseudocount) / (s_ref + pseudocount)).astype(np.float32)
    if "maxabs" in names:
        out["maxabs"] = np.abs(alt - ref).max(axis=1).astype(np.float32)
    return {name: out[name] for name in names}
