"""Foundation-model patch features: ViT encoders through the engine, and the features read back for MIL.

The reference for every embedding is the same ViT (same seed) run in plain torch on tiles read
independently with OpenSlide and normalised by hand: nothing of gpubatch's read, preprocess or
model path is used to make the expected values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import slide_job, write_job

import gpubatch
from gpubatch.cli.pathology_models import build_vit, make_vit

SIZE = 112  # a ViT input of 112 px: 8 x 8 patches of 14 or 7 x 7 of 16
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _job(slides: list[str], model_path: Path, out: Path, **extra: dict) -> dict:
    job = slide_job(slides, model_path, out, tiles={"size": SIZE, "level": 0, "mpp": None})
    job["model"].update(backend="auto", input={"mean": MEAN, "std": STD})
    for key, value in extra.items():
        job[key] = {**job.get(key, {}), **value}
    return job


def _reference(slide: Path, coords: pd.DataFrame, vit: torch.nn.Module) -> np.ndarray:
    """The encoder's output for each tile, from OpenSlide's pixels and a hand-written normalisation."""
    import openslide

    with openslide.OpenSlide(str(slide)) as s:
        tiles = np.stack([np.asarray(s.read_region((int(x), int(y)), 0, (SIZE, SIZE)).convert("RGB"))
                          for x, y in zip(coords["x"], coords["y"], strict=True)])
    x = (tiles.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    with torch.no_grad():
        return vit(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize(("patch", "registers"), [(14, 0), (16, 4)])
def test_vit_features_equal_the_encoder_on_the_same_tiles(tmp_path: Path, slide_path: Path, patch: int,
                                                          registers: int) -> None:
    model = make_vit(tmp_path / "vit.onnx", img=SIZE, patch=patch, dim=48, depth=2, heads=3,
                     registers=registers, seed=patch)
    result = gpubatch.run(write_job(tmp_path / "job.yaml", _job([str(slide_path)], model, tmp_path / "out")))
    assert result.exit_code == 0
    features, coords = result.embeddings(str(slide_path))
    rows = result.predictions()
    assert features.shape == (len(rows), 48) == (18 * 13, 48) and features.dtype == np.float32
    np.testing.assert_array_equal(coords[["x", "y", "level"]].to_numpy(), rows[["x", "y", "level"]].to_numpy())
    vit = build_vit(img=SIZE, patch=patch, dim=48, depth=2, heads=3, registers=registers, seed=patch)
    np.testing.assert_allclose(features, _reference(slide_path, coords, vit), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("fmt", ["torchscript", "exported_program"])
def test_the_torch_backend_runs_vits_in_fp32_fp16_and_bf16(tmp_path: Path, slide_path: Path, fmt: str) -> None:
    suffix = ".pt" if fmt == "torchscript" else ".pt2"
    model = make_vit(tmp_path / f"vit{suffix}", img=SIZE, patch=16, dim=32, depth=1, heads=2, registers=2,
                     seed=5, fmt=fmt)
    vit = build_vit(img=SIZE, patch=16, dim=32, depth=1, heads=2, registers=2, seed=5)
    got = {}
    for precision in ("fp32", "fp16", "bf16"):
        job = _job([str(slide_path)], model, tmp_path / precision,
                   model={"precision": precision, "calibration": {"items": 16},
                          "validation": {"items": 48, "min_agreement": 0.98}})
        result = gpubatch.run(write_job(tmp_path / f"{precision}.yaml", job))
        assert result.exit_code == 0 and result.report["precision"] == precision
        got[precision], coords = result.embeddings(str(slide_path), "output")
    np.testing.assert_allclose(got["fp32"], _reference(slide_path, coords, vit), atol=2e-4, rtol=1e-3)
    for precision in ("fp16", "bf16"):
        a, b = got[precision], got["fp32"]
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.99, precision  # reduced, close, and not silently fp32
        assert not np.array_equal(a, b), precision


def test_features_for_mil_are_read_row_for_row_even_without_tiles(tmp_path: Path, slide_path: Path) -> None:
    from gpubatch.cli.demo import write_synthetic_slide

    blank = write_synthetic_slide(tmp_path / "blank.tif", 512, 512, levels=1,
                                  image=np.full((512, 512, 3), 240, np.uint8))
    model = make_vit(tmp_path / "vit.onnx", img=SIZE, patch=16, dim=40, depth=1, heads=2)
    job = _job([str(slide_path), str(blank)], model, tmp_path / "out",
               tiles={"tissue": {"method": "otsu", "min_fraction": 0.5}})
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    again = gpubatch.open_results(result.output_uri)
    features, coords = again.embeddings(str(slide_path))
    rows = result.predictions()
    assert 0 < len(features) == len(rows) < 18 * 13  # the tissue filter kept some tiles
    assert list(coords.columns) == ["x", "y", "level"]
    np.testing.assert_array_equal(coords["x"].to_numpy(), rows["x"].to_numpy())
    empty, nothing = again.embeddings(str(blank))
    assert empty.shape == (0, 40) and empty.dtype == np.float32
    assert len(nothing) == 0 and list(nothing.columns) == ["x", "y", "level"]
    assert list(rows.columns) == ["slide", "x", "y", "level"]  # 40 wide: zarr only
    with pytest.raises(gpubatch.core.errors.GpubatchError, match="no features for"):
        again.embeddings(str(tmp_path / "never-run.tif"))


def test_the_zarr_layout_is_readable_without_gpubatch(tmp_path: Path, slide_path: Path) -> None:
    """What docs/outputs.md promises a MIL script that reads predictions.zarr with zarr alone."""
    import zarr

    model = make_vit(tmp_path / "vit.onnx", img=SIZE, patch=16, dim=24, depth=1, heads=2)
    result = gpubatch.run(write_job(tmp_path / "job.yaml", _job([str(slide_path)], model, tmp_path / "out")))
    root = zarr.open_group(str(Path(result.output_uri) / "predictions.zarr"), mode="r")
    (key,) = root.attrs["shards"]
    group = root[root.attrs["groups"][key]]  # groups are named by attempt: the root says which
    assert group.attrs["index_columns"] == ["x", "y", "level"] and group.attrs["outputs"] == ["embedding"]
    assert group["embedding"].shape == (18 * 13, 24) and group.attrs["slide"] == str(slide_path)
    features, coords = result.embeddings(key)  # a key works as well as the URI
    np.testing.assert_array_equal(group["embedding"][:], features)
    np.testing.assert_array_equal(group["x"][:], coords["x"].to_numpy())
