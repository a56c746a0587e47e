"""What a torch model really runs in: the dtype its input is fed, the precision a report names, and
a slide head refused by `validate` as `run` would refuse it. Real plain-torch modules throughout,
saved with torch.jit.script / torch.jit.trace / torch.export as a user saves them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import slide_job, write_job
from test_preflight import torch_module
from test_report import summary as compute_bound

from gpubatch import report as rp
from gpubatch.cli.main import main
from gpubatch.cli.pathology_models import build_abmil
from gpubatch.core.errors import EXIT_USAGE, GpubatchError
from gpubatch.models.torch import TorchModel, load_module


def _save(module: torch.nn.Module, path: Path, how: str, dtype: torch.dtype = torch.float32) -> Path:
    """``module`` saved as TorchScript, scripted or traced (on a batch of tiles in ``dtype``)."""
    example = torch.rand(2, 3, 64, 64, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(module) if how == "script" else torch.jit.trace(module, example)
    torch.jit.save(scripted, str(path))
    return path


class Tempered(torch.nn.Module):
    """float32 layers after a float64 temperature registered first: the input must be float32."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3))) / self.temperature.float()


class WideFirst(torch.nn.Module):
    """A float32 scale registered first, then a float64 convolution fed by forward: float64 input."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))
        self.conv = torch.nn.Conv2d(3, 3, 1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3)).float() * self.scale


class NoWeights(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


# ---------------------------------------------------------------------------------------------
# 2. the dtype a TorchScript module is fed


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize(("module", "expected"), [(Tempered, torch.float32), (WideFirst, torch.float64),
                                                  (NoWeights, torch.float32)])
def test_a_torchscript_module_is_fed_what_its_first_layer_takes(tmp_path: Path, how: str,
                                                                module: type, expected: torch.dtype) -> None:
    """The input dtype was the first registered floating parameter's: float64 for Tempered (every
    batch then failed in its float32 convolution), float32 for WideFirst (failed in its float64
    one). It is the dtype of the first weighted layer forward runs, and the module runs on it."""
    path = _save(module().eval(), tmp_path / "m.pt", how, expected)
    _, _, dtype = load_module(str(path), "cpu")
    assert dtype == expected
    outputs = TorchModel(str(path)).run(torch.rand(2, 3, 64, 64).numpy())
    assert outputs["output"].shape == (2, 3)


def test_a_tempered_torchscript_module_runs_end_to_end(tmp_path: Path, slide_path: Path) -> None:
    """validate passed it, and run quarantined the slide (float64 fed to a float32 convolution)."""
    model = _save(Tempered().eval(), tmp_path / "m.pt", "script")
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"]["backend"] = "torch"
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["validate", str(spec)]) == 0
    assert main(["run", str(spec)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["items"] > 0 and not report.get("quarantined")


# ---------------------------------------------------------------------------------------------
# 1. fp16 asked of a float64 module, with on_fail: fp32


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_fp16_of_a_float64_module_with_fallback_runs_fp64_and_says_so(
        tmp_path: Path, slide_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Both sides of the gate ran in float64 (autocast leaves it alone), agreed exactly, and the
    report said fp16 passed. It falls back before the gate, and the report says why and what ran:
    fp64 (it said fp32), in report.json, the summary, report.html, audit.jsonl and the zarr group."""
    model = torch_module(tmp_path / f"m{suffix}", "float64")
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"].update(backend="torch", precision="fp16", validation={"on_fail": "fp32"})
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["validate", str(spec)]) == 0
    assert main(["run", str(spec)]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    q = report["quantization"]
    assert report["precision"] == "fp64" and q["used"] == "fp64" and q["fell_back_to"] == "fp32" and not q["passed"]
    assert "is a float64 module" in q["reason"] and "validation" not in q
    assert "precision: fp16 requested, fp64 used" in capsys.readouterr().out
    _says_fp64_throughout(tmp_path / "out")
    # the verdict of such a run once compute-bound: no gate ran, and it noticed no fallback at all
    verdict = rp.verdict(compute_bound(0.01, precision=report["precision"], quantization=q))
    assert "; fp16 was requested; the model is float64 and cannot run it: ran fp64" in verdict["evidence"]
    assert "validation gate" not in verdict["evidence"] and "module.float()" in verdict["next_move"]
    with pytest.raises(GpubatchError, match="is a float64 module"):
        TorchModel(str(model), precision="fp16")  # nor can a worker, or the API, load it so


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_fp16_of_a_module_saved_in_fp16_runs_no_gate_and_says_so(
        tmp_path: Path, slide_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A module saved in float16, asked for fp16: the gate's fp32 side computed in float16 too,
    agreed exactly with the fp16 side, and the report said the gate passed (correlation 1.0000).
    It runs in fp16 as saved; the report says no gate ran, and why."""
    model = torch_module(tmp_path / f"m{suffix}", "float16")
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"].update(backend="torch", precision="fp16")
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    q = report["quantization"]
    assert report["precision"] == "fp16" and q["used"] == "fp16" and "validation" not in q
    assert "is saved in fp16" in q["note"] and "no validation gate ran" in q["note"]
    out = capsys.readouterr().out
    assert "precision: fp16 requested, fp16 used" in out and "gate passed" not in out


def test_fp16_of_a_bfloat16_module_is_refused_naming_its_dtype(tmp_path: Path, slide_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """autocast leaves bfloat16 arithmetic alone: a bfloat16 module under fp16 ran in bfloat16
    under the name fp16. validate and run refuse it (on_fail: error), saying what to change."""
    model = torch_module(tmp_path / "m.pt2", "bfloat16")
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"].update(backend="torch", precision="fp16")
    spec = write_job(tmp_path / "job.yaml", job)
    for command in ("validate", "run"):
        assert main([command, str(spec)]) == EXIT_USAGE, command
        err = capsys.readouterr().err
        assert "is a bfloat16 module" in err and "under the name fp16" in err, err


def _says_fp64_throughout(out: Path) -> None:
    """report.html's header and facts, every audit line and every zarr group name fp64."""
    import zarr

    page = (out / "report.html").read_text()
    assert "torch fp64</p>" in page and '<th class="l">precision</th><td class="l mono">fp64</td>' in page
    lines = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    shards = [line for line in lines if "shard_id" in line]
    assert shards and all(line["precision"] == "fp64" for line in shards)
    root = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    groups = [root[name] for name in root.attrs["groups"].values()]
    assert groups and all(g.attrs["precision"] == "fp64" for g in groups)


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_a_float64_module_at_fp32_is_reported_as_fp64(tmp_path: Path, slide_path: Path, suffix: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A plain fp32 job on a float64 module computes in float64 and its report said fp32."""
    model = torch_module(tmp_path / f"m{suffix}", "float64")
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"]["backend"] = "torch"
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["precision"] == "fp64" and "quantization" not in report
    _says_fp64_throughout(tmp_path / "out")
    verdict = rp.verdict(compute_bound(0.01, precision=report["precision"]))  # not "model.precision: int8"
    assert verdict["detail"] == "fp64 model" and verdict["next_move"].startswith("save the module in float32")


# ---------------------------------------------------------------------------------------------
# 3. a torch slide head: validate refuses what run would


def _validate(job_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpubatch", "validate", str(job_path)], capture_output=True,
                          text=True, timeout=300)


def _head(path: Path, dim: int) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(build_abmil(dim=dim, hidden=8, classes=2, seed=2), torch.rand(7, dim)), str(path))
    return path


def _head_job(tmp_path: Path, slide_path: Path, tile_model: Path, head: Path) -> Path:
    job = slide_job([str(slide_path)], tile_model, tmp_path / "out", slide_model={"path": str(head)})
    if tile_model.suffix != ".onnx":
        job["model"]["backend"] = "torch"
    return write_job(tmp_path / "job.yaml", job)


@pytest.mark.parametrize(("head", "expected"), [
    ("corrupt", "head.pt: not a TorchScript file"),
    ("state_dict", "head.pt: not a TorchScript file"),
    ("narrow", "does not take a bag of 3-wide features"),
])
def test_validate_refuses_a_torch_head_run_would_refuse(tmp_path: Path, slide_path: Path, mean_model: Path,
                                                        head: str, expected: str) -> None:
    """A truncated TorchScript head, a torch.save'd state dict, and a head 5 features wide for a
    tile model giving 3 passed validate; run then quarantined every slide (exit 1), the narrow
    head's once its tiles were computed. Both refuse it now, before any tile, naming the file and
    the fix."""
    path = _head(tmp_path / "head.pt", 5 if head == "narrow" else 3)
    if head == "corrupt":
        path.write_bytes(path.read_bytes()[:2000])
    elif head == "state_dict":
        torch.save(build_abmil(dim=3, hidden=8, classes=2).state_dict(), str(path))
    spec = _head_job(tmp_path, slide_path, mean_model, path)
    done = _validate(spec)
    assert done.returncode == EXIT_USAGE, done.stdout + done.stderr
    assert f"slide_model.path: {path}" in done.stderr or "slide_model.path: slide_model" in done.stderr
    assert expected in done.stderr and ("torch.jit.save" in done.stderr or "slide_model.features" in done.stderr)
    assert main(["run", str(spec)]) == EXIT_USAGE
    assert not (tmp_path / "out" / "predictions.parquet").exists()


def test_validate_passes_a_torch_head_that_fits(tmp_path: Path, slide_path: Path, mean_model: Path) -> None:
    done = _validate(_head_job(tmp_path, slide_path, mean_model, _head(tmp_path / "head.pt", 3)))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_validate_learns_a_torch_tile_models_width_for_the_head(tmp_path: Path, slide_path: Path,
                                                               suffix: str) -> None:
    """A torch tile model declares no output width, so a head 5 features wide behind a tile model
    giving 3 passed validate and failed at the end of every slide of the run, its tiles computed.
    validate runs the tile model on one zero tile and probes the head at the width it gives."""
    tile_model = torch_module(tmp_path / f"tiles{suffix}", "float32")  # 3 features per tile
    head = _head(tmp_path / "head.pt", 5)
    done = _validate(_head_job(tmp_path, slide_path, tile_model, head))
    assert done.returncode == EXIT_USAGE, done.stdout + done.stderr
    assert f"slide_model.path: slide_model {head} does not take a bag of 3-wide features" in done.stderr
    assert f"{head} takes features 5 wide and model.path's output 'output' gives 3 per tile" in done.stderr
    assert "export the head to take 3-wide features, or set slide_model.features" in done.stderr
    fits = _validate(_head_job(tmp_path, slide_path, tile_model, _head(tmp_path / "fits.pt", 3)))
    assert fits.returncode == 0, fits.stdout + fits.stderr


@pytest.mark.parametrize(("dtype", "precision", "computes_in"), [
    ("float64", "fp32", "fp64"), ("float16", "fp32", "fp16"), ("bfloat16", "fp32", "bf16"),
    ("float32", "fp32", "fp32"), ("float32", "bf16", "bf16"), ("float16", "fp16", "fp16"),
])
def test_what_a_torch_module_computes_in(tmp_path: Path, dtype: str, precision: str, computes_in: str) -> None:
    """A module saved in float64, float16 or bfloat16 computes in its own dtype at fp32, which the
    report names (a float64 module's said fp32); autocast's 16 bits otherwise."""
    model = TorchModel(str(torch_module(tmp_path / "m.pt2", dtype)), precision=precision)
    assert model.computes_in == computes_in


class Flat(torch.nn.Module):
    """Takes 32 px tiles only: its linear layer reads the flattened tile."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_validate_refuses_a_torch_tile_model_that_fails_on_the_jobs_tile(tmp_path: Path, slide_path: Path) -> None:
    """Learning the bag width runs the tile model on one tile of the job's shape: a model for 32 px
    tiles in a 64 px job, whose every batch would fail, is refused there, naming the shape."""
    tile_model = tmp_path / "flat.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(Flat().eval(), torch.rand(2, 3, 32, 32)), str(tile_model))
    done = _validate(_head_job(tmp_path, slide_path, tile_model, _head(tmp_path / "head.pt", 4)))
    assert done.returncode == EXIT_USAGE, done.stdout + done.stderr
    assert f"model.path: {tile_model} fails on a batch of one zero tile of shape (1, 3, 64, 64)" in done.stderr
    assert "match tiles.size and model.input.layout to the model" in done.stderr, done.stderr
