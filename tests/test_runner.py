"""End to end: real slides, real ONNX Runtime, real Dask; outputs, coordinates, quarantine, API."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import zarr
from conftest import audit_lines, shared_file, slide_job, write_job

import gpubatch
from gpubatch.cli.demo import write_synthetic_slide
from gpubatch.core.errors import EXIT_OK, EXIT_PARTIAL, SpecError
from gpubatch.models.base import file_sha256


def test_mean_colour_lands_at_the_right_coordinates(tmp_path: Path, slide_path: Path, mean_model: Path) -> None:
    """The model returns each tile's mean colour; compare with openslide at the same place."""
    job = slide_job([str(slide_path)], mean_model, tmp_path / "out", tiles={"size": 64, "mpp": 0.5})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    df = result.predictions()
    assert len(df) == 16 * 12 and set(df["level"]) == {1}
    assert list(df.columns[:4]) == ["slide", "x", "y", "level"]
    slide = openslide.OpenSlide(str(slide_path))
    for row in df.sample(12, random_state=0).itertuples():
        ref = np.asarray(slide.read_region((row.x, row.y), 1, (64, 64)).convert("RGB")) / 255.0
        np.testing.assert_allclose([row.mean_0, row.mean_1, row.mean_2], ref.mean(axis=(0, 1)), atol=1e-5)


def test_resampled_tiles_match_a_resized_region(tmp_path: Path, slide_path: Path, mean_model: Path) -> None:
    job = slide_job([str(slide_path)], mean_model, tmp_path / "out", tiles={"size": 64, "mpp": 0.6})
    df = gpubatch.run(write_job(tmp_path / "job.yaml", job)).predictions()
    slide = openslide.OpenSlide(str(slide_path))
    row = df.iloc[len(df) // 2]
    region = slide.read_region((int(row.x), int(row.y)), 1, (77, 77)).convert("RGB").resize((64, 64))
    assert np.abs(np.asarray(region).mean(axis=(0, 1)) / 255 - [row.mean_0, row.mean_1, row.mean_2]).max() < 0.01


def test_local_cluster_outputs_and_report(tmp_path: Path, slides_dir: Path, classifier: Path) -> None:
    job = slide_job([str(slides_dir / "*.tif")], classifier, tmp_path / "out",
                    tiles={"size": 64, "mpp": 0.5, "tissue": {"method": "otsu", "min_fraction": 0.5}},
                    run={"profile": "local", "workers": 2})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == EXIT_OK
    out = Path(result.output_uri)
    report = json.loads((out / "report.json").read_text())
    for key in ("items", "items_per_s", "wall_s", "starvation", "verdict", "stages", "failed"):
        assert key in report
    assert set(report["stages"]) >= {"read", "model", "write"}
    assert all(set(v) == {"busy_s", "starved_s", "blocked_s"} for v in report["stages"].values())
    assert report["host_cpu"]["cores"] == len(os.sched_getaffinity(0)) and 0 < report["host_cpu"]["busy"] <= 1
    df = result.predictions()
    assert len(df) == report["items"] > 0
    assert np.allclose(df[["probs_0", "probs_1", "probs_2"]].sum(axis=1), 1.0, atol=1e-5)
    assert df["slide"].nunique() == 3
    # Tissue filtering kept only part of each 12x8 grid.
    assert df.groupby("slide").size().max() < 12 * 8
    root = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    group = root[root.attrs["groups"][root.attrs["shards"][0]]]
    assert group.attrs["level"] == 1 and group.attrs["tile_size"] == 64
    assert group.attrs["mpp"] == pytest.approx(0.5)
    assert group.attrs["model_sha256"] == file_sha256(str(classifier))
    assert group["probs"].shape[1] == 3 and group["x"].shape[0] == group["probs"].shape[0]
    # One model session per worker process, reused for every shard it ran.
    audit = audit_lines(out)
    assert len(audit) == 3 and all(a["status"] == "done" for a in audit)
    hosts_pids = {(a["host"], a["pid"]) for a in audit}
    assert 1 <= len(hosts_pids) <= 2


def test_one_session_per_worker_is_reused(tmp_path: Path, slides_dir: Path, classifier: Path) -> None:
    from gpubatch.models import base

    before = base.SESSIONS_CREATED["count"]
    job = slide_job([str(slides_dir / "*.tif")], classifier, tmp_path / "out")
    gpubatch.run(write_job(tmp_path / "job.yaml", job))
    gpubatch.run(write_job(tmp_path / "job.yaml", job), overwrite=True)
    assert base.SESSIONS_CREATED["count"] - before <= 1


def test_bad_slides_are_quarantined_and_the_rest_proceed(tmp_path: Path, slide_path: Path, classifier: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(slide_path, inputs / "good.tif")
    (inputs / "empty.tif").write_bytes(b"")
    (inputs / "truncated.tif").write_bytes(slide_path.read_bytes()[: 40_000])
    (inputs / "text.tif").write_text("not a slide at all\n")
    (inputs / "dir.tif").mkdir()
    write_synthetic_slide(inputs / "nompp.tif", 512, 512, mpp=None, levels=1)
    write_synthetic_slide(inputs / "blank.tif", 512, 512, image=np.full((512, 512, 3), 240, np.uint8), levels=1)
    job = slide_job([str(inputs / "*.tif")], classifier, tmp_path / "out",
                    tiles={"tissue": {"method": "otsu", "min_fraction": 0.5}})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == EXIT_PARTIAL
    failed = {Path(f["input"]).name: f["error"] for f in result.report["failed"]}
    assert set(failed) == {"empty.tif", "truncated.tif", "text.tif", "dir.tif", "nompp.tif"}
    assert "zero-byte" in failed["empty.tif"] and "directory" in failed["dir.tif"]
    assert "MPP" in failed["nompp.tif"]
    df = result.predictions()
    assert set(df["slide"].map(lambda s: Path(s).name)) == {"good.tif"}  # blank: zero tiles, not an error
    shards = {Path(s["input"]).name: s["items"] for s in result.report["shards"]}
    assert shards["blank.tif"] == 0 and shards["good.tif"] > 0


def test_real_svs_end_to_end_without_label_or_macro(tmp_path: Path, classifier: Path) -> None:
    path = shared_file("slides", "CMU-1-Small-Region.svs")
    job = slide_job([str(path)], classifier, tmp_path / "out",
                    tiles={"size": 224, "mpp": 0.5, "tissue": {"method": "otsu", "min_fraction": 0.25}})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == EXIT_OK and 0 < result.report["items"] <= 117
    df = result.predictions()
    step = 224 * 0.5 / 0.499  # level-0 pixels per tile at 0.5 mpp on a 0.499 mpp scan
    assert np.allclose(df["x"] / step, np.round(df["x"] / step), atol=0.01) and df["level"].eq(0).all()


def test_api_open_results_and_overrides(tmp_path: Path, slide_path: Path, classifier: Path) -> None:
    job_path = write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], classifier, tmp_path / "out"))
    result = gpubatch.run(job_path, tiles__size=128, model__batch_size=8)
    assert result.report["batch_size"] == 8
    again = gpubatch.open_results(result.output_uri)
    assert again.report["items"] == result.report["items"] == 8 * 6
    pd.testing.assert_frame_equal(again.predictions(), result.predictions())
    assert gpubatch.load_job(job_path).tiles.size == 64
    # The report's figures come back as data for analysis scripts.
    assert set(result.stages().index) >= {"read", "model", "write"} or "stage" in result.stages().columns
    assert result.timeline()["items"].sum() == result.report["items"]
    assert (Path(result.output_uri) / "report.html").exists()


def test_geojson_tiles_cover_their_level0_footprint(tmp_path: Path, slide_path: Path, classifier: Path) -> None:
    """One QuPath FeatureCollection per slide (geojson/<slide key>.geojson), outputs as measurements.

    Changed on purpose (issue 18): the single predictions.geojson with outputs as top-level
    properties became per-slide files in QuPath's own property layout.
    """
    from gpubatch.sources.slides.source import slide_key

    job = slide_job([str(slide_path)], classifier, tmp_path / "out", output={"formats": ["parquet", "geojson"]})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    path = Path(result.output_uri) / "geojson" / f"{slide_key(str(slide_path))}.geojson"
    features = json.loads(path.read_text())["features"]
    assert len(features) == len(result.predictions()) == 16 * 12
    ring = features[0]["geometry"]["coordinates"][0]
    assert ring[2][0] - ring[0][0] == 128  # 64 px at 0.5 mpp on a 0.25 mpp slide
    assert features[0]["properties"]["objectType"] == "tile"
    assert {"probs_0", "probs_1", "probs_2"} == set(features[0]["properties"]["measurements"])


def test_a_run_with_no_rows_keeps_the_index_columns(tmp_path: Path, classifier: Path) -> None:
    """And the model's columns, from the empty slide's part (changed on purpose: an empty run had
    the index columns alone; tests/test_output_schemas.py compares the whole schema)."""
    blank = write_synthetic_slide(tmp_path / "blank.tif", 512, 512, levels=1,
                                  image=np.full((512, 512, 3), 240, np.uint8))
    job = slide_job([str(blank)], classifier, tmp_path / "out",
                    tiles={"tissue": {"method": "otsu", "min_fraction": 0.5}})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    df = result.predictions()
    assert result.exit_code == EXIT_OK and len(df) == 0
    assert list(df.columns) == ["slide", "x", "y", "level", "probs_0", "probs_1", "probs_2"]


def test_short_last_batch_is_padded_then_trimmed(tmp_path: Path, slide_path: Path, mean_model: Path) -> None:
    """192 tiles in batches of 13 end with a batch of 10, run as 13 and trimmed back."""
    runs = {}
    for batch in (16, 13):
        job = slide_job([str(slide_path)], mean_model, tmp_path / f"out{batch}")
        job["model"]["batch_size"] = batch
        runs[batch] = gpubatch.run(write_job(tmp_path / f"job{batch}.yaml", job))
    assert runs[13].report["counters"]["padded.items"] == 3
    assert "padded.items" not in runs[16].report["counters"]
    a, b = (runs[k].predictions().sort_values(["x", "y"]).reset_index(drop=True) for k in (16, 13))
    assert len(b) == 192 and not b.duplicated(["x", "y"]).any()
    pd.testing.assert_frame_equal(a, b)


def test_two_shards_on_one_worker_share_the_model_stage(tmp_path: Path, slide_path: Path, mean_model: Path) -> None:
    """Two slides at once on one worker take turns in the model stage with one reused input
    buffer; every item still gets its own tile's values (small batches interleave often)."""
    other = write_synthetic_slide(tmp_path / "other.tif", 1536, 1024, seed=5)
    job = slide_job([str(slide_path), str(other)], mean_model, tmp_path / "out",
                    tiles={"size": 64, "mpp": 0.5}, run={"profile": "local", "workers": 1})
    job["model"]["batch_size"] = 8
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    df = result.predictions()
    counters = result.report["counters"]
    assert df["slide"].nunique() == 2 and counters["model.warmup_s"] > 0
    assert result.report["stage_parts"]["model"]["turn"] > 0  # the wait for the other shard, a part
    for path in (slide_path, other):
        slide = openslide.OpenSlide(str(path))
        rows = df[df["slide"] == str(path)].sample(15, random_state=1)
        for row in rows.itertuples():
            ref = np.asarray(slide.read_region((row.x, row.y), 1, (64, 64)).convert("RGB")) / 255.0
            np.testing.assert_allclose([row.mean_0, row.mean_1, row.mean_2], ref.mean(axis=(0, 1)), atol=1e-5)


def test_a_run_walks_only_its_own_objects_and_leaves_the_collector_as_it_found_it(
        tmp_path: Path, slide_path: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The objects the process held before a run are frozen out of the collector's walks while it
    runs (its end's full collection walks what the run made), and given back after it, whether
    the run ended well or failed: nothing stays frozen, so later collections see them again."""
    import gc

    from gpubatch.runtime import runner

    at_the_end: list[int] = []
    hand_back = runner.hand_back_freed_memory

    def recorded(collect: bool = True) -> None:
        at_the_end.append(gc.get_freeze_count())
        hand_back(collect)

    monkeypatch.setattr(runner, "hand_back_freed_memory", recorded)
    job = slide_job([str(slide_path)], mean_model, tmp_path / "out", run={"profile": "inline"})
    assert gpubatch.run(write_job(tmp_path / "job.yaml", job)).exit_code == EXIT_OK
    assert at_the_end and min(at_the_end) > 1000, at_the_end  # the imports, the test's objects
    assert gc.get_freeze_count() == 0
    with pytest.raises(SpecError, match="--resume"):  # raised mid-run: the output has commits
        gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert gc.get_freeze_count() == 0


def test_quarantined_inputs_are_listed_in_the_plans_order_whatever_order_they_failed_in() -> None:
    """report.json's `failed` took shards in the order they failed: with concurrent shards two
    runs of one job listed the same refusals apart, and validate's order (the plan's) differed
    from the run's (CI, test_validate_names_the_remote_images_a_run_quarantines)."""
    from gpubatch.runtime.runner import _in_plan_order
    from gpubatch.sources import Shard

    shards = [Shard(f"s-{i}", uri) for i, uri in enumerate(["a.tif", "b.tif", "c.tif", "c.tif"])]
    failed = [{"input": "c.tif", "error": "late"}, {"input": "plan.bed:3", "error": "refused at plan"},
              {"input": "a.tif", "error": "early"}]
    _in_plan_order(failed, shards)
    assert [f["input"] for f in failed] == ["plan.bed:3", "a.tif", "c.tif"]
