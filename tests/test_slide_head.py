"""A slide-level head (gated ABMIL, ONNX) run as a second stage on each slide's bag of ViT features.

Expected values come from the same ABMIL (same seed) run in plain torch on the features the run
kept, never from gpubatch's head stage.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from conftest import slide_job, write_job
from PIL import Image

import gpubatch
from gpubatch.cli.pathology_models import build_abmil, make_abmil, make_vit
from gpubatch.core.errors import EXIT_PARTIAL, EXIT_USAGE
from gpubatch.sources.slides.source import slide_key

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]
DIM, SIZE = 48, 112  # wider than 32 values: embeddings stay in zarr


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("head-models")
    return {"vit": make_vit(root / "vit.onnx", img=SIZE, patch=16, dim=DIM, depth=1, heads=2, seed=1),
            "abmil": make_abmil(root / "abmil.onnx", dim=DIM, hidden=16, classes=3, seed=2),
            "narrow": make_abmil(root / "narrow.onnx", dim=DIM + 8, hidden=16, classes=3, seed=2)}


@pytest.fixture(scope="module")
def blank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpubatch.cli.demo import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("blank") / "blank.tif", 512, 512, levels=1,
                                 image=np.full((512, 512, 3), 240, np.uint8))


def _job(slides: list[str], models: dict[str, Path], out: Path, head: str = "abmil", **sections: dict) -> dict:
    job = slide_job(slides, models["vit"], out, tiles={"size": SIZE, "tissue": {"method": "otsu", "min_fraction": 0.3}},
                    slide_model={"path": str(models[head])})
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value}
    return job


def _torch_head(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    head = build_abmil(dim=DIM, hidden=16, classes=3, seed=2)
    with torch.no_grad():
        attention, logits = head(torch.from_numpy(features))
    return attention.numpy(), logits.numpy()[0]


def test_attention_sums_to_one_per_slide_and_logits_match_torch(tmp_path: Path, slides_dir: Path,
                                                                blank: Path, models: dict[str, Path]) -> None:
    slides = [str(p) for p in sorted(slides_dir.glob("*.tif"))] + [str(blank)]
    result = gpubatch.run(write_job(tmp_path / "job.yaml", _job(slides, models, tmp_path / "out")))
    assert result.exit_code == 0
    rows = result.predictions()
    assert list(rows.columns) == ["slide", "x", "y", "level", "attention"]
    table = result.slide_predictions()
    assert list(table.columns) == ["slide", "tiles", "logits_0", "logits_1", "logits_2"]
    assert list(table["slide"]) == slides
    for slide in slides[:-1]:
        attention = rows.loc[rows["slide"] == slide, "attention"].to_numpy()
        assert len(attention) > 1 and attention.sum() == pytest.approx(1.0, abs=1e-5) and (attention > 0).all()
        want_attention, want_logits = _torch_head(result.embeddings(slide)[0])
        np.testing.assert_allclose(attention, want_attention, atol=1e-5)
        got = table.loc[table["slide"] == slide, ["logits_0", "logits_1", "logits_2"]].to_numpy()[0]
        np.testing.assert_allclose(got, want_logits, atol=1e-4)
        assert int(table.loc[table["slide"] == slide, "tiles"].iloc[0]) == len(attention)
    empty = table[table["slide"] == str(blank)].iloc[0]
    assert empty["tiles"] == 0 and np.isnan(empty[["logits_0", "logits_1", "logits_2"]].astype(float)).all()
    assert result.embeddings(str(blank))[0].shape == (0, DIM)
    assert result.report["parts"]["slide_head"] > 0
    maps = Path(result.output_uri) / "heatmaps"
    assert sorted(p.name for p in maps.iterdir()) == sorted(f"{slide_key(s)}.png" for s in slides[:-1])
    assert {Image.open(p).text["gpubatch:colour"] for p in maps.iterdir()} == {"attention"}
    assert gpubatch.open_results(result.output_uri).slide_predictions().equals(table)


def test_a_head_taking_a_batch_axis_is_fed_one(tmp_path: Path, slide_path: Path, models: dict[str, Path]) -> None:
    """Heads exported for (1, N, D) bags (CLAM, TransMIL style) get the batch axis they declare."""

    class Batched(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_abmil(dim=DIM, hidden=16, classes=3, seed=2)

        def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            attention, logits = self.inner(bag[0])
            return attention[None], logits

    path = tmp_path / "batched.onnx"
    torch.onnx.export(Batched().eval(), (torch.zeros(1, 7, DIM),), str(path), input_names=["bag"],
                      output_names=["attention", "logits"], dynamic_axes={"bag": {1: "n"}, "attention": {1: "n"}},
                      opset_version=17, dynamo=False)
    result = gpubatch.run(write_job(tmp_path / "job.yaml", _job([str(slide_path)], {**models, "b": path},
                                                                 tmp_path / "out", head="b")))
    attention = result.predictions()["attention"].to_numpy()
    want_attention, want_logits = _torch_head(result.embeddings(str(slide_path))[0])
    np.testing.assert_allclose(attention, want_attention, atol=1e-5)
    got = result.slide_predictions()[["logits_0", "logits_1", "logits_2"]].to_numpy()[0]
    np.testing.assert_allclose(got, want_logits, atol=1e-4)


def test_resume_keeps_each_slides_head_outputs(tmp_path: Path, slides_dir: Path, models: dict[str, Path]) -> None:
    slides = [str(p) for p in sorted(slides_dir.glob("*.tif"))]
    job_path = write_job(tmp_path / "job.yaml", _job(slides, models, tmp_path / "out"))
    first = gpubatch.run(job_path)
    manifest = sorted((Path(first.output_uri) / "_manifest").glob("*.json"))
    entry = json.loads(manifest[1].read_text())
    assert set(entry["shard_outputs"]) == {"logits"}  # committed with the shard
    manifest[1].unlink()  # as if the run had died before this slide's commit
    again = gpubatch.run(job_path, resume=True)
    resumed = {s["input"]: s["resumed"] for s in again.report["shards"]}
    assert resumed == {slides[0]: True, slides[1]: False, slides[2]: True}
    assert again.slide_predictions().equals(first.slide_predictions())
    assert again.predictions().equals(first.predictions())


def test_a_quarantined_slide_has_no_head_row(tmp_path: Path, slides_dir: Path, models: dict[str, Path]) -> None:
    bad = tmp_path / "corrupt.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    slides = [str(sorted(slides_dir.glob("*.tif"))[0]), str(bad)]
    result = gpubatch.run(write_job(tmp_path / "job.yaml", _job(slides, models, tmp_path / "out")))
    assert result.exit_code == EXIT_PARTIAL and [f["input"] for f in result.failed] == [str(bad)]
    assert list(result.slide_predictions()["slide"]) == slides[:1]


def test_the_head_holds_a_slides_features_once(tmp_path: Path) -> None:
    """The bag was np.concatenate of the kept batches, which stayed alive until written: every
    feature held twice (a 20 000-tile, 1536-wide slide: 2 x 123 MB). Measured with tracemalloc
    (numpy's buffers are traced; ONNX Runtime's arena is not), from before the batches exist."""
    import tracemalloc

    from gpubatch.core.clocks import StageClocks
    from gpubatch.engine.slide_head import SlideHead
    from gpubatch.models.base import get_model
    from gpubatch.outputs.store import OutputStore
    from gpubatch.outputs.writer import ShardWriter

    width, tiles, batch = 512, 4096, 256
    head = SlideHead(get_model(str(make_abmil(tmp_path / "h.onnx", dim=width, hidden=8, classes=2)),
                               "onnxruntime", "fp32", 1), None)
    head.shape(width)  # probed once per worker in a run, before any slide's bag
    writer = ShardWriter(OutputStore(tmp_path / "out"), "s", "a1", {}, {}, ["parquet"])
    rng = np.random.default_rng(0)
    tracemalloc.start()
    sink = head.sink(tiles)
    for start in range(0, tiles, batch):
        xs = np.arange(start, start + batch, dtype=np.int64)
        sink.write({"x": xs, "y": xs}, {"embedding": rng.standard_normal((batch, width), dtype=np.float32)})
    features = tiles * width * 4
    head.finish(sink, writer, lambda: ({}, {}), StageClocks())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.3 * features, f"peak {peak / 2**20:.1f} MiB for {features / 2**20:.1f} MiB of features"
    writer.abort()


def _nan_encoder(path: Path) -> Path:
    """ONNX: a DIM-wide feature per tile, every value NaN (0/0 of the tile's mean colour times 0)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zeros = numpy_helper.from_array(np.zeros((3, DIM), np.float32), "w")
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["z"]), helper.make_node("Div", ["z", "z"], ["embedding"])]
    graph = helper.make_graph(nodes, "nan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", DIM])], [zeros])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_head_giving_nan_for_a_slide_with_tiles_is_said(tmp_path: Path, slide_path: Path,
                                                           models: dict[str, Path]) -> None:
    """NaN features make NaN logits, written as nulls: the same row as a slide without tissue,
    and nothing said of the head (only of the tile features)."""
    job = _job([str(slide_path)], {**models, "vit": _nan_encoder(tmp_path / "nan.onnx")}, tmp_path / "out")
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    row = result.slide_predictions().iloc[0]
    assert row["tiles"] > 0 and np.isnan(row["logits_0"])
    notes = result.report["notes"]
    assert any("the slide model gave NaN or infinite values (attention " in n and "logits 3" in n for n in notes), notes


def _validate(job_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpubatch", "validate", str(job_path)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(("change", "expected"), [
    ({"path": "missing.onnx"}, "slide_model.path: file not found"),
    ({"features": "logits"}, "slide_model.features: 'logits' is not an output of model.path"),
    ({"head": "narrow"}, "takes features 56 wide but model.path's output 'embedding' gives 48 per tile; export the head"),
])
def test_validate_refuses_a_slide_model_run_would_refuse(tmp_path: Path, slide_path: Path,
                                                         models: dict[str, Path], change: dict, expected: str) -> None:
    job = _job([str(slide_path)], models, tmp_path / "out", head=change.pop("head", "abmil"))
    job["slide_model"].update(change)
    done = _validate(write_job(tmp_path / "job.yaml", job))
    assert done.returncode == EXIT_USAGE and expected in done.stderr + done.stdout


def test_validate_refuses_a_head_exported_with_a_fixed_bag_length(tmp_path: Path, slide_path: Path,
                                                                 models: dict[str, Path]) -> None:
    """A head exported from bags padded to 512 tiles (no dynamic axis) was accepted by validate,
    and then every slide failed at its end, once its features were computed, and was quarantined."""
    from gpubatch.cli.pathology_models import _export_onnx

    fixed = tmp_path / "fixed.onnx"
    _export_onnx(build_abmil(dim=DIM, hidden=16, classes=3, seed=2), (torch.zeros(512, DIM),), fixed,
                 ["bag"], ["attention", "logits"], {})
    done = _validate(write_job(tmp_path / "job.yaml", _job([str(slide_path)], {**models, "fixed": fixed},
                                                          tmp_path / "out", head="fixed")))
    assert done.returncode == EXIT_USAGE, done.stdout + done.stderr
    assert "takes a bag of shape (512, 48)" in done.stderr and "dynamic tiles axis" in done.stderr


def test_a_slide_model_needs_slides(tmp_path: Path, models: dict[str, Path]) -> None:
    job = {"kind": "genome", "windows": {"reference": "g.fa"}, "model": {"path": str(models["vit"])},
           "slide_model": {"path": str(models["abmil"])}, "output": {"uri": str(tmp_path / "o")}}
    done = _validate(write_job(tmp_path / "job.yaml", job))
    assert done.returncode == EXIT_USAGE and "kind: slides only" in done.stderr + done.stdout


def test_features_and_head_outputs_on_object_storage(tmp_path: Path, slide_path: Path, models: dict[str, Path],
                                                     s3: S3Stack) -> None:
    uri = f"s3://{s3.bucket}/features/{tmp_path.name}"
    job = _job([str(slide_path)], models, tmp_path / "unused")
    job["output"] = {"uri": uri, "formats": ["zarr", "parquet", "geojson"], "storage": s3.options()}
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job), profile="inline")
    again = gpubatch.open_results(uri, s3.options())
    features, coords = again.embeddings(str(slide_path))
    assert features.shape == (len(again.predictions()), DIM) and len(coords) == len(features)
    want_attention, want_logits = _torch_head(features)
    np.testing.assert_allclose(again.predictions()["attention"].to_numpy(), want_attention, atol=1e-5)
    np.testing.assert_allclose(again.slide_predictions()[["logits_0", "logits_1", "logits_2"]].to_numpy()[0],
                               want_logits, atol=1e-4)
    names = {p.rsplit("/", 1)[-1] for p in s3.fs().find(uri.removeprefix("s3://"))}
    key = slide_key(str(slide_path))
    assert {f"{key}.png", f"{key}.geojson", "slide_predictions.parquet"} <= names and result.exit_code == 0


def test_resume_refuses_another_slide_model(tmp_path: Path, slide_path: Path, models: dict[str, Path]) -> None:
    """The head's outputs are committed with each slide: another head must not meet them."""
    from gpubatch.core.errors import SpecError

    other = make_abmil(tmp_path / "other.onnx", dim=DIM, hidden=16, classes=3, seed=9)
    first = _job([str(slide_path)], models, tmp_path / "out")
    assert gpubatch.run(write_job(tmp_path / "a.yaml", first)).exit_code == 0
    second = _job([str(slide_path)], {**models, "other": other}, tmp_path / "out", head="other")
    with pytest.raises(SpecError, match="slide_model.sha256"):
        gpubatch.run(write_job(tmp_path / "b.yaml", second), resume=True)
