"""Batch-size tuning: the choice rule on a known curve, a real sweep, the cache, `gpubatch tune`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import slide_job, write_job

import gpubatch
from gpubatch.cli.main import main
from gpubatch.models.base import get_model
from gpubatch.models.prepare.tune import CurvePoint, cache_path, choose_batch, sweep, tune_model


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))


def _curve(pairs: list[tuple[int, float]]) -> list[CurvePoint]:
    return [CurvePoint(b, ips, float(b), b / ips) for b, ips in pairs]


def test_choose_smallest_within_95_percent() -> None:
    curve = _curve([(1, 100), (2, 180), (4, 300), (8, 390), (16, 400), (32, 405), (64, 398)])
    assert choose_batch(curve) == 8  # 390 >= 0.95 * 405; 300 is not
    assert choose_batch(curve, within=1.0) == 32
    assert choose_batch(_curve([(1, 50), (2, 49), (4, 48)])) == 1  # flat: the smallest wins
    with pytest.raises(ValueError):
        choose_batch([])


def test_real_sweep_returns_a_power_of_two(classifier: Path) -> None:
    import numpy as np

    model = get_model(str(classifier), "onnxruntime")
    items = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    curve, why = sweep(model, items, max_batch=16, min_time_s=0.05)
    sizes = [p.batch_size for p in curve]
    assert sizes == [1, 2, 4, 8, 16] and "max batch" in why
    assert all(p.items_per_s > 0 and p.peak_mb >= 0 for p in curve)
    chosen = choose_batch(curve)
    assert chosen in sizes and chosen & (chosen - 1) == 0


def test_tune_model_caches_the_choice(classifier: Path) -> None:
    import numpy as np

    model = get_model(str(classifier), "onnxruntime")
    items = np.zeros((2, 3, 224, 224), np.float32)
    first = tune_model(model, items, "sha-x", max_batch=4, min_time_s=0.02)
    assert not first.cached and cache_path().is_file()
    again = tune_model(model, items, "sha-x", max_batch=4)
    assert again.cached and again.batch_size == first.batch_size and len(again.curve) == 3
    entry = json.loads(cache_path().read_text())[first.key]
    assert entry["batch_size"] == first.batch_size


def test_a_new_backend_version_is_a_cache_miss(classifier: Path) -> None:
    """The key left out the backend library's version: after an onnxruntime (torch, TensorRT)
    upgrade, which can move the best batch size, the cache kept serving the old choice. An entry
    stored under another version (as the cache holds it from before an upgrade) is a miss."""
    import numpy as np
    import onnxruntime

    model = get_model(str(classifier), "onnxruntime")
    items = np.zeros((2, 3, 224, 224), np.float32)
    first = tune_model(model, items, "sha-v", max_batch=2, min_time_s=0.01)
    assert f"onnxruntime-{onnxruntime.__version__}" in first.key.split("|")
    entries = json.loads(cache_path().read_text())
    older = first.key.replace(f"onnxruntime-{onnxruntime.__version__}", "onnxruntime-1.0.0")
    cache_path().write_text(json.dumps({older: entries.pop(first.key)}))  # only the old version's entry
    swept = tune_model(model, items, "sha-v", max_batch=2, min_time_s=0.01)
    assert not swept.cached and swept.key == first.key
    assert set(json.loads(cache_path().read_text())) == {older, first.key}
    assert tune_model(model, items, "sha-v", max_batch=2).cached


@pytest.fixture(scope="module")
def mean_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The per-channel-mean model at 64 px: a sweep to 512 stays small and fast."""
    from gpubatch.cli.demo import make_mean_colour_model

    return make_mean_colour_model(tmp_path_factory.mktemp("tune") / "mean64.onnx", size=64)


def _auto_job(tmp_path: Path, slides_dir: Path, mean_model: Path) -> Path:
    job = slide_job([str(slides_dir / "*.tif")], mean_model, tmp_path / "out", tiles={"size": 64, "mpp": 0.25})
    job["model"]["batch_size"] = "auto"
    return write_job(tmp_path / "job.yaml", job)


def test_tune_command_prints_curve_and_choice(tmp_path: Path, slides_dir: Path, mean_model: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", str(_auto_job(tmp_path, slides_dir, mean_model))]) == 0
    out = capsys.readouterr().out
    assert "items/s" in out and "<- chosen" in out and "chosen batch_size:" in out
    chosen = int(out.split("chosen batch_size:")[1].split()[0])
    assert chosen & (chosen - 1) == 0 and 1 <= chosen <= 512


def test_auto_batch_run_uses_tuning(tmp_path: Path, slides_dir: Path, mean_model: Path) -> None:
    result = gpubatch.run(_auto_job(tmp_path, slides_dir, mean_model), profile="inline", show_progress=False)
    report = result.report
    assert result.exit_code == 0 and report["batch_size"] == report["tuning"]["batch_size"]
    assert report["model_only_items_per_s_measured"] > 0 and report["model_only_items_per_s"] > 0
    again = gpubatch.run(_auto_job(tmp_path, slides_dir, mean_model), profile="inline", show_progress=False,
                         overwrite=True)
    assert again.report["tuning"]["cached"] is True and again.report["batch_size"] == report["batch_size"]


def _first_and_last_truncated(folder: Path, slides_dir: Path) -> Path:
    """Three slides, a0 and c2 (the first and last of the plan) cut short, b1 whole."""
    folder.mkdir()
    (folder / "a0.tif").write_bytes((slides_dir / "s0.tif").read_bytes()[:5000])
    (folder / "b1.tif").write_bytes((slides_dir / "s1.tif").read_bytes())
    (folder / "c2.tif").write_bytes((slides_dir / "s2.tif").read_bytes()[:5000])
    return folder


def test_auto_batch_run_survives_bad_first_and_last_inputs(tmp_path: Path, slides_dir: Path,
                                                           mean_model: Path) -> None:
    """Tuning samples the plan's first and last inputs; when both are bad it takes the next ones,
    and the run quarantines the two and finishes the third (exit 3), as with a fixed batch size."""
    bad = _first_and_last_truncated(tmp_path / "bad", slides_dir)
    job = slide_job([str(bad / "*.tif")], mean_model, tmp_path / "out", tiles={"size": 64, "mpp": 0.25})
    job["model"]["batch_size"] = "auto"
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job), show_progress=False)
    assert result.exit_code == 3
    assert sorted(Path(f["input"]).name for f in result.report["failed"]) == ["a0.tif", "c2.tif"]
    assert set(result.predictions()["slide"].map(lambda s: Path(s).name)) == {"b1.tif"}
    assert result.report["batch_size"] == result.report["tuning"]["batch_size"]


@pytest.mark.parametrize("damage", ["[]", '{"k": 1}', "{trunc", "entry"])
def test_a_damaged_cache_is_a_miss_not_a_traceback(classifier: Path, damage: str) -> None:
    """tune.json is a user file (edited, truncated, another tool's): what does not read back is
    swept again and the file rewritten, in `tune` and in a `batch_size: auto` run alike."""
    import numpy as np

    model = get_model(str(classifier), "onnxruntime")
    items = np.zeros((2, 3, 224, 224), np.float32)
    first = tune_model(model, items, "sha-d", max_batch=2, min_time_s=0.01)
    if damage == "entry":
        data = json.loads(cache_path().read_text())
        data[first.key] = {"batch_size": "big", "curve": [{"nope": 1}]}
        cache_path().write_text(json.dumps(data))
    else:
        cache_path().write_text(damage)
    again = tune_model(model, items, "sha-d", max_batch=2, min_time_s=0.01)
    assert not again.cached and again.batch_size in (1, 2)
    assert tune_model(model, items, "sha-d", max_batch=2).cached


def test_auto_batch_run_over_inputs_that_all_fail_quarantines_and_reports_them(
        tmp_path: Path, slides_dir: Path, mean_model: Path) -> None:
    """With nothing to tune on, an auto run stopped before any shard (exit 1, no report.json,
    'status' saying no run had started); a fixed batch size quarantined and reported each input.
    Now both do the latter."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.tif").write_bytes((slides_dir / f"s{i}.tif").read_bytes()[:5000])
    job = slide_job([str(bad / "*.tif")], mean_model, tmp_path / "out", tiles={"size": 64, "mpp": 0.25})
    job["model"]["batch_size"] = "auto"
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job), show_progress=False)
    assert result.exit_code == 1
    assert sorted(Path(f["input"]).name for f in result.report["failed"]) == ["x0.tif", "x1.tif", "x2.tif"]
    assert "no items could be read" in result.report["tuning"]["skipped"]
    assert (tmp_path / "out" / "report.json").is_file()
    assert main(["tune", str(tmp_path / "job.yaml")]) == 1  # tune has nothing to measure: its failure
