"""Regenerate BENCHMARKS.md: run every benchmark, keep its JSON, render the tables.

    pip install torch==2.13.0 && pip install -e '.[bench]'    # the peers: MONAI, torch, pysam
    python bench/run_all.py [--quick] [--only slides,genome,...] [--render-only]

Each benchmark writes bench/results/<name>.json; BENCHMARKS.md is rendered from those files, so
``--render-only`` re-renders without re-measuring. Run it on an otherwise idle machine: every
figure is a ratio measured side by side in one run, but noisy neighbours still add variance.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, table  # noqa: E402

RESULTS = HERE / "results"
TARGET = HERE.parent / "BENCHMARKS.md"

#: name -> (module, arguments, quick arguments)
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "slides-decode": ("bench_slides", ["--workload", "decode", "--slides", "4", "--repeats", "3"],
                      ["--workload", "decode", "--slides", "4", "--size", "4096x3072", "--repeats", "1"]),
    "slides-decode-issue17": ("bench_slides", ["--workload", "decode", "--slides", "6", "--size", "8192x8192",
                                               "--repeats", "5"],
                              ["--workload", "decode", "--slides", "2", "--size", "4096x3072", "--repeats", "1"]),
    "slides-compute": ("bench_slides", ["--workload", "compute", "--slides", "1", "--repeats", "2"],
                       ["--workload", "compute", "--slides", "1", "--size", "2048x2048", "--repeats", "1"]),
    "slides-remote": ("bench_slides_remote", ["--latency", "0", "20", "80", "--slides", "4"],
                      ["--latency", "0", "80", "--slides", "2", "--size", "4096x3072"]),
    "remote-s3": ("bench_remote", ["--slides", "16", "--size", "8192x8192", "--repeats", "3"],
                  ["--slides", "5", "--size", "4096x4096", "--repeats", "1"]),
    "remote-s3-long": ("bench_remote", ["--slides", "64", "--size", "8192x8192", "--repeats", "3"],
                       ["--slides", "9", "--size", "4096x4096", "--repeats", "1"]),
    "remote-s3-dealing": ("bench_remote", ["--slides", "16", "--size", "8192x8192", "--repeats", "3",
                                           "--access", "stream", "--by-dask"],
                          ["--slides", "5", "--size", "4096x4096", "--repeats", "1", "--access", "stream",
                           "--by-dask"]),
    "remote-s3-plan-ahead": ("bench_remote", ["--slides", "16", "--size", "8192x8192", "--repeats", "5",
                                              "--access", "stream", "--latency", "0", "80", "--plan-ahead"],
                             ["--slides", "5", "--size", "4096x4096", "--repeats", "1", "--access", "stream",
                              "--plan-ahead"]),
    "remote-s3-join-reads": ("bench_remote", ["--slides", "16", "--size", "8192x8192", "--repeats", "5",
                                              "--access", "stream", "--latency", "0", "80", "--join-reads"],
                             ["--slides", "5", "--size", "4096x4096", "--repeats", "1", "--access", "stream",
                              "--join-reads"]),
    "stage-cost": ("bench_stage_cost", ["--slides", "16", "--repeats", "8"], ["--slides", "4", "--size", "4096x4096", "--repeats", "1"]),
    "open": ("bench_open", ["--slides", "8", "--latency", "0", "80", "--repeats", "3"],
             ["--slides", "2", "--size", "4096x4096", "--latency", "0", "80", "--repeats", "1"]),
    "open-at-once": ("bench_open", ["--slides", "8", "--latency", "0", "80", "--repeats", "3", "--at-once", "4"],
                     ["--slides", "4", "--size", "4096x4096", "--latency", "80", "--repeats", "1", "--at-once", "4"]),
    "run-end": ("bench_run_end", ["--slides", "4", "--repeats", "8"], ["--slides", "2", "--size", "4096x4096", "--repeats", "2"]),
    "integrity": ("bench_integrity", ["--size", "4096", "--repeats", "5"], ["--size", "1024", "--repeats", "1"]),
    "tissue": ("bench_tissue", ["--slides", "4", "--repeats", "5"], ["--slides", "2", "--size", "4096x4096", "--repeats", "1"]),
    "parquet": ("bench_parquet", ["--rows", "100000", "--repeats", "7"], ["--rows", "5000", "--repeats", "1"]),
    "preprocess": ("bench_preprocess", ["--batches", "32", "64", "--repeats", "5"], ["--batches", "32", "--repeats", "2"]),
    "genome-1kb": ("bench_genome", ["--length", "1000", "--bases", "100000000", "--repeats", "3"],
                   ["--length", "1000", "--bases", "2000000", "--repeats", "1"]),
    "genome-1kb-issue17": ("bench_genome", ["--length", "1000", "--stride", "10", "--bases", "1000000", "--repeats", "5"],
                           ["--length", "1000", "--stride", "100", "--bases", "1000000", "--repeats", "1"]),
    "genome-100kb": ("bench_genome", ["--length", "100000", "--bases", "100000000", "--repeats", "3"],
                     ["--length", "100000", "--bases", "4000000", "--repeats", "1"]),
    "storage": ("bench_storage", ["--latency", "0", "20", "80"], ["--latency", "0", "80", "--slides", "1", "--size", "4096"]),
    "worker-env": ("bench_worker_env", ["--workload", "slides", "--repeats", "5"], ["--workload", "slides", "--repeats", "1"]),
    "worker-env-genome": ("bench_worker_env", ["--workload", "genome", "--repeats", "3"],
                          ["--workload", "genome", "--bases", "2000000", "--repeats", "1"]),
    "slide-memory": ("bench_slide_memory", ["--cases", "tiles", "slides", "wide"],
                     ["--cases", "tiles", "--tiles", "2000", "8000"]),
    "memory": ("bench_memory", ["--counts", "2", "4", "20", "--repeats", "3"],
               ["--counts", "2", "6", "--size", "2048x2048", "--repeats", "1"]),
    "quantize": ("bench_quantize", ["--repeats", "5"], ["--repeats", "2"]),
    "tracks-loop": ("bench_tracks", ["--part", "loop", "--variants", "400", "--repeats", "3"],
                    ["--part", "loop", "--variants", "16", "--bases", "2000000", "--tracks", "300", "--repeats", "1"]),
    "tracks-memory": ("bench_tracks", ["--part", "memory", "--counts", "10000", "100000", "--repeats", "2"],
                      ["--part", "memory", "--counts", "2000", "6000", "--bases", "2000000", "--repeats", "1"]),
    "tracks-long": ("bench_tracks", ["--part", "long", "--lengths", "196608", "524288", "--batches", "1", "2", "4"],
                    ["--part", "long", "--lengths", "196608", "--batches", "1", "4", "--counts", "4", "12",
                     "--bases", "2000000"]),
    "features": ("bench_features", ["--slides", "2", "--size", "12288x8192", "--repeats", "3"],
                 ["--slides", "1", "--size", "4096x3072", "--repeats", "1"]),
    "client-memory": ("bench_client", ["--workload", "memory", "--shards", "100", "1000", "10000"],
                      ["--workload", "memory", "--shards", "100", "1000"]),
    "slurm": ("bench_client", ["--workload", "slurm", "--repeats", "3"], ["--workload", "slurm", "--repeats", "1"]),
    "gpu": ("bench_gpu", [], []),
}


def run(name: str, quick: bool) -> None:
    module, args, quick_args = BENCHES[name]
    out = RESULTS / f"{name}.json"
    RESULTS.mkdir(exist_ok=True)
    print(f"== {name}: python bench/{module}.py {' '.join(quick_args if quick else args)}", flush=True)
    t0 = time.time()
    importlib.import_module(module).main([*(quick_args if quick else args), "--out", str(out)])
    print(f"== {name}: {time.time() - t0:.0f} s", flush=True)


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _section(title: str, data: dict[str, Any] | None, body: Callable[[dict[str, Any]], str],
             name: str = "") -> str:
    if data is None:
        return f"## {title}\n\nNot measured here (run `python bench/run_all.py --only {name}`).\n"
    module, args, _ = BENCHES[name] if name else ("", [], [])
    cmd = data.get("command") or f"python bench/{module}.py {' '.join(args)}"
    cmd = cmd.split(" --out ")[0]
    return f"## {title}\n\n`{cmd}`\n\n{body(data)}\n"


def _slides(d: dict[str, Any]) -> str:
    b = d["bound"]
    return (table(d["rows"], ["contestant", "items", "median s", "items/s", "gpubatch x", "% of bound"])
            + f"\n\nBound (CPU work of the fastest decode + the model, over the cores): "
              f"{b['bound_items_per_s']:.0f} items/s (decode {b['decode_cpu_ms']:.2f} ms + model "
              f"{b['model_cpu_ms']:.2f} ms CPU per item); decode-only {b['decode_only_items_per_s']:.0f} items/s, "
              f"model-only {b['model_only_items_per_s']:.0f} items/s. gpubatch starvation "
              f"{d['starvation']:.1%}. Verdict: {d['verdict']}")


def _rows(columns: list[str]) -> Callable[[dict[str, Any]], str]:
    return lambda d: table(d["rows"], columns) + (f"\n\n{d['note']}" if d.get("note") else "")


def _genome(d: dict[str, Any]) -> str:
    return (table(d["rows"], ["contestant", "windows", "median s", "windows/s", "gpubatch x"])
            + f"\n\ngpubatch starvation {d['starvation']:.1%}; model-only "
              f"{(d.get('model_only') or 0):.0f} windows/s. Verdict: {d['verdict']}")


def _memory(d: dict[str, Any]) -> str:
    columns = ["slides", "tree_mb", "worker_mb", "worker_range_mb", "worker_anon_mb", "seconds",
               "growth to largest", "anon growth"]
    return (table(d["rows"], [c for c in columns if c in d["rows"][0]])
            + "\n\nPeak RSS of the one worker process (two shards at a time) and of the whole process "
              "tree (client, scheduler, forkserver, worker), medians over alternating repeats; the "
              "worker's range over the repeats; its peak anonymous RSS (what it allocated, without "
              "the shared library pages it has touched). Aim: flat within 10% from 2 to 20 slides.")


def _quantize(d: dict[str, Any]) -> str:
    rows = [{"precision": p, "items/s (median)": v, "vs fp32": v / d["items_per_s"]["fp32"]}
            for p, v in d["items_per_s"].items()]
    return (table(rows, ["precision", "items/s (median)", "vs fp32"])
            + f"\n\n{d['model']}, {d['tile']} px tiles, batch {d['batch']}, {d['provider']}, "
              f"{d['repeats']} alternating repeats. int8 is the QDQ model gpubatch builds "
              f"(quantize_static, per-channel symmetric weights, {d['calibration_items']} calibration "
              f"tiles, {d['quantize_seconds']:.1f} s to build). Agreement with fp32 on "
              f"{d['validation_items']} held-out tiles: top-1 {d['top1_agreement']:.3f}, logits "
              f"Pearson {d['logits_pearson']:.4f}, relative error {d['logits_relative_error']:.3f}.")


def _tracks_loop(d: dict[str, Any]) -> str:
    agree = ", ".join(f"{k} {v:.1e}" for k, v in d["agreement_max_abs"].items())
    return (table(d["rows"], ["contestant", "variants", "median s", "variants/s", "gpubatch x"])
            + f"\n\nTrack model: {d['length']:,} bp windows, ({d['bins']}, {d['tracks']}) output, scores "
              f"sad, log2fc and maxabs; gpubatch batch {d['batch']}. Largest difference between the two's "
              f"scores: {agree}. gpubatch starvation {d['starvation']:.1%}. Verdict: {d['verdict']}")


def _tracks_memory(d: dict[str, Any]) -> str:
    columns = ["variants", "client_mb", "worker_mb", "worker_anon_mb", "seconds", "client growth", "worker growth"]
    return (table(d["rows"], columns)
            + f"\n\nPeak RSS of the client (the `gpubatch run` process) and of its one worker, medians over "
              f"alternating repeats; {d['length']:,} bp windows, ({d['bins']}, {d['tracks']}) output, three "
              f"scores per variant and track, batch {d['batch']}. The client grows by "
              f"{d['client_bytes_per_variant']:.0f} bytes per variant (the variant table it plans from and the "
              "shards' task descriptions; no per-variant outputs). Aim: flat.")


def _tracks_long(d: dict[str, Any]) -> str:
    return (table(d["rows"], list(d["rows"][0]))
            + f"\n\nPeak RSS of the worker and the client for long windows, {d['tracks']} tracks, at "
              f"{' and '.join(map(str, d['counts']))} variants: memory follows the batch, not the cohort.")


def _features(d: dict[str, Any]) -> str:
    ceiling = ", ".join(f"{k} {v:.1f}" for k, v in d["model_only_tiles_per_s"].items())
    starved = ", ".join(f"{k} {v:.1%}" for k, v in d["starvation"].items())
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in d["max_abs_diff"].items())
    e = d["encoder"]
    return (table(d["rows"], d["columns"])
            + f"\n\nEncoder: ViT ({e['dim']} wide, {e['depth']} blocks, {e['heads']} heads, patch "
              f"{e['patch']}, {e['img']} px), random seeded weights, batch {d['batch']}; the TRIDENT-style "
              f"loop uses {d['workers']} DataLoader workers. Model only (tiles/s): {ceiling}. gpubatch "
              f"starvation: {starved}. Largest feature difference from the TRIDENT-style loop on the same "
              f"tiles: {diffs}.")


def _markdown_or_rows(d: dict[str, Any]) -> str:
    if d.get("markdown"):
        return str(d["markdown"])
    if d.get("rows"):
        return table(d["rows"], list(d["rows"][0]))
    return "```\n" + json.dumps(d, indent=1)[:3000] + "\n```"


def render() -> str:
    m = machine()
    dates = sorted({d["machine"].get("date", "") for name in BENCHES if (d := _load(name)) and "machine" in d} - {""})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}" if dates else "not yet"
    parts = [
        "# Benchmarks\n",
        "Every figure below is measured side by side in one run (alternating order where there are "
        "several contestants) on the same inputs and the same ONNX model; ratios, not absolute "
        "times, are the claims. Regenerate all of it with one command: `python bench/run_all.py` "
        "(the peers are the `bench` extra: `pip install -e '.[bench]'`) "
        f"(`--render-only` re-renders from bench/results/*.json).\n\nMachine: {m['cores']} cores "
        f"({m['cpu']}), Python {m['python']}, ONNX Runtime {m['onnxruntime']}. No GPU. Measured {when}.\n",
        _section("Slides, decode-bound (light CNN)", _load("slides-decode"), _slides, "slides-decode"),
        _section("Slides, decode-bound, issue 17's workload (6 slides of 8192 px)", _load("slides-decode-issue17"),
                 _slides, "slides-decode-issue17"),
        _section("Slides, compute-bound (ResNet-18-sized CNN)", _load("slides-compute"), _slides, "slides-compute"),
        _section("Slides from object storage (HTTP range reads with added latency)", _load("slides-remote"), _markdown_or_rows, "slides-remote"),
        _section("Slides from a real S3 server (SeaweedFS behind a latency proxy)", _load("remote-s3"),
                 _markdown_or_rows, "remote-s3"),
        _section("Slides from a real S3 server, a longer run (64 slides)", _load("remote-s3-long"),
                 _markdown_or_rows, "remote-s3-long"),
        _section("Streamed slides: shards dealt to worker processes against placed by Dask", _load("remote-s3-dealing"),
                 _markdown_or_rows, "remote-s3-dealing"),
        _section("Streamed slides: opened and planned ahead against opened ahead only", _load("remote-s3-plan-ahead"),
                 _markdown_or_rows, "remote-s3-plan-ahead"),
        _section("Streamed slides: neighbouring reads joined into one request per row against each read on its own",
                 _load("remote-s3-join-reads"), _markdown_or_rows, "remote-s3-join-reads"),
        _section("What staging costs in CPU: gpubatch's download, the S3 server and the proxy", _load("stage-cost"),
                 _markdown_or_rows, "stage-cost"),
        _section("Opening a streamed slide: the header asked beside the size against after it",
                 _load("open"), _markdown_or_rows, "open"),
        _section("Opening four streamed slides at once: tifffile's cached properties lock-free against locked",
                 _load("open-at-once"), _markdown_or_rows, "open-at-once"),
        _section("A run's end: gpubatch's against each of its earlier ways", _load("run-end"),
                 _markdown_or_rows, "run-end"),
        _section("tiles.integrity strict on the openslide path: the stored-tile check against none",
                 _load("integrity"), _markdown_or_rows, "integrity"),
        _section("A slide's tissue filter and a level's tile decode: gpubatch's against each as it was before",
                 _load("tissue"), _markdown_or_rows, "tissue"),
        _section("Writing parquet: dictionary pages for text columns only against for every column",
                 _load("parquet"), _markdown_or_rows, "parquet"),
        _section("Normalising tiles to float: gpubatch's kernel against one broadcast", _load("preprocess"),
                 _markdown_or_rows, "preprocess"),
        _section("Storage readers alone (stream, stage, sequential per-tile)", _load("storage"), _markdown_or_rows, "storage"),
        _section("Genome windows, 1 kb", _load("genome-1kb"), _genome, "genome-1kb"),
        _section("Genome windows, issue 17's workload (1 kb at stride 10 over 1 Mb)", _load("genome-1kb-issue17"),
                 _genome, "genome-1kb-issue17"),
        _section("Genome windows, 100 kb", _load("genome-100kb"), _genome, "genome-100kb"),
        _section("Workers' malloc settings (decode-bound slides, fresh processes)", _load("worker-env"),
                 _markdown_or_rows, "worker-env"),
        _section("Workers' malloc settings (genome 1 kb, fresh processes)", _load("worker-env-genome"),
                 _markdown_or_rows, "worker-env-genome"),
        _section("Memory: 2, 4 and 20 slides", _load("memory"), _memory, "memory"),
        _section("Memory against one dimension of a slides run (one slide's tiles, slides, output width)",
                 _load("slide-memory"), _markdown_or_rows, "slide-memory"),
        _section("fp32 against int8 (ONNX Runtime, CPU)", _load("quantize"), _quantize, "quantize"),
        _section("Track models: variant scores against the per-variant loop", _load("tracks-loop"), _tracks_loop,
                 "tracks-loop"),
        _section("Track models: memory against cohort size", _load("tracks-memory"), _tracks_memory, "tracks-memory"),
        _section("Track models: long windows", _load("tracks-long"), _tracks_long, "tracks-long"),
        _section("Patch features: ViT-S/16 against the TRIDENT-style loop", _load("features"), _features, "features"),
        _section("The client's memory against the number of shards", _load("client-memory"), _markdown_or_rows,
                 "client-memory"),
        _section("A SLURM run against local, same job", _load("slurm"), _markdown_or_rows, "slurm"),
        _section("GPU", _load("gpu"), _markdown_or_rows, "gpu"),
    ]
    notes = HERE / "NOTES.md"
    if notes.exists():
        parts.append(notes.read_text())
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small inputs, one repeat (smoke test)")
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.render_only:
        for name in args.only.split(","):
            run(name, args.quick)
    TARGET.write_text(render())
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
