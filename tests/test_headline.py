"""A headline that fits the run: failed, empty, too small, resumed; and what an operator needs.

Real runs (inline profile, synthetic slides made with tifffile) for what a run decides; reports
constructed with summarize() for renderings of states a small machine cannot produce on demand
(lost workers, an int8 gate).
"""

from __future__ import annotations

import datetime
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import slide_job, write_job

import gpubatch
from gpubatch import report as rp
from gpubatch.cli.demo import write_synthetic_slide
from gpubatch.cli.main import main
from gpubatch.core.errors import EXIT_ERROR, EXIT_OK
from gpubatch.core.results import ShardResult
from gpubatch.report.html import render_html


def test_all_inputs_failed_exits_1_and_says_so(tmp_path: Path, classifier: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.tif").write_text("not a slide\n")
    (tmp_path / "b.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    spec = write_job(tmp_path / "job.yaml", slide_job([str(tmp_path / "*.tif")], classifier, tmp_path / "out"))
    assert main(["run", str(spec)]) == EXIT_ERROR
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert head.startswith("test: FAILED: all 2 input(s) failed, nothing was processed: ")
    assert "a.tif: " in head and "b.tif: " in head
    assert "verdict" not in out and "next:" not in out and "starvation" not in out
    report = rp.load_report(tmp_path / "out")
    assert report["verdict"]["state"] == "failed" and report["verdict"]["next_move"] == ""
    page = (tmp_path / "out" / "report.html").read_text()
    assert 'data-state="failed"' in page and "Run failed" in page and "Next move" not in page
    assert gpubatch.run(spec, show_progress=False).exit_code == EXIT_ERROR


def test_empty_inputs_are_listed_with_the_reason(tmp_path: Path, slide_path: Path, classifier: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(slide_path, inputs / "good.tif")
    # 100 px at 0.25 mpp is 25 um; a 64 px tile at 0.5 mpp spans 128 level-0 px
    write_synthetic_slide(inputs / "tiny.tif", 100, 100, levels=1)
    write_synthetic_slide(inputs / "glass.tif", 512, 512, image=np.full((512, 512, 3), 240, np.uint8), levels=1)
    job = slide_job([str(inputs / "*.tif")], classifier, tmp_path / "out",
                    tiles={"tissue": {"method": "otsu", "min_fraction": 0.5}})
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(spec)]) == EXIT_OK
    out = capsys.readouterr().out
    report = rp.load_report(tmp_path / "out")
    rows = {Path(s["input"]).name: s for s in report["shards"]}
    assert rows["good.tif"]["status"] == "done" and rows["good.tif"]["items"] > 0
    assert rows["tiny.tif"]["status"] == "empty" and rows["glass.tif"]["status"] == "empty"
    assert rows["tiny.tif"]["reason"] == ("smaller than one tile: 100x100 px at level 0, one tile spans "
                                          "128 px (tiles.size 64 at the chosen resolution)")
    assert rows["glass.tif"]["reason"] == ("no tissue: none of its 16 tiles reached "
                                           "tiles.tissue.min_fraction 0.5 (method otsu)")
    assert "empty: 2 input(s) yielded no items:" in out
    assert f"{inputs / 'tiny.tif'}: smaller than one tile" in out
    frame = rp.shard_frame(report).set_index("input")
    assert frame.loc[str(inputs / "glass.tif"), "status"] == "empty"
    page = render_html(report)
    assert "2 empty" in page and "no tissue: none of its 16 tiles" in page


def test_no_verdict_for_a_run_too_small_to_judge() -> None:
    def shard(batches: int, busy: float) -> ShardResult:
        samples = [{"t": 0.1 * b, "items": 8, "busy_s": busy / batches, "starved_s": 0.0, "queue_depth": 1}
                   for b in range(batches)]
        clocks = {"stages": {"model": {"busy_s": busy, "starved_s": 0.0, "blocked_s": 0.0}},
                  "parts": {"compute": busy}, "counters": {}, "samples": samples}
        return ShardResult("s", "in", items=8 * batches, wall_s=busy, clocks=clocks, start=0.0)

    info = {"name": "t", "batch_size": 8, "workers": 1, "readers": 2, "precision": "fp32"}
    small = rp.summarize([shard(4, 3.0)], [], 3.0, info).to_dict()
    assert small["verdict"]["state"] == "too-small" and small["verdict"]["limiting_layer"] is None
    assert "4 batch(es)" in small["verdict"]["evidence"] and "at least 5 batches and 1 s" in small["verdict"]["evidence"]
    text = rp.format_summary(small)
    assert "verdict: none (too little work for a verdict" in text and "next:" not in text
    short = rp.summarize([shard(20, 0.5)], [], 3.0, info).to_dict()
    assert short["verdict"]["state"] == "too-small" and "0.50 s of model time" in short["verdict"]["evidence"]
    enough = rp.summarize([shard(20, 3.0)], [], 3.0, info).to_dict()
    assert enough["verdict"]["state"] == "verdict" and enough["verdict"]["next_move"]


def test_resume_counts_only_this_runs_items(tmp_path: Path, slides_dir: Path, classifier: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(slides_dir, inputs)
    spec = write_job(tmp_path / "job.yaml", slide_job([str(inputs / "*.tif")], classifier, tmp_path / "out"))
    assert main(["run", str(spec)]) == EXIT_OK
    first = rp.load_report(tmp_path / "out")
    write_synthetic_slide(inputs / "s9.tif", 1024, 1024, seed=99)
    capsys.readouterr()
    assert main(["run", str(spec), "--resume"]) == EXIT_OK
    out = capsys.readouterr().out
    report = rp.load_report(tmp_path / "out")
    rows = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    new_items = int((rows["slide"] == str(inputs / "s9.tif")).sum())
    assert report["resumed"] == {"shards": 3, "items": first["items"], "empty": 0}
    assert report["items"] == new_items and report["items_total"] == len(rows) == first["items"] + new_items
    assert report["items_per_s"] == pytest.approx(new_items / report["wall_s"])
    assert "3 shard(s) already committed, skipped" in out
    assert sum(s["items"] for s in report["shards"] if s["status"] == "resumed") == first["items"]


def test_operator_facts_in_the_terminal_and_the_page(tmp_path: Path, slide_path: Path, classifier: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], classifier, tmp_path / "out"))
    before = datetime.datetime.now(datetime.timezone.utc)
    assert main(["run", str(spec)]) == EXIT_OK
    out = capsys.readouterr().out
    report = rp.load_report(tmp_path / "out")
    started = datetime.datetime.fromisoformat(report["started_at"])
    assert before - datetime.timedelta(seconds=2) <= started <= datetime.datetime.now(datetime.timezone.utc)
    assert report["host"] == socket.gethostname() and report["spec_path"] == str(spec.resolve())
    line = out.splitlines()[1]
    assert line == (f"  run {report['started_at']}, on {socket.gethostname()}, spec {spec.resolve()}, "
                    f"gpubatch {gpubatch.__version__}")
    page = render_html(report)
    for value in (report["started_at"], socket.gethostname(), str(spec.resolve()), gpubatch.__version__):
        assert value in page


def _constructed(**run_info: Any) -> dict[str, Any]:
    samples = [{"t": 0.1 * b, "items": 16, "busy_s": 0.2, "starved_s": 0.01, "queue_depth": 2} for b in range(10)]
    clocks = {"stages": {"model": {"busy_s": 2.0, "starved_s": 0.1, "blocked_s": 0.0}},
              "parts": {"compute": 1.8}, "counters": {}, "samples": samples}
    shards = [ShardResult("a", "s3://b/a.svs", items=160, wall_s=2.2, clocks=clocks, start=0.0, attempt=3),
              ShardResult("b", "s3://b/b.svs", items=160, wall_s=2.2, clocks=clocks, start=0.0)]
    info = {"name": "t", "batch_size": 16, "workers": 2, "readers": 2, "precision": "int8", **run_info}
    return rp.summarize(shards, [], 5.0, info).to_dict()


def test_gate_figures_retried_shards_and_lost_workers_are_shown() -> None:
    quantization = {"requested": "int8", "used": "int8", "passed": True,
                    "validation": {"precision": "int8", "task": "classifier", "agreement": 0.9961,
                                   "min_agreement": 0.99, "items": 256}}
    lost = [{"worker": "tcp://10.0.0.7:40111", "time": "2026-03-02T03:14:07+00:00", "shards": ["a", "c"]}]
    report = _constructed(quantization=quantization, lost_workers=lost)
    text = rp.format_summary(report)
    assert ("precision: int8 gate passed: top-1 agreement with fp32 0.9961 (min 0.99) on 256 held-out items, "
            "task classifier") in text
    assert "retried: 1 shard(s) needed more than one attempt:\n  s3://b/a.svs: done on attempt 3" in text
    assert "lost workers: 1:\n  tcp://10.0.0.7:40111 at 2026-03-02T03:14:07+00:00: shards a, c" in text
    page = render_html(report)
    for words in ("top-1 agreement with fp32 0.9961", "done on attempt 3", "tcp://10.0.0.7:40111"):
        assert words in page
    refused = _constructed(quantization={"requested": "int8", "used": "fp32", "passed": False, "fell_back_to": "fp32",
                                         "validation": {"task": "regressor", "agreement": 0.91,
                                                        "min_agreement": 0.99, "items": 64}})
    assert ("precision: int8 gate failed, ran fp32: Pearson correlation with fp32 0.9100 (min 0.99) on 64 "
            "held-out items, task regressor") in rp.format_summary(refused)
    assert "lost workers" not in rp.format_summary(refused)
