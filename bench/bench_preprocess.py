"""Normalising a batch of tiles to float: gpubatch's kernel against one broadcast expression.

    python bench/bench_preprocess.py [--batches 32 64] [--tile 224] [--repeats 5] [--out F]

uint8 (N, H, W, 3) tiles -> float32 (x / 255 - mean) / std, in NCHW and in NHWC, into a reused
output (as the model stage does). The other contestant is the kernel as it was before: the scale
and offset folded per channel, applied in one numpy broadcast over the whole batch (over the
transposed view for NCHW). gpubatch's (gpubatch.ops.kernels.normalize_tiles) is the same for
NCHW and goes one image row at a time for NHWC. Both results are checked equal bit for bit.
(A version that went a few images' channel plane at a time for NCHW was 1.4-1.5x faster here,
alone, and 2-3% slower in the decode-bound slides job, so it was not kept: bench/NOTES.md.) Reported: the best of ``--repeats`` timings of 20 calls each, alternating.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GPUBATCH, BROADCAST = "gpubatch", "one broadcast (before)"


def broadcast_normalize(tiles: np.ndarray, layout: str, out: np.ndarray) -> np.ndarray:
    """The kernel before the change: one multiply and one add broadcast over the batch."""
    std = np.asarray(STD, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    offset = (-np.asarray(MEAN, dtype=np.float32) / std).astype(np.float32)
    src = tiles.transpose(0, 3, 1, 2) if layout == "NCHW" else tiles
    shape = (1, -1, 1, 1) if layout == "NCHW" else (1, 1, 1, -1)
    np.multiply(src, scale.reshape(shape), out=out)
    out += offset.reshape(shape)
    return out


def _best_ms(fn: Callable[[], Any], calls: int = 20) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def _measure(batch: int, tile: int, layout: str, repeats: int) -> list[dict[str, Any]]:
    from gpubatch.ops.kernels import normalize_tiles

    tiles = np.random.default_rng(batch).integers(0, 256, (batch, tile, tile, 3), dtype=np.uint8)
    shape = (batch, 3, tile, tile) if layout == "NCHW" else (batch, tile, tile, 3)
    outs = {GPUBATCH: np.empty(shape, np.float32), BROADCAST: np.empty(shape, np.float32)}
    calls = {GPUBATCH: lambda: normalize_tiles(tiles, MEAN, STD, layout, out=outs[GPUBATCH]),
             BROADCAST: lambda: broadcast_normalize(tiles, layout, outs[BROADCAST])}
    for fn in calls.values():
        fn()
    if not np.array_equal(outs[GPUBATCH], outs[BROADCAST]):
        raise AssertionError(f"{layout} batch {batch}: the two kernels disagree")
    times: dict[str, list[float]] = {n: [] for n in calls}
    for r in range(repeats):
        for name in list(calls)[r % 2:] + list(calls)[: r % 2]:
            times[name].append(_best_ms(calls[name]))
    best = {n: min(v) for n, v in times.items()}
    return [{"layout": layout, "batch": batch, "kernel": n, "ms per batch": best[n],
             "us per tile": 1e3 * best[n] / batch, "x faster": best[BROADCAST] / best[n]} for n in calls]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--tile", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = [row for layout in ("NCHW", "NHWC") for batch in args.batches
            for row in _measure(batch, args.tile, layout, args.repeats)]
    return publish("bench_preprocess.py", rows, ["layout", "batch", "kernel", "ms per batch", "us per tile",
                                                 "x faster"], args.out, argv)


if __name__ == "__main__":
    main()
