"""Batch-size tuning at its limits: a model that fails or answers wrongly at a large batch, a
memory budget, the sweep's time limit, a noisy machine, and what `gpubatch tune` says of it.

The failing models are real files (TorchScript raising as CUDA does when out of memory; an ONNX
graph whose output keeps at most 8 rows). Noise and memory growth cannot be produced on demand
with a real backend, so two tests use ``ScriptedModel``: its cost per batch is read from a clock
the test owns, and it holds memory like a backend's arena, so that what the sweep does with a
contended moment or a growing footprint is exact rather than left to the machine's load.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import slide_job, write_job

from gpubatch.cli.main import main
from gpubatch.core.errors import GpubatchError
from gpubatch.models.base import Model, get_model
from gpubatch.models.prepare.tune import choose_batch, sweep


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))


def _oom_above(path: Path, limit: int) -> Path:
    """TorchScript: per-channel means, raising CUDA's out-of-memory error above ``limit`` items."""
    import torch

    class Oom(torch.nn.Module):
        def __init__(self, limit: int) -> None:
            super().__init__()
            self.limit = limit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > self.limit:
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return x.mean(dim=(2, 3))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Oom(limit)), str(path))
    return path


def _rows_capped_at_8(path: Path) -> Path:
    """ONNX: per-channel means of (N, 3, 64, 64), declared (N, 3), but only the first 8 rows kept."""
    import onnx
    from onnx import TensorProto, helper

    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("st", 0), ("en", 8), ("ax", 0))]
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Slice", ["m", "st", "en", "ax"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], initializer=consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


ITEMS = np.zeros((4, 3, 64, 64), np.float32)


def test_a_batch_that_runs_out_of_memory_ends_the_sweep_with_the_sizes_before(tmp_path: Path) -> None:
    model = get_model(str(_oom_above(tmp_path / "oom.pt", 8)), "torch")
    curve, why = sweep(model, ITEMS, min_time_s=0.01, rounds=1)
    assert [p.batch_size for p in curve] == [1, 2, 4, 8]
    assert "batch 16 failed" in why and "out of memory" in why
    assert choose_batch(curve) <= 8


def test_a_batch_whose_outputs_lose_rows_ends_the_sweep(tmp_path: Path) -> None:
    """Chosen, batch 16 would have had every input quarantined with an Arrow length error."""
    model = get_model(str(_rows_capped_at_8(tmp_path / "cap8.onnx")), "onnxruntime")
    curve, why = sweep(model, ITEMS, min_time_s=0.01, rounds=1)
    assert [p.batch_size for p in curve] == [1, 2, 4, 8]
    assert "batch 16 failed" in why and "'y' has 8 rows for a batch of 16" in why


def test_a_model_that_cannot_run_one_item_is_named_not_a_traceback(tmp_path: Path) -> None:
    model = get_model(str(_oom_above(tmp_path / "oom0.pt", 0)), "torch")
    with pytest.raises(GpubatchError, match="oom0.pt cannot run a batch of 1 item: builtins.RuntimeError: CUDA out of memory"):
        sweep(model, ITEMS, min_time_s=0.01)


def test_tune_command_keeps_the_sizes_before_an_out_of_memory(tmp_path: Path, slides_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    model = _oom_above(tmp_path / "oom.pt", 8)
    job = slide_job([str(slides_dir / "*.tif")], model, tmp_path / "out", tiles={"size": 64, "mpp": 0.25})
    job["model"]["backend"] = "torch"
    assert main(["tune", str(write_job(tmp_path / "job.yaml", job))]) == 0
    out = capsys.readouterr().out
    assert "batch 16 failed (builtins.RuntimeError: CUDA out of memory" in out
    assert int(out.split("chosen batch_size:")[1].split()[0]) <= 8


class ScriptedModel(Model):
    """Costs ``max(0.01, 0.001 * n)`` seconds of the test's clock per batch of n (throughput
    flat from 16 up), ``stall_s`` more on each of its first ``stall_calls`` calls at batch
    ``stall_at`` (another process on the cores), and holds ``mb_per_item`` MB per item of its
    largest batch so far, as a backend's arena does."""

    backend = "scripted"

    def __init__(self, stall_at: int = 0, stall_calls: int = 0, stall_s: float = 0.0, mb_per_item: float = 0.0):
        super().__init__("scripted.onnx")
        self.now, self.stall_at, self.stall_calls, self.stall_s = 0.0, stall_at, stall_calls, stall_s
        self.mb_per_item, self.arena = mb_per_item, np.zeros(0, np.uint8)

    @property
    def input_name(self) -> str:
        return "x"

    @property
    def output_names(self) -> list[str]:
        return ["y"]

    def clock(self) -> float:
        return self.now

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = len(batch)
        self.now += max(0.01, 0.001 * n)
        if n == self.stall_at and self.stall_calls > 0:
            self.stall_calls -= 1
            self.now += self.stall_s
        held = int(self.mb_per_item * n * 2**20)
        if held > self.arena.size:
            self.arena = np.zeros(0, np.uint8)  # the old one given back first, as an arena grows
            self.arena = np.ones(held, np.uint8)  # touched: resident
        return {"y": np.zeros((n, 1), np.float32)}


def test_a_contended_moment_does_not_decide_the_batch_size() -> None:
    """Batch 16's first round runs while the cores are busy (+50 ms a call): one round of mean
    time chose 32; the fastest of three rounds sees 16 at the flat part of the curve."""
    model = ScriptedModel(stall_at=16, stall_calls=3, stall_s=0.05)
    curve, why = sweep(model, ITEMS, max_batch=64, min_time_s=0.1, clock=model.clock)
    assert choose_batch(curve) == 16 and why == "reached max batch 64"
    point = next(p for p in curve if p.batch_size == 16)
    assert point.rounds == 3 and point.items_per_s == pytest.approx(1000.0) and point.spread > 3


def test_memory_budget_is_kept_not_passed_once() -> None:
    """A size whose growth, judged from the size before, would pass the budget is not run: the
    budget bounds the sweep's memory instead of being checked after the size that passed it."""
    model = ScriptedModel(mb_per_item=10.0)
    curve, why = sweep(model, ITEMS, memory_budget_mb=100.0, min_time_s=0.05, rounds=1, clock=model.clock)
    assert max(p.peak_mb for p in curve) <= 100.0  # 10 MB an item: 8 items at most
    assert 4 <= curve[-1].batch_size <= 8 and f"batch {2 * curve[-1].batch_size} would grow memory" in why


def test_the_sweep_stops_at_its_time_limit_and_says_so() -> None:
    model = ScriptedModel()
    curve, why = sweep(model, ITEMS, max_sweep_s=1.0, min_time_s=0.1, clock=model.clock)
    assert 1 <= len(curve) < 10 and "1 s limit" in why
    assert model.now <= 1.0


def test_tune_says_what_was_measured_and_why_the_size_won(tmp_path: Path, slides_dir: Path, mean_model: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    job = slide_job([str(slides_dir / "*.tif")], mean_model, tmp_path / "out")
    assert main(["tune", str(write_job(tmp_path / "job.yaml", job))]) == 0
    out = capsys.readouterr().out
    assert "measured on 16 items read from 2 of the job's inputs" in out
    assert "one untimed warm-up run" in out and "in 3 rounds" in out
    assert "the smallest batch within 95% of the best measured" in out
    header = next(line for line in out.splitlines() if "items/s" in line and "batch" in line)
    assert "runs" in header and "noise" in header


def test_tune_of_a_reduced_precision_leaves_the_output_alone(tmp_path: Path, slides_dir: Path, classifier: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """tune quantized into OUTDIR/_models, and validate and run then refused OUTDIR as holding
    files gpubatch did not write; the run after tune finds the tuned choice in the cache."""
    import gpubatch

    job = slide_job([str(slides_dir / "*.tif")], classifier, tmp_path / "out", tiles={"size": 224, "mpp": 0.25})
    job["model"].update(precision="int8", calibration={"items": 16},
                        validation={"items": 16, "min_agreement": 0.5, "on_fail": "fp32"})
    spec = str(write_job(tmp_path / "job.yaml", job))
    assert main(["tune", spec]) == 0
    assert not (tmp_path / "out").exists()
    assert main(["validate", spec, "--set", "model.batch_size=auto"]) == 0
    tuned = int(capsys.readouterr().out.split("chosen batch_size:")[1].split()[0])
    result = gpubatch.run(spec, model__batch_size="auto", show_progress=False)
    assert result.exit_code == 0 and result.report["tuning"]["cached"] is True
    assert result.report["batch_size"] == tuned


def test_an_auto_batch_is_tuned_at_the_threads_the_workers_run(tmp_path: Path, slides_dir: Path,
                                                                 mean_model: Path) -> None:
    """The sweep ran the model on ONNX Runtime's default threads and cached it under
    'defaultthreads', while the run's workers ran it on their share of the cores."""
    import gpubatch
    from gpubatch.runtime.cluster import cpu_count

    job = slide_job([str(slides_dir / "*.tif")], mean_model, tmp_path / "out")
    job["model"]["batch_size"] = "auto"
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job), show_progress=False)
    assert result.exit_code == 0
    assert f"cpu:{cpu_count()}threads|" in result.report["tuning"]["key"]  # inline: one worker, every core
    assert result.report["tuning"]["threads"] == cpu_count()


def test_tune_profile_tunes_for_that_profiles_run(tmp_path: Path, slides_dir: Path, mean_model: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`tune --profile P` is `run --profile P`'s choice: the run finds it in the cache."""
    import gpubatch
    from gpubatch.runtime.cluster import cpu_count

    job = slide_job([str(slides_dir / "*.tif")], mean_model, tmp_path / "out", run={"profile": "local"})
    job["model"]["batch_size"] = "auto"
    spec = str(write_job(tmp_path / "job.yaml", job))
    assert main(["tune", spec, "--profile", "inline"]) == 0
    assert f", {cpu_count()} threads)" in capsys.readouterr().out
    result = gpubatch.run(spec, profile="inline", show_progress=False)
    assert result.exit_code == 0 and result.report["tuning"]["cached"] is True


@pytest.mark.parametrize(("precision", "backend"), [("fp8", "onnxruntime"), ("int8", "torch")])
def test_validate_refuses_a_precision_the_backend_cannot_run_as_tune_and_run_do(
        tmp_path: Path, slides_dir: Path, mean_model: Path, precision: str, backend: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """validate passed these (exit 0); tune and run refused them (exit 2) after planning."""
    from test_hostile_models import refused_by_both

    model = mean_model if backend == "onnxruntime" else _oom_above(tmp_path / "m.pt", 1024)
    job = slide_job([str(slides_dir / "*.tif")], model, tmp_path / "out")
    job["model"].update(precision=precision, backend=backend)
    text = refused_by_both(tmp_path, job, capsys)
    assert f"model.precision: precision {precision}" in text and "on_fail: fp32" in text
    assert main(["tune", str(tmp_path / "job.yaml")]) == 2
    assert capsys.readouterr().err == text


def test_a_tuned_batch_fits_the_workers_memory_as_validate_requires_of_a_fixed_one(
        tmp_path: Path, slides_dir: Path, mean_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run.max_worker_memory of 4 MiB holds 14 items of 64 px tiles (4 prefetched batches, two
    shards at once, beside their read units of 64 px blocks): the sweep went to 512, a size
    validate refuses when written in the spec."""
    job = slide_job([str(slides_dir / "*.tif")], mean_model, tmp_path / "out", tiles={"read_block": 64},
                    run={"max_worker_memory": 4 << 20, "readers": 1})
    spec = str(write_job(tmp_path / "job.yaml", job))
    assert main(["tune", spec]) == 0
    out = capsys.readouterr().out
    sizes = [int(line.split()[0]) for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert max(sizes) == 8 and "run.max_worker_memory lets a worker hold at most 14 items" in out
    chosen = int(out.split("chosen batch_size:")[1].split()[0])
    assert main(["validate", spec, "--set", f"model.batch_size={chosen}"]) == 0
    assert main(["validate", spec, "--set", "model.batch_size=16"]) == 2


def test_a_cached_choice_above_a_new_memory_limit_is_chosen_again_below_it() -> None:
    from gpubatch.models.prepare.tune import CurvePoint, TuneResult, within_limit

    curve = [CurvePoint(b, ips, 0.0, b / ips) for b, ips in ((1, 100.0), (2, 150.0), (4, 180.0), (8, 400.0))]
    hit = TuneResult(8, curve, True, "k", "reached max batch 8", {"max_batch": 512})
    assert within_limit(hit, 512) is hit
    again = within_limit(hit, 4)
    assert again is not None and again.batch_size == 4 and "up to 4" in again.stopped_by
    short = TuneResult(2, curve[:2], True, "k", "reached max batch 2", {"max_batch": 2})
    assert within_limit(short, 512) is None  # swept under a lower limit: sweep again


def test_tune_of_a_job_with_a_fixed_batch_size_says_run_keeps_it(tmp_path: Path, slides_dir: Path,
                                                                  mean_model: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """tune printed 'chosen batch_size: N ... cached' for a spec with batch_size 16, which run
    then ignored without a word."""
    job = slide_job([str(slides_dir / "*.tif")], mean_model, tmp_path / "out")  # batch_size 16
    spec = str(write_job(tmp_path / "job.yaml", job))
    assert main(["tune", spec]) == 0
    assert "the job's spec sets model.batch_size: 16, and `run` uses that" in capsys.readouterr().out
    assert main(["tune", spec, "--set", "model.batch_size=auto"]) == 0
    assert "spec sets model.batch_size" not in capsys.readouterr().out


@pytest.mark.gpu
def test_the_tuning_key_names_the_gpu(tmp_path: Path) -> None:
    """A tuning cache on a shared home served one GPU model's choice to another's nodes: the key
    said only 'cuda'."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    from gpubatch.models.prepare.tune import tune_model

    model = get_model(str(_oom_above(tmp_path / "m.pt", 1024)), "torch")
    assert model.device.startswith("cuda")
    result = tune_model(model, ITEMS, "sha-gpu", max_batch=4, min_time_s=0.01)
    assert torch.cuda.get_device_name() in result.key


def test_an_interrupted_tune_caches_nothing_and_says_so(tmp_path: Path, slides_dir: Path, classifier: Path) -> None:
    """Ctrl-C during the sweep: exit 1, one line saying what state things are in, no traceback,
    no cache entry, nothing in the output or left in the temporary folder."""
    import signal
    import threading

    from conftest import cli, wait_for

    job = slide_job([str(slides_dir / "*.tif")], classifier, tmp_path / "out", tiles={"size": 224, "mpp": 0.25})
    spec = str(write_job(tmp_path / "job.yaml", job))
    (tmp_path / "tmp").mkdir()
    proc = cli("tune", spec, env={"GPUBATCH_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp")})
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("measuring batch sizes" in line for line in lines), 120, "the sweep to start")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 1
    finally:
        proc.kill()
    reader.join(10)
    log = "".join(lines)
    assert "gpubatch: interrupted; nothing was cached" in log and "Traceback" not in log, log
    assert not (tmp_path / "cache" / "tune.json").exists() and not (tmp_path / "out").exists()
    assert list((tmp_path / "tmp").glob("gpubatch-tune-*")) == []
