"""Slides: gpubatch against the sequential loop, the DataLoader pattern and MONAI, with the bound.

    python bench/bench_slides.py [--workload decode|compute] [--slides 6] [--repeats 3] [--out F]

Contestants, on the same slides, tile list and ONNX model, alternating order:
- gpubatch: the job through ``gpubatch.run`` (local Dask profile, tifffile decode, overlap);
- sequential: openslide.read_region per tile -> normalise -> ONNX Runtime per batch -> parquet,
  as most scripts do;
- dataloader: the WSInfer/CLAM pattern: a torch Dataset with one openslide handle per worker,
  DataLoader(num_workers=2), ONNX Runtime in the main process;
- monai: MONAI's PatchWSIDataset (OpenSlide reader) in a DataLoader (only when monai is installed).
"gpubatch, shards only" is the same runs timed from their first shard's start to their last
shard's end: what a long run approaches once the fixed costs (cluster start-up, model
preparation, report merging) are spread over hours instead of seconds.
The bound: per-item CPU time of the fastest decode (tifffile/imagecodecs on the tile grid) plus the
model, divided by the cores; measured in every round beside the contestants (the median of the
rounds'), since the machine's speed moves between rounds. Every contestant, and the bound, first
runs once untimed (``--warmup``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    WORK,
    alternate,
    cpu_seconds,
    machine,
    save,
    shards_only_row,
    steady_seconds,
    table,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_workload(kind: str, n_slides: int, size: tuple[int, int]) -> dict[str, Any]:
    from gpubatch.cli.demo import write_synthetic_slide

    d = WORK / f"slides-{size[0]}x{size[1]}"
    d.mkdir(parents=True, exist_ok=True)
    slides = []
    for i in range(n_slides):
        p = d / f"s{i:02d}.tif"
        if not p.exists():
            write_synthetic_slide(p, *size, seed=100 + i)
        slides.append(p)
    if kind == "compute":
        from models import make_resnet18_like

        model = make_resnet18_like(WORK / "resnet18like.onnx")
    else:
        from models import make_light_model

        model = make_light_model(WORK / "light2.onnx")
    return {"slides": slides, "model": model, "kind": kind}


def tile_lists(slides: list[Path], size: int, mpp: float) -> list[dict[str, Any]]:
    """The tiles every contestant reads: gpubatch's grid and tissue mask, computed once, untimed."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.sources.slides.grid import make_grid
    from gpubatch.sources.slides.tiff_backend import TiffBackend
    from gpubatch.sources.slides.tissue import filter_tissue
    from gpubatch.spec import TilesSpec

    spec = TilesSpec(size=size, mpp=mpp)
    out = []
    for p in slides:
        backend = TiffBackend(str(p))
        grid = filter_tissue(make_grid(backend.info, spec, str(p)), backend, spec, StageClocks())
        out.append({"path": str(p), "level": grid.level, "read_size": grid.read_size, "size": size,
                    "xs": grid.xs.tolist(), "ys": grid.ys.tolist(), "ds": grid.level_downsample})
        backend.close()
    return out


def _session(model: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])


def _normalise(batch: np.ndarray) -> np.ndarray:
    x = batch.astype(np.float32) / 255.0
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _read_tile(slide: Any, t: dict[str, Any], x: int, y: int) -> np.ndarray:
    region = slide.read_region((x, y), t["level"], (t["read_size"], t["read_size"])).convert("RGB")
    if t["read_size"] != t["size"]:
        region = region.resize((t["size"], t["size"]))
    return np.asarray(region)


def run_sequential(tiles: list[dict[str, Any]], model: Path, batch: int, out: Path) -> int:
    import openslide
    import pandas as pd

    sess = _session(model)
    name = sess.get_inputs()[0].name
    rows: list[np.ndarray] = []
    for t in tiles:
        slide = openslide.OpenSlide(t["path"])
        coords = list(zip(t["xs"], t["ys"], strict=True))
        for i in range(0, len(coords), batch):
            imgs = np.stack([_read_tile(slide, t, x, y) for x, y in coords[i : i + batch]])
            rows.append(sess.run(None, {name: _normalise(imgs)})[0])
        slide.close()
    preds = np.concatenate(rows)
    pd.DataFrame(preds).to_parquet(out / "sequential.parquet")
    return len(preds)


class TileDataset:
    """The WSInfer/CLAM pattern: one openslide handle per DataLoader worker, opened lazily."""

    def __init__(self, tiles: list[dict[str, Any]]):
        self.items = [(i, x, y) for i, t in enumerate(tiles) for x, y in zip(t["xs"], t["ys"], strict=True)]
        self.tiles = tiles
        self.handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> Any:
        import openslide
        import torch

        i, x, y = self.items[k]
        if i not in self.handles:
            self.handles[i] = openslide.OpenSlide(self.tiles[i]["path"])
        img = _read_tile(self.handles[i], self.tiles[i], x, y)
        t = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
        return (t - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def run_dataloader(tiles: list[dict[str, Any]], model: Path, batch: int, out: Path, workers: int = 2) -> int:
    import pandas as pd
    from torch.utils.data import DataLoader

    sess = _session(model)
    name = sess.get_inputs()[0].name
    loader = DataLoader(TileDataset(tiles), batch_size=batch, num_workers=workers, shuffle=False)
    preds = np.concatenate([sess.run(None, {name: b.numpy()})[0] for b in loader])
    pd.DataFrame(preds).to_parquet(out / "dataloader.parquet")
    return len(preds)


def run_monai(tiles: list[dict[str, Any]], model: Path, batch: int, out: Path, workers: int = 2) -> int:
    import pandas as pd
    from monai.data import DataLoader, PatchWSIDataset
    from monai.transforms import Compose, Lambdad

    data = [{"image": t["path"], "location": [int(y), int(x)], "level": t["level"],
             "size": [t["read_size"], t["read_size"]], "label": 0}
            for t in tiles for x, y in zip(t["xs"], t["ys"], strict=True)]
    mean = np.array(MEAN, np.float32)[:, None, None]
    std = np.array(STD, np.float32)[:, None, None]
    norm = Compose([Lambdad("image", lambda im: (np.asarray(im, np.float32) / 255.0 - mean) / std)])
    ds = PatchWSIDataset(data, reader="OpenSlide", transform=norm, center_location=False)
    sess = _session(model)
    name = sess.get_inputs()[0].name
    loader = DataLoader(ds, batch_size=batch, num_workers=workers)
    preds = np.concatenate([sess.run(None, {name: np.asarray(b["image"], np.float32)})[0] for b in loader])
    pd.DataFrame(preds).to_parquet(out / "monai.parquet")
    return len(preds)


def gpubatch_job(tiles_size: int, mpp: float, slides: list[Path], model: Path, out: Path, batch: int,
                 profile: str = "local", uris: list[str] | None = None, storage: dict | None = None,
                 readers: int = 4, access: str = "auto") -> dict[str, Any]:
    return {
        "name": "bench", "kind": "slides",
        "input": {"uris": uris or [str(p) for p in slides], "storage": storage or {}, "access": access},
        "tiles": {"size": tiles_size, "mpp": mpp, "tissue": {"method": "otsu", "min_fraction": 0.5}},
        "model": {"path": str(model), "backend": "onnxruntime", "batch_size": batch,
                  "input": {"mean": MEAN, "std": STD}},
        "output": {"uri": str(out), "formats": ["parquet"]},
        "run": {"profile": profile, "readers": readers, "prefetch_batches": 8},
    }


def run_gpubatch(job: dict[str, Any], last: dict[str, Any]) -> int:
    import gpubatch
    from gpubatch.spec import parse_job

    result = gpubatch.run(parse_job(job), show_progress=False, overwrite=True)
    last["report"] = result.report
    last.setdefault("steady_s", []).append(steady_seconds(Path(result.output_uri)))
    return int(result.report["items"])


def measure_bound(tiles: list[dict[str, Any]], model: Path, batch: int) -> dict[str, float]:
    """Per-item CPU seconds of tifffile tile-grid decode and of the model; the cores-wide bound."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.ops.kernels import normalize_tiles
    from gpubatch.sources.slides.grid import resize as _resize
    from gpubatch.sources.slides.tiff_backend import TiffBackend

    n = sum(len(t["xs"]) for t in tiles)
    decoded: list[np.ndarray] = []

    def decode_all() -> None:
        for t in tiles:
            backend = TiffBackend(t["path"])
            xs = (np.array(t["xs"]) / t["ds"]).round().astype(np.int64)
            ys = (np.array(t["ys"]) / t["ds"]).round().astype(np.int64)
            for i in range(0, len(xs), 64):
                rs = np.full(len(xs[i : i + 64]), t["read_size"])
                boxes = np.stack([xs[i : i + 64], ys[i : i + 64], rs, rs], axis=1)
                tiles_ = _resize(backend.read_boxes(t["level"], boxes, StageClocks()), t["size"])
                if len(decoded) < 4:
                    decoded.append(tiles_)
            backend.close()

    decode_cpu = cpu_seconds(decode_all)
    sample = np.concatenate(decoded)[:batch]
    sample = np.concatenate([sample] * (batch // max(len(sample), 1) + 1))[:batch]
    sess = _session(model)
    name = sess.get_inputs()[0].name
    x = normalize_tiles(sample, MEAN, STD)
    sess.run(None, {name: x})
    reps = max(2, int(1024 / batch))  # about a second of model CPU: 256 items moved with the hour
    t0 = time.perf_counter()
    model_cpu = cpu_seconds(lambda: [sess.run(None, {name: normalize_tiles(sample, MEAN, STD)}) for _ in range(reps)])
    model_wall = time.perf_counter() - t0
    per_item = decode_cpu / n + model_cpu / (reps * batch)
    cores = os.cpu_count() or 1
    return {"decode_cpu_ms": 1e3 * decode_cpu / n, "model_cpu_ms": 1e3 * model_cpu / (reps * batch),
            "decode_only_items_per_s": n / decode_cpu, "model_only_items_per_s": reps * batch / model_wall,
            "bound_items_per_s": cores / per_item}


#: the bound's measurement, a round of its own beside the contestants' (the machine's speed moves
#: between rounds; one measurement after them all put the bound 27% off in one run)
BOUND = "(bound)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["decode", "compute"], default="decode")
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", default="24576x16384")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of every contestant first")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--peers", default="sequential,dataloader,monai")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    wl = make_workload(args.workload, args.slides, (w, h))
    tiles = tile_lists(wl["slides"], 224, 0.5)
    out = WORK / "out"
    out.mkdir(parents=True, exist_ok=True)
    last: dict[str, Any] = {}
    job = gpubatch_job(224, 0.5, wl["slides"], wl["model"], out / "gpubatch", args.batch)
    contestants = {"gpubatch": lambda: run_gpubatch(job, last)}
    peers = {"sequential": run_sequential, "dataloader": run_dataloader, "monai": run_monai}
    for name in args.peers.split(","):
        if name == "monai":
            try:
                import monai  # noqa: F401
            except ImportError:
                print("  monai is not installed: pip install monai to include it")
                continue
        contestants[name] = lambda fn=peers[name]: fn(tiles, wl["model"], args.batch, out)
    print(f"workload {args.workload}: {len(tiles)} slides, {sum(len(t['xs']) for t in tiles)} tiles")
    bounds: list[dict[str, float]] = []

    def bound_round() -> int:
        bounds.append(measure_bound(tiles, wl["model"], args.batch))
        return 0  # no items of its own: the round's bound is in ``bounds``

    contestants[BOUND] = bound_round
    results = alternate(contestants, args.repeats, args.warmup)
    del results[BOUND]
    bound = {k: statistics.median(b[k] for b in bounds[args.warmup:]) for k in bounds[0]}
    last["steady_s"] = last["steady_s"][args.warmup:]  # the timed rounds' only
    g = results["gpubatch"]
    rows = [{"contestant": m.name, "items": m.items, "median s": m.median_s, "items/s": m.items_per_s,
             "gpubatch x": g.items_per_s / m.items_per_s, "% of bound": 100 * m.items_per_s / bound["bound_items_per_s"]}
            for m in results.values()]
    steady = shards_only_row(g, last["steady_s"], "items", "items/s")
    steady["% of bound"] = 100 * steady["items/s"] / bound["bound_items_per_s"]
    rows.insert(1, steady)
    print(table(rows, ["contestant", "items", "median s", "items/s", "gpubatch x", "% of bound"]))
    print({k: round(v, 2) for k, v in bound.items()}, f"starvation {last['report']['starvation']:.1%}")
    data = {"workload": args.workload, "machine": machine(), "rows": rows, "bound": bound,
            "starvation": last["report"]["starvation"], "verdict": last["report"]["verdict"]["text"],
            "command": "python bench/bench_slides.py " + " ".join(argv or sys.argv[1:])}
    save(args.out, data)
    return data


if __name__ == "__main__":
    main()
