"""ModelBackendTests: what every model backend (onnxruntime, torch, TensorRT) must do."""

from __future__ import annotations

import numpy as np
import pytest

from gpubatch.models.base import Model


class ModelBackendTests:
    """Subclass and provide fixtures: ``model`` (a loaded Model) and ``item_shape`` (one item's
    input shape, without the batch axis)."""

    def _batch(self, item_shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((n, *item_shape)).astype(np.float32)

    def test_outputs_are_keyed_by_name_and_batch_first(self, model: Model, item_shape: tuple[int, ...]) -> None:
        for n in (1, 5):
            out = model.run(self._batch(item_shape, n))
            assert list(out) == model.output_names
            assert all(isinstance(v, np.ndarray) and v.shape[0] == n for v in out.values())

    def test_runs_are_deterministic_and_rowwise(self, model: Model, item_shape: tuple[int, ...]) -> None:
        x = self._batch(item_shape, 6, seed=1)
        whole = model.run(x)
        again = model.run(x)
        halves = [model.run(x[:3]), model.run(x[3:])]
        for name in whole:
            np.testing.assert_array_equal(whole[name], again[name])
            np.testing.assert_allclose(np.concatenate([h[name] for h in halves]), whole[name], rtol=1e-4, atol=1e-5)

    def test_declares_its_input(self, model: Model) -> None:
        assert model.input_dtype in (np.dtype(np.float32), np.dtype(np.float16))
        assert isinstance(model.input_name, str) and model.device in ("cpu", "cuda")
        info = model.describe()
        assert info["backend"] == model.backend and info["precision"] == model.precision
        assert len(info["sha256"]) == 64

    def test_run_device_equals_run(self, model: Model, item_shape: tuple[int, ...]) -> None:
        if not model.supports_device():
            with pytest.raises(NotImplementedError):
                model.run_device(None, None)
            return
        cupy = pytest.importorskip("cupy")
        x = self._batch(item_shape, 4, seed=2)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:  # uploaded on the stream it runs on: a non-blocking stream does not wait
            xd = cupy.asarray(x.astype(model.input_dtype))  # for the legacy default stream's copy
        device = model.run_device(xd, stream)
        stream.synchronize()
        host = model.run(x)
        for name in host:
            np.testing.assert_allclose(cupy.asnumpy(device[name]), host[name], rtol=1e-3, atol=1e-3)
