"""The GPU paths' calls into TensorRT, ONNX Runtime, torch and dask-cuda, checked without a device.

What can be checked on a CPU machine is checked here: the arguments handed to the libraries, the
guards in front of their calls, and that each GPU path without a device says so as clearly as its
CPU twin would run. Stubs stand in where the library itself cannot import (TensorRT without CUDA).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from gpubatch.core.errors import GpubatchError
from gpubatch.ops.kernels_gpu import gpu_available
from gpubatch.runtime.cluster import load_profile, local_cuda_kwargs

no_gpu = pytest.mark.skipif(gpu_available(), reason="a GPU is present: the refusal path is for GPU-less machines")


@pytest.fixture()
def trt_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """gpubatch.models.tensorrt imported against a stub ``tensorrt`` (the real one needs CUDA)."""
    stub = types.ModuleType("tensorrt")
    stub.__version__ = "10.0-stub"  # type: ignore[attr-defined]
    stub.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    monkeypatch.setitem(sys.modules, "gpubatch.models.tensorrt", None)  # restored to absent afterwards
    monkeypatch.delitem(sys.modules, "gpubatch.models.tensorrt")
    return importlib.import_module("gpubatch.models.tensorrt")


class _FakeDeviceArray:
    def __init__(self, ptr: int):
        self.data = SimpleNamespace(ptr=ptr)
        self.copied = False

    def copy(self) -> _FakeDeviceArray:
        fresh = _FakeDeviceArray(1 << 20)  # CuPy's allocations are 512-byte aligned
        fresh.copied = True
        return fresh


# -- TensorRT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ptr", "copied"), [(0x7F0000000000, False), (0x7F0000000100, False),
                                             (0x7F0000000000 + 1008 * 10, True), (0x7F0000000004, True)],
                         ids=["base", "256", "chunk", "4"])
def test_tensorrt_input_address_is_256_byte_aligned(trt_module: Any, ptr: int, copied: bool) -> None:
    """setTensorAddress needs 256-byte aligned pointers; a chunk of a batch (here 10 items of
    63 x 4 float32 each) starts wherever its first item does, so it is copied where it is not."""
    got = trt_module._aligned(_FakeDeviceArray(ptr))
    assert got.copied is copied and got.data.ptr % trt_module.TENSOR_ALIGNMENT == 0


def test_tensorrt_refused_input_shape_is_named(trt_module: Any) -> None:
    calls = []

    def set_input_shape(name: str, shape: tuple[int, ...]) -> bool:
        calls.append((name, shape))
        return shape[0] == 1

    context = SimpleNamespace(set_input_shape=set_input_shape)
    trt_module._set_input_shape(context, "input", (1, 3, 32, 32), "m.onnx")
    with pytest.raises(GpubatchError, match=r"refused input shape \[8, 3, 32, 32\].*static batch"):
        trt_module._set_input_shape(context, "input", (8, 3, 32, 32), "m.onnx")
    assert calls == [("input", (1, 3, 32, 32)), ("input", (8, 3, 32, 32))]


def test_tensorrt_bf16_input_is_refused_naming_it_and_the_fix(trt_module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """trt.nptype raises a bare TypeError for BF16 (numpy has none): the engine's input type
    reached the first batch's astype as 'Could not resolve TensorRT datatype'."""
    import enum

    data_type = enum.Enum("DataType", ["FLOAT", "HALF", "BF16", "FP8"])

    def nptype(dtype: Any) -> type:  # the real one's mapping and error, for the types it knows
        known = {data_type.FLOAT: np.float32, data_type.HALF: np.float16}
        if dtype not in known:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return known[dtype]

    monkeypatch.setattr(trt_module.trt, "nptype", nptype, raising=False)
    assert trt_module.tensor_dtype(data_type.HALF, "input", "m.onnx", True) == np.float16
    with pytest.raises(GpubatchError, match=r"m.onnx: the model's input 'input' takes bfloat16, which numpy has no "
                                            r"type for.*float32 \(or float16\) input and a Cast to bfloat16"):
        trt_module.tensor_dtype(data_type.BF16, "input", "m.onnx", True)
    with pytest.raises(GpubatchError, match=r"output 'emb' is float8e4m3fn.*Cast to float32"):
        trt_module.tensor_dtype(data_type.FP8, "emb", "m.onnx", False)


@no_gpu
def test_tensorrt_without_a_device_says_so(trt_module: Any, tmp_path: Path) -> None:
    """Not ModuleNotFoundError (cupy) or a CUDA initialisation error from deep in the build."""
    with pytest.raises(GpubatchError, match="tensorrt needs a CUDA device"):
        trt_module.TensorRTModel(str(tmp_path / "m.onnx"))


# -- ONNX Runtime -----------------------------------------------------------------------------------


def _ort_with_providers(providers: list[str]) -> Any:
    from gpubatch.models.onnxruntime import OnnxRuntimeModel

    model = object.__new__(OnnxRuntimeModel)
    model.path = "m.onnx"
    model.session = SimpleNamespace(get_providers=lambda: providers)
    return model


@pytest.mark.parametrize(
    ("providers", "device"),
    [
        (["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"),
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"),
        (["CPUExecutionProvider"], "cpu"),
        (["OpenVINOExecutionProvider", "CPUExecutionProvider"], "cpu"),
        (["DmlExecutionProvider", "CPUExecutionProvider"], "cpu"),
    ],
)
def test_ort_device_is_cuda_only_for_the_cuda_providers(providers: list[str], device: str) -> None:
    """IO binding binds the input as device_type "cuda": only the CUDA and TensorRT providers take that."""
    model = _ort_with_providers(providers)
    assert model.device == device and model.supports_device() is (device == "cuda")
    if device == "cpu":
        with pytest.raises(NotImplementedError, match="host arrays only"):
            model.run_device(object(), object())


# -- torch ------------------------------------------------------------------------------------------


@no_gpu
def test_torch_cuda_device_without_cuda_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.jit.load(map_location="cuda") fails with a RuntimeError the loader called "not a
    TorchScript file"; the missing device is what is wrong."""
    torch = pytest.importorskip("torch")
    from gpubatch.models.torch import TorchModel

    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    monkeypatch.setenv("GPUBATCH_TORCH_DEVICE", "cuda")
    with pytest.raises(GpubatchError, match="GPUBATCH_TORCH_DEVICE=cuda but torch sees no CUDA device"):
        TorchModel(str(path))
    monkeypatch.setenv("GPUBATCH_TORCH_DEVICE", "cpu")
    assert TorchModel(str(path)).device == "cpu"


# -- dask-cuda --------------------------------------------------------------------------------------

#: dask_cuda.LocalCUDACluster's own parameters (26.10); the rest go to LocalCluster and the workers
LOCAL_CUDA_PARAMS = {
    "CUDA_VISIBLE_DEVICES", "n_workers", "threads_per_worker", "memory_limit", "device_memory_limit",
    "enable_cudf_spill", "cudf_spill_stats", "local_directory", "protocol", "enable_tcp_over_ucx",
    "enable_infiniband", "enable_nvlink", "enable_rdmacm", "rmm_pool_size", "rmm_maximum_pool_size",
    "rmm_managed_memory", "rmm_async", "rmm_allocator_external_lib_list", "rmm_release_threshold",
    "rmm_log_directory", "rmm_track_allocations", "log_spilling", "pre_import",
}


def _accepted_names() -> set[str]:
    from distributed import LocalCluster, Worker

    try:
        from dask_cuda import LocalCUDACluster

        own = set(inspect.signature(LocalCUDACluster).parameters) - {"kwargs"}
    except ImportError:
        own = LOCAL_CUDA_PARAMS
    return own | set(inspect.signature(LocalCluster).parameters) | set(inspect.signature(Worker).parameters)


def test_local_cuda_profile_passes_only_real_arguments() -> None:
    """The shipped profile asks for no RMM pool: dask-cuda does not install rmm, and LocalCUDACluster
    refused to start ("RMM pool or managed memory requested but module 'rmm' is not available");
    a pool of 0.8 also left TensorRT and ONNX Runtime, which allocate outside it, a fifth of the GPU."""
    kwargs = local_cuda_kwargs(load_profile("local-cuda"))
    assert set(kwargs) <= _accepted_names()
    assert "rmm_pool_size" not in kwargs and kwargs["device_memory_limit"] == 0.9
    assert kwargs["resources"] == {"GPU": 1} and kwargs["threads_per_worker"] == 1


@pytest.mark.skipif(importlib.util.find_spec("rmm") is None, reason="rmm is not installed")
def test_local_cuda_pool_routes_cupy_into_it() -> None:
    """The pool is reserved at worker start: the device stage's CuPy allocations must come from it."""
    kwargs = local_cuda_kwargs({"cluster": "local-cuda", "rmm_pool_size": "2GB"})
    assert set(kwargs) <= _accepted_names() and kwargs["rmm_allocator_external_lib_list"] == ["cupy"]


@pytest.mark.skipif(importlib.util.find_spec("rmm") is not None, reason="rmm is installed")
def test_local_cuda_pool_without_rmm_is_refused_naming_the_key_and_the_fix() -> None:
    with pytest.raises(GpubatchError, match=r"profile.rmm_pool_size needs RMM.*pip install rmm-cu12"):
        local_cuda_kwargs({"cluster": "local-cuda", "rmm_pool_size": "2GB"})


def test_local_cuda_unset_settings_keep_dask_cuda_defaults() -> None:
    """device_memory_limit=None is "never spill" in dask-cuda, not its default ("default", 80%)."""
    kwargs = local_cuda_kwargs({"cluster": "local-cuda"})
    assert not {"device_memory_limit", "rmm_pool_size", "memory_limit", "rmm_allocator_external_lib_list"} & set(kwargs)
    assert set(kwargs) <= _accepted_names()
    assert local_cuda_kwargs({"cluster": "local-cuda", "memory_limit": "8GB"})["memory_limit"] == "8GB"


# -- nvImageCodec (API-shape tests: a stub stands in for nvidia.nvimgcodec) --------------------------


class _StubNvimgcodec(types.ModuleType):
    """Just the names gpu_decode uses, with the shapes of nvImageCodec's python bindings:
    ``Decoder(device_id, max_num_cpu_threads, backends, options)``, ``Backend(backend_kind)``,
    ``decode(list) -> list[Image | None]`` (python/decoder.cpp, python/backend.cpp)."""

    def __init__(self, images: list[Any]):
        super().__init__("nvidia.nvimgcodec")
        self.made: list[dict[str, Any]] = []
        self.calls: list[tuple[list[Any], bool]] = []
        self.BackendKind = types.SimpleNamespace(CPU_ONLY="CPU_ONLY", GPU_ONLY="GPU_ONLY",
                                                 HYBRID_CPU_GPU="HYBRID_CPU_GPU", HW_GPU_ONLY="HW_GPU_ONLY")
        self.Backend = lambda backend_kind, load_hint=1.0: SimpleNamespace(backend_kind=backend_kind)
        stub = self

        class Decoder:
            def __init__(self, device_id: int = -1, max_num_cpu_threads: int = 0, backends: Any = None,
                         options: str = ":fancy_upsampling=0"):
                stub.made.append({"backends": backends, "options": options})

            def decode(self, srcs: list[Any], params: Any = None, cuda_stream: int = 0) -> list[Any]:
                from gpubatch.sources.slides import gpu_decode

                stub.calls.append((list(srcs), gpu_decode._DECODE_LOCK.locked()))
                return [images[i % len(images)] for i in range(len(srcs))]

        self.Decoder = Decoder


@pytest.fixture()
def nvimgcodec_stub(monkeypatch: pytest.MonkeyPatch) -> Any:
    from gpubatch.sources.slides import gpu_decode

    def install(images: list[Any]) -> _StubNvimgcodec:
        stub = _StubNvimgcodec(images)
        package = types.ModuleType("nvidia")
        package.nvimgcodec = stub  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "nvidia", package)
        monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", stub)
        gpu_decode._decoder.cache_clear()
        return stub

    yield install
    gpu_decode._decoder.cache_clear()  # never leave the stub's decoder cached


def test_nvimgcodec_decoder_upsamples_like_libjpeg_on_gpu_backends_only(nvimgcodec_stub: Any) -> None:
    """The binding's default options are ":fancy_upsampling=0" (chroma replicated, where
    libjpeg-turbo, the host twin, interpolates); with no backends it may decode on its CPU
    libjpeg-turbo extension, which is not what tiles.decoder: gpu asks for."""
    from gpubatch.sources.slides import gpu_decode

    stub = nvimgcodec_stub([object()])
    gpu_decode.decode_streams([b"a", b"b"])
    gpu_decode.decode_streams([b"c"])
    assert len(stub.made) == 1  # one decoder per process
    assert stub.made[0]["options"] == ":fancy_upsampling=1"
    kinds = [b.backend_kind for b in stub.made[0]["backends"]]
    assert kinds and "CPU_ONLY" not in kinds and "GPU_ONLY" in kinds


def test_nvimgcodec_decode_calls_take_turns(nvimgcodec_stub: Any) -> None:
    """A shard's reader threads share the process's decoder, which is not thread-safe
    (nvImageCodec's concurrency tests give each thread its own): every call holds the lock."""
    from concurrent.futures import ThreadPoolExecutor

    from gpubatch.sources.slides import gpu_decode

    stub = nvimgcodec_stub([object()])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: gpu_decode.decode_streams([bytes([i])]), range(8)))
    assert len(stub.calls) == 8 and all(locked for _, locked in stub.calls)
    assert not gpu_decode._DECODE_LOCK.locked()


@pytest.mark.parametrize(("images", "ok"), [([object()], True), ([None], False)], ids=["decodes", "no-nvjpeg"])
def test_nvimgcodec_probe_says_when_no_gpu_decoder_is_there(nvimgcodec_stub: Any, images: list[Any], ok: bool) -> None:
    """nvImageCodec imports without nvJPEG (an extra) and then returns None for every image."""
    from gpubatch.sources.slides import gpu_decode

    stub = nvimgcodec_stub(images)
    got, why = gpu_decode.probe_decoder()
    assert got is ok and stub.calls[0][0][0][:2] == gpu_decode.SOI
    assert why == "nvimgcodec" if ok else "nvidia-nvimgcodec-cu12[nvjpeg]" in why


# -- the GPU model stage on a worker ------------------------------------------------------------------


class _CudaModel:
    """A model that says it runs on CUDA (so the batch runner takes the device-stage path); it
    records whether each batch ran inside the worker's model turn."""

    backend, precision, threads, path = "spy", "fp32", None, "spy.onnx"
    device, input_name, output_names, runs_on_stream = "cuda", "input", ["out"], False
    input_dtype = np.dtype(np.float32)

    def __init__(self) -> None:
        self.in_turn: list[bool] = []

    def supports_device(self) -> bool:
        return True

    def _record(self, x: Any) -> dict[str, Any]:
        from gpubatch.engine.model_stage import _host_stage

        self.in_turn.append(_host_stage(self).lock.locked())  # type: ignore[arg-type]
        return {"out": x.reshape(len(x), -1).mean(axis=1, keepdims=True)}

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return self._record(x)

    def run_device(self, x: Any, stream: Any) -> dict[str, Any]:
        with stream:
            return self._record(x)


def test_device_stage_batches_take_the_models_turn() -> None:
    """A worker runs two shards at once and shares one device stage (two slots) and one TensorRT
    model (one set of output buffers) between them: a second shard's batch took a slot still in
    use or overwrote outputs before the first's copy back, so its rows were another shard's."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.engine.model_stage import make_batch_runner
    from gpubatch.ops.preprocess import Preprocess

    model = _CudaModel()
    reader = SimpleNamespace(preprocess=Preprocess("tiles"), from_model_output=lambda out, n: out)
    run = make_batch_runner(reader, model)  # type: ignore[arg-type]
    clocks = StageClocks()
    items = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    assert run(items, clocks)["out"].shape == (3, 1) and run(items, clocks)["out"].shape == (3, 1)
    assert model.in_turn == [True, True] and "turn" in clocks.parts


# -- bench/bench_gpu.py -----------------------------------------------------------------------------


def _bench_gpu() -> Any:
    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RunSpy:
    input_dtype = np.dtype(np.float32)

    def __init__(self, on_device: bool):
        self.on_device, self.host_runs, self.device_runs = on_device, 0, []

    def supports_device(self) -> bool:
        return self.on_device

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.host_runs += 1
        return {"out": x[:, :1]}

    def run_device(self, x: Any, stream: Any) -> dict[str, Any]:
        self.device_runs.append(stream)
        return {"out": x}


def test_bench_model_feeds_host_models_host_arrays() -> None:
    """Every Model has run_device; a CPU one raises from it (and CuPy need not be installed)."""
    spy = _RunSpy(on_device=False)
    assert _bench_gpu().bench_model(spy, batch=2, size=4, iters=1) > 0 and spy.host_runs == 3


def test_bench_model_gives_run_device_a_non_blocking_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_device(x, stream): ONNX Runtime's has no default stream, and TensorRT on the legacy
    default stream adds device-wide synchronisations (API-shape test: a stub stands in for CuPy)."""
    streams: list[Any] = []

    class Stream:
        def __init__(self, non_blocking: bool = False):
            self.non_blocking, self.synced = non_blocking, 0
            streams.append(self)

        def __enter__(self) -> Stream:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def synchronize(self) -> None:
            self.synced += 1

    cupy = types.ModuleType("cupy")
    cupy.asarray = lambda a: a  # type: ignore[attr-defined]
    cupy.cuda = SimpleNamespace(Stream=Stream)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    spy = _RunSpy(on_device=True)
    assert _bench_gpu().bench_model(spy, batch=2, size=4, iters=2) > 0
    assert len(streams) == 1 and streams[0].non_blocking and streams[0].synced >= 2
    assert spy.device_runs == [streams[0]] * 6 and spy.host_runs == 0


def test_bench_int8_model_is_what_tensorrt_builds(tmp_path: Path) -> None:
    """TensorRT takes zero-point-0 Q/DQ only: the bench's int8 file has int8 activations with zero
    points of 0 (the CPU target's uint8 asymmetric ones made its int8 row an engine build error)."""
    pytest.importorskip("torch")
    import onnx
    from onnx import numpy_helper

    bench = _bench_gpu()
    qdq = onnx.load(str(bench.make_qdq(bench.make_model(tmp_path, 16), 16)))
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    zero_points = [inits[n.input[2]] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


# -- what the gpu extra installs --------------------------------------------------------------------


def _gpu_extra() -> list[str]:
    import re

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    extra = re.search(r"^gpu = \[(.*?)\]$", text, re.MULTILINE | re.DOTALL)
    assert extra is not None, "pyproject.toml has no gpu extra"
    return re.findall(r'"([^"]+)"', extra.group(1))


def test_gpu_extra_installs_what_the_gpu_paths_call() -> None:
    """dask-cuda 24.12 is the first LocalCUDACluster with rmm_allocator_external_lib_list, which the
    local-cuda profile passes (older ones fail the cluster start with an unexpected keyword);
    nvImageCodec decodes JPEG on the GPU only with its nvjpeg extra."""
    import re

    gpu_extra = _gpu_extra()
    floor = next(re.fullmatch(r"dask-cuda>=([\d.]+)", d) for d in gpu_extra if d.startswith("dask-cuda"))
    assert floor is not None and tuple(map(int, floor.group(1).split("."))) >= (24, 12)
    assert any(d.startswith("nvidia-nvimgcodec-cu12[nvjpeg]") for d in gpu_extra)


#: the module each distribution of the gpu extra installs, as gpubatch imports it
GPU_EXTRA_MODULES = {"cupy-cuda12x": "cupy", "dask-cuda": "dask_cuda", "tensorrt": "tensorrt",
                     "onnxruntime-gpu": "onnxruntime", "nvidia-nvimgcodec-cu12": "nvidia import nvimgcodec"}


def test_gpu_extra_installs_nothing_gpubatch_does_not_import() -> None:
    """cudf-cu12 was in the extra (and the README said the GPU path used cuDF) while nothing
    imported it: a multi-GB install, and a RAPIDS pin the other GPU packages had to agree with."""
    import re

    source = "\n".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "gpubatch").rglob("*.py"))
    for requirement in _gpu_extra():
        dist = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0]
        assert dist in GPU_EXTRA_MODULES, f"{dist} in the gpu extra: which module of gpubatch imports it?"
        module = GPU_EXTRA_MODULES[dist]
        assert re.search(rf"^\s*(from|import) {re.escape(module)}\b", source, re.MULTILINE), module


def test_gpu_extra_installs_what_onnxruntimes_cuda_providers_load() -> None:
    """onnxruntime-gpu>=1.17 allowed 1.17, which PyPI has for CUDA 11.8 with a TensorRT 8 provider
    (beside cupy-cuda12x and tensorrt 10); cuDNN came from nowhere, and the CUDA provider fell back
    to the CPU. 1.21 is the first with the [cuda,cudnn] extras and preload_dlls."""
    import re

    ort_gpu = next(d for d in _gpu_extra() if d.startswith("onnxruntime-gpu"))
    found = re.fullmatch(r"onnxruntime-gpu\[([\w,]+)\]>=([\d.]+)", ort_gpu)
    assert found is not None, ort_gpu
    assert {"cuda", "cudnn"} <= set(found.group(1).split(","))
    assert tuple(map(int, found.group(2).split("."))) >= (1, 21)


# -- ONNX Runtime's CUDA providers find their libraries ----------------------------------------------


@pytest.fixture()
def preload_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    import onnxruntime as ort

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(ort, "preload_dlls", lambda *args, **kwargs: calls.append(args), raising=False)
    return calls


def test_tensorrt_provider_imports_tensorrt_which_loads_libnvinfer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preload_calls: list[Any]) -> None:
    """The TensorRT provider links libnvinfer.so.10, which only ``import tensorrt`` (its
    tensorrt_libs) loads from the wheel's folder. A stand-in tensorrt package on sys.path records
    that it was imported."""
    from gpubatch.models.onnxruntime import load_provider_libraries

    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = sys.modules.pop("tensorrt", None)
    try:
        load_provider_libraries(["CPUExecutionProvider"])
        assert "tensorrt" not in sys.modules and preload_calls == []
        load_provider_libraries(["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert "tensorrt" not in sys.modules and len(preload_calls) == 1
        load_provider_libraries(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
        assert sys.modules["tensorrt"].LOADED and len(preload_calls) == 2
    finally:  # the stand-in must not outlive the test: later tests' `import tensorrt` met it
        sys.modules.pop("tensorrt", None)
        if real is not None:
            sys.modules["tensorrt"] = real


def test_a_cuda_session_is_opened_after_its_libraries_are_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preload_calls: list[Any]) -> None:
    """The model preloads before it opens the session (a real session: this CPU build of ONNX
    Runtime warns that the CUDA provider it is told of is missing and runs on the CPU)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gpubatch.models.onnxruntime import OnnxRuntimeModel

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    OnnxRuntimeModel(str(tmp_path / "m.onnx"))
    assert len(preload_calls) == 1
    monkeypatch.setenv("GPUBATCH_ORT_PROVIDERS", "CPUExecutionProvider")
    OnnxRuntimeModel(str(tmp_path / "m.onnx"))
    assert len(preload_calls) == 1
