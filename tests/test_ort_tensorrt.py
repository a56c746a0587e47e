"""ONNX Runtime's TensorRT execution provider: the options gpubatch hands it (engine and timing
caches keyed by what makes an engine valid, precision flags, workspace, batch profile), the build
lock its workers share, and a model input numpy has no type for (bf16), refused at load.

The options and the lock are checked here against ONNX Runtime's documented option names; the
provider itself runs only on a GPU (the ``gpu``-marked tests, skipped without one).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import gpu_missing

from gpubatch.core.errors import GpubatchError
from gpubatch.models.ort_tensorrt import (
    EngineFacts,
    build_lock,
    engine_cache_dir,
    engine_facts,
    provider_entries,
    tensorrt_provider_options,
    timing_cache_dir,
)

needs_gpu = pytest.mark.skipif(gpu_missing() is not None, reason=gpu_missing() or "")
FACTS = EngineFacts("ab" * 32, "fp16", "NVIDIA H100 80GB HBM3", "10.9.0.34", "1.22.0", 4 << 30,
                    "input", (3, 224, 224), 64, 128)


def _onnx(path: Path, dims: list[Any], elem: str = "FLOAT", scale: float = 1.0) -> Path:
    """``y = mean(x * scale)`` over the item dims: one input of ``dims`` (strings are dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    kind = getattr(TensorProto, elem)
    x = "x" if elem == "FLOAT" else "xf"
    nodes = [] if elem == "FLOAT" else [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT)]
    nodes += [helper.make_node("Mul", [x, "scale"], ["s"]),
              helper.make_node("ReduceMean", ["s"], ["y"], axes=list(range(1, len(dims))), keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", kind, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0]])],
                              [numpy_helper.from_array(np.array(scale, np.float32), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# -- the provider's options (pure) ------------------------------------------------------------------


def test_options_are_the_providers_own_names_with_the_caches_on(tmp_path: Path) -> None:
    """Without them every worker of every run rebuilt the engine (minutes for a large model)."""
    options = tensorrt_provider_options(tmp_path, FACTS)
    assert options == {
        "trt_fp16_enable": True, "trt_int8_enable": False,
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache_dir(tmp_path, FACTS)),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(timing_cache_dir(tmp_path, FACTS)),
        "trt_max_workspace_size": 4 << 30,
        "trt_profile_min_shapes": "input:1x3x224x224", "trt_profile_opt_shapes": "input:64x3x224x224",
        "trt_profile_max_shapes": "input:128x3x224x224",
    }
    assert Path(options["trt_engine_cache_path"]).parent == tmp_path / "ort-trt"


@pytest.mark.parametrize(("precision", "fp16", "int8"), [("fp32", False, False), ("fp16", True, False),
                                                         ("int8", False, True)])
def test_precision_flags_match_the_jobs_precision(tmp_path: Path, precision: str, fp16: bool, int8: bool) -> None:
    options = tensorrt_provider_options(tmp_path, dataclasses.replace(FACTS, precision=precision))
    assert (options["trt_fp16_enable"], options["trt_int8_enable"]) == (fp16, int8)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_precisions_the_provider_does_not_build_are_refused(tmp_path: Path, precision: str) -> None:
    with pytest.raises(GpubatchError, match=f"precision {precision} does not run on ONNX Runtime's TensorRT.*backend tensorrt"):
        tensorrt_provider_options(tmp_path, dataclasses.replace(FACTS, precision=precision))


@pytest.mark.parametrize("change", [{"model_sha256": "cd" * 32}, {"precision": "int8"}, {"gpu": "NVIDIA A100-SXM4-80GB"},
                                    {"tensorrt": "10.8.0.43"}, {"onnxruntime": "1.21.0"}, {"workspace_bytes": None},
                                    {"batch_size": 32, "max_batch_size": 64}],
                         ids=lambda c: next(iter(c)))
def test_a_changed_model_precision_gpu_or_version_never_gets_a_stale_engine(tmp_path: Path, change: dict[str, Any]) -> None:
    """ONNX Runtime names its engines by model path and graph, not bytes: a model rewritten in
    place would have loaded the old engine from a folder keyed by less than all of this."""
    assert engine_cache_dir(tmp_path, FACTS) == engine_cache_dir(tmp_path, dataclasses.replace(FACTS))
    assert engine_cache_dir(tmp_path, dataclasses.replace(FACTS, **change)) != engine_cache_dir(tmp_path, FACTS)


def test_the_timing_cache_is_shared_by_models_on_one_gpu_and_tensorrt(tmp_path: Path) -> None:
    other_model = dataclasses.replace(FACTS, model_sha256="cd" * 32, precision="fp32")
    assert timing_cache_dir(tmp_path, other_model) == timing_cache_dir(tmp_path, FACTS)
    for change in ({"gpu": "NVIDIA A100-SXM4-80GB"}, {"tensorrt": "10.8.0.43"}):
        assert timing_cache_dir(tmp_path, dataclasses.replace(FACTS, **change)) != timing_cache_dir(tmp_path, FACTS)


def test_without_the_build_lock_a_worker_builds_uncached(tmp_path: Path) -> None:
    options = tensorrt_provider_options(tmp_path, FACTS, cached=False)
    assert options["trt_engine_cache_enable"] is False and options["trt_timing_cache_enable"] is False
    assert "trt_engine_cache_path" not in options and options["trt_fp16_enable"] is True


def test_no_profile_where_an_item_dim_is_dynamic_and_only_the_trt_provider_gets_options(tmp_path: Path) -> None:
    options = tensorrt_provider_options(tmp_path, dataclasses.replace(FACTS, item_dims=None, workspace_bytes=None))
    assert not any(k.startswith("trt_profile") for k in options) and "trt_max_workspace_size" not in options
    entries = provider_entries(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], options)
    assert entries == [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_engine_facts_read_the_model_and_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpubatch.core.files import file_sha256

    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPUBATCH_TRT_BATCH", "16")
    monkeypatch.setenv("GPUBATCH_TRT_WORKSPACE_MB", "512")
    model = _onnx(tmp_path / "m.onnx", ["N", 3, 32, 32])
    facts = engine_facts(str(model), "fp32", "1.22.0")
    assert (facts.model_sha256, facts.input_name, facts.item_dims) == (file_sha256(model), "x", (3, 32, 32))
    assert (facts.batch_size, facts.max_batch_size, facts.workspace_bytes) == (16, 32, 512 << 20)
    free = engine_facts(str(_onnx(tmp_path / "free.onnx", ["N", 3, "H", "W"])), "fp32", "1.22.0")
    assert not free.has_profile and free.item_dims is None


# -- the build lock -----------------------------------------------------------------------------------


def test_the_build_lock_is_one_workers_and_a_wait_for_it_is_bounded(tmp_path: Path) -> None:
    """ONNX Runtime writes an engine in place: a second worker loading it mid-write would read
    half an engine. flock is per open file, so a second open here stands for another worker."""
    folder = tmp_path / "engine"
    with build_lock(folder, 5) as held:
        assert held
        with build_lock(folder, 0.2) as other:
            assert other is False  # gave up after its bound: builds uncached instead of hanging
    with build_lock(folder, 0.2) as again:
        assert again  # released with the first worker's session


# -- chunks beyond the profile, and bf16 inputs (real ONNX Runtime, CPU) -------------------------------


def test_batches_beyond_the_profile_run_in_chunks(tmp_path: Path) -> None:
    """The engine is built for batches 1..2B; a larger one (the tuner sweeps to 512) runs in chunks."""
    from gpubatch.models.onnxruntime import OnnxRuntimeModel

    model = OnnxRuntimeModel(str(_onnx(tmp_path / "m.onnx", ["N", 3, 4, 4])))
    x = np.random.default_rng(0).random((11, 3, 4, 4), dtype=np.float32)
    want = model.run(x)["y"]
    model.trt_facts = dataclasses.replace(FACTS, input_name="x", item_dims=(3, 4, 4), batch_size=2, max_batch_size=4)
    calls: list[int] = []
    session_run = model.session.run
    model.session.run = lambda names, feed: calls.append(len(feed["x"])) or session_run(names, feed)  # type: ignore[method-assign]
    np.testing.assert_allclose(model.run(x)["y"], want, rtol=1e-6)
    assert calls == [4, 4, 3]


def test_a_bf16_model_input_is_refused_at_load_naming_it_and_the_fix(tmp_path: Path) -> None:
    """ONNX Runtime loaded it and then failed every batch with INVALID_ARGUMENT (numpy has no bf16)."""
    from gpubatch.models.onnxruntime import OnnxRuntimeModel

    path = _onnx(tmp_path / "bf16.onnx", ["N", 3, 4, 4], elem="BFLOAT16")
    with pytest.raises(GpubatchError, match=r"bf16.onnx: the model's input 'x' takes bfloat16, which numpy has no "
                                            r"type for.*float32 \(or float16\) input and a Cast to bfloat16.*backend torch"):
        OnnxRuntimeModel(str(path))


# -- on a GPU: the provider itself --------------------------------------------------------------------


def _trt_session_or_skip(path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import onnxruntime as ort

    from gpubatch.models.onnxruntime import OnnxRuntimeModel

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with the TensorRT provider is not installed")
    monkeypatch.setenv("GPUBATCH_CACHE", str(cache))
    monkeypatch.setenv("GPUBATCH_TRT_BATCH", "4")
    return OnnxRuntimeModel(str(path))


@pytest.mark.gpu
@needs_gpu
def test_the_second_session_loads_the_cached_engine_and_a_changed_model_gets_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _onnx(tmp_path / "m.onnx", ["N", 3, 32, 32])
    first = _trt_session_or_skip(path, tmp_path / "cache", monkeypatch)
    assert first.session.get_providers()[0] == "TensorrtExecutionProvider"
    folder = Path(first.describe()["engine_cache"])
    engines = {p: p.stat().st_mtime_ns for p in folder.glob("*.engine")}
    assert engines, f"no engine written to {folder}"
    assert list(Path(tensorrt_provider_options(tmp_path / "cache", first.trt_facts)["trt_timing_cache_path"]).iterdir())
    x = np.random.default_rng(1).random((11, 3, 32, 32), dtype=np.float32)  # 11 > max batch 8: chunks
    second = _trt_session_or_skip(path, tmp_path / "cache", monkeypatch)
    np.testing.assert_allclose(second.run(x)["y"], x.mean(axis=(1, 2, 3)), rtol=1e-4)
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.engine")} == engines  # loaded, not rebuilt
    _onnx(path, ["N", 3, 32, 32], scale=2.0)  # the same path, other weights
    changed = _trt_session_or_skip(path, tmp_path / "cache", monkeypatch)
    assert Path(changed.describe()["engine_cache"]) != folder
    np.testing.assert_allclose(changed.run(x)["y"], 2 * x.mean(axis=(1, 2, 3)), rtol=1e-4)


@pytest.mark.gpu
@needs_gpu
def test_tensorrt_backend_refuses_a_bf16_input_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trt.nptype(DataType.BF16) raised a bare TypeError at the first batch."""
    pytest.importorskip("tensorrt")
    from gpubatch.models.tensorrt import TensorRTModel

    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))
    path = _onnx(tmp_path / "bf16.onnx", ["N", 3, 32, 32], elem="BFLOAT16")
    with pytest.raises(GpubatchError, match=r"input 'x' takes bfloat16, which numpy has no type for"):
        TensorRTModel(str(path), batch_size=4)
