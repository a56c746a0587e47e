"""Every model backend passes ModelBackendTests: ONNX Runtime, torch (TorchScript and
ExportedProgram), and TensorRT where a GPU and the package are present."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpubatch.models.base import Model, backend_class
from gpubatch.testing.models import ModelBackendTests

torch = pytest.importorskip("torch")
ITEM = (3, 32, 32)


def _net() -> Any:
    from torch import nn

    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 4), nn.Softmax(dim=1),
    ).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gpubatch.cli.demo import _export

    d = tmp_path_factory.mktemp("conformance-models")
    net, example = _net(), torch.rand(2, *ITEM)
    paths = {"onnx": _export(net, example, d / "net.onnx", ["probs"]), "ts": d / "net.pt", "ep": d / "net.pt2"}
    torch.jit.save(torch.jit.trace(net, example), str(paths["ts"]))
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: batch},)), str(paths["ep"]))
    return paths


class _Suite(ModelBackendTests):
    backend = ""
    file = "onnx"

    @pytest.fixture()
    def item_shape(self) -> tuple[int, ...]:
        return ITEM

    @pytest.fixture()
    def model(self, files: dict[str, Path]) -> Iterator[Model]:
        yield backend_class(self.backend)(str(files[self.file]))


class TestOnnxRuntime(_Suite):
    backend = "onnxruntime"


class TestTorchScript(_Suite):
    backend, file = "torch", "ts"


class TestTorchExportedProgram(_Suite):
    backend, file = "torch", "ep"


@pytest.mark.gpu
class TestTensorRT(_Suite):
    backend = "tensorrt"

    @pytest.fixture()
    def model(self, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Model]:
        if importlib.util.find_spec("tensorrt") is None:
            pytest.skip("TensorRT is not installed (pip install 'gpubatch[gpu]')")
        cls = backend_class("tensorrt")
        if not cls.available():
            pytest.skip("TensorRT is installed but no CUDA device is visible")
        monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path))
        yield cls(str(files["onnx"]))
