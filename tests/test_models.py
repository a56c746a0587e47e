"""Backends through the registry: the torch backend against ONNX Runtime, the missing-extra message,
``backend: auto``, and the gate's figures on known outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpubatch.core.errors import GpubatchError, MissingExtraError
from gpubatch.models.base import (
    BACKENDS,
    BackendEntry,
    backend_available,
    backend_class,
    get_model,
    register_backend,
    resolve_backend,
)
from gpubatch.models.prepare.validate import compare_outputs, detect_task, top_probability

torch = pytest.importorskip("torch")


def _net() -> Any:
    from torch import nn

    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4), nn.Softmax(dim=1),
    ).eval()


@pytest.fixture(scope="module")
def same_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One network saved three ways: ONNX, TorchScript (.pt) and an ExportedProgram (.pt2)."""
    from gpubatch.cli.demo import _export

    d = tmp_path_factory.mktemp("torch")
    net, example = _net(), torch.rand(2, 3, 32, 32)
    paths = {"onnx": _export(net, example, d / "net.onnx", ["probs"]), "ts": d / "net.pt", "ep": d / "net.pt2"}
    torch.jit.save(torch.jit.trace(net, example), str(paths["ts"]))
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: batch},)), str(paths["ep"]))
    return paths


def _batch(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ts", "ep"])
def test_torch_backend_matches_onnxruntime(same_weights: dict[str, Path], kind: str) -> None:
    x = _batch()
    ort_out = get_model(str(same_weights["onnx"]), "onnxruntime").run(x)["probs"]
    model = get_model(str(same_weights[kind]), "auto")
    assert model.backend == "torch" and model.device in ("cpu", "cuda")
    out = model.run(x)
    assert list(out) == model.output_names == ["output"]
    np.testing.assert_allclose(out["output"], ort_out, rtol=1e-4, atol=1e-5)


def test_torch_backend_refuses_int8(same_weights: dict[str, Path]) -> None:
    with pytest.raises(GpubatchError, match="explicit QDQ"):
        backend_class("torch")(str(same_weights["ts"]), precision="int8")


def test_missing_extra_names_the_pip_extra() -> None:
    register_backend("nopkg", BackendEntry("gpubatch.models.nopkg", "NoPkg", "gpubatch_no_such_package", "nopkg"))
    try:
        with pytest.raises(MissingExtraError) as info:
            backend_class("nopkg")
        assert "pip install 'gpubatch[nopkg]'" in str(info.value)
        assert "gpubatch_no_such_package" in str(info.value)
        assert isinstance(info.value, ImportError) and not backend_available("nopkg")
    finally:
        BACKENDS.pop("nopkg", None)


def test_tensorrt_missing_names_gpu_extra() -> None:
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(MissingExtraError, match=r"pip install 'gpubatch\[gpu\]'"):
        backend_class("tensorrt")


def test_unknown_backend_lists_known() -> None:
    with pytest.raises(GpubatchError, match="onnxruntime"):
        backend_class("nonesuch")


def test_auto_backend() -> None:
    assert resolve_backend("auto", "m.pt2") == "torch" and resolve_backend("auto", "m.ts") == "torch"
    expected = "tensorrt" if backend_available("tensorrt") else "onnxruntime"
    assert resolve_backend("auto", "m.onnx") == expected
    assert backend_available("onnxruntime") and backend_available("torch")


def test_gate_figures_classifier_and_regressor() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), 200)
    flipped = probs.copy()
    flipped[:20] = flipped[:20, ::-1]
    assert detect_task({"p": probs}) == "classifier"
    figs = compare_outputs({"p": probs}, {"p": flipped}, "classifier")
    assert figs["agreement"] == pytest.approx(np.mean(probs.argmax(1) == flipped.argmax(1)))
    y = rng.standard_normal((200, 1))
    assert detect_task({"y": y}) == "regressor"
    reg = compare_outputs({"y": y}, {"y": y * 1.01 + 0.001}, "regressor")
    assert reg["agreement"] > 0.999 and reg["outputs"]["y"]["relative_error"] == pytest.approx(0.01, abs=0.005)
    top = top_probability({"p": probs})
    assert top is not None
    np.testing.assert_allclose(top, probs.max(1))


def test_torch_bf16_goes_through_the_gate(same_weights: dict[str, Path], slide_path: Path, tmp_path: Path) -> None:
    from conftest import slide_job, write_job

    from gpubatch.models.prepare.resolve import prepare_model
    from gpubatch.sources import get_source
    from gpubatch.spec import load_job

    spec = slide_job([str(slide_path)], same_weights["ts"], tmp_path / "out", tiles={"size": 32})
    spec["model"].update({"backend": "torch", "precision": "bf16", "calibration": {"items": 16},
                          "validation": {"items": 64, "min_agreement": 0.5}})
    job = load_job(write_job(tmp_path / "job.yaml", spec))
    source = get_source("slides")
    shards, _ = source.plan(job)
    prepared = prepare_model(job, source, shards, tmp_path / "out")
    q = prepared.report["quantization"]
    assert prepared.precision == "bf16" and prepared.path == job.model.path and q["passed"]
    assert q["validation"]["items"] == 64 and q["validation"]["task"] == "classifier"
