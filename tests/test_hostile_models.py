"""Hostile and unusual models handed to ``validate`` and ``run``.

What a user gets for a model gpubatch cannot use: ``validate`` refuses what ``run`` would (exit
2, the field and the file named, the fix given, no traceback), and ``run`` never writes a
silently wrong answer. Models are written with onnx.helper or exported from plain torch here, so
the file under test is exactly the one described.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import slide_job, write_job

from gpubatch.cli.main import main


def onnx_graph(path: Path, nodes: list[Any], inputs: list[tuple[str, str, list[Any]]],
               outputs: list[tuple[str, str, list[Any]]]) -> Path:
    """An ONNX file of ``nodes`` with (name, element type, shape) inputs and outputs."""
    import onnx
    from onnx import TensorProto, helper

    def info(name: str, elem: str, shape: list[Any]) -> Any:
        return helper.make_tensor_value_info(name, getattr(TensorProto, elem), shape)

    graph = helper.make_graph(nodes, "g", [info(*i) for i in inputs], [info(*o) for o in outputs])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def mean_model(path: Path) -> Path:
    """(N, 3, H, W) float32 -> per-channel means (N, 3): a model that fits any slides job."""
    from onnx import helper

    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)
    return onnx_graph(path, [node], [("x", "FLOAT", ["N", 3, 64, 64])], [("y", "FLOAT", ["N", 3])])


def torchscript_file(path: Path) -> Path:
    import torch

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Mean()), str(path))
    return path


def refused_by_both(tmp_path: Path, job: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    """``validate`` and ``run`` both exit 2 with no traceback; the refusal's text."""
    spec = write_job(tmp_path / "job.yaml", job)
    texts = []
    for command in ("validate", "run"):
        assert main([command, str(spec)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        texts.append(err)
    assert texts[0] == texts[1]
    assert not (tmp_path / "out" / "predictions.parquet").exists()
    return texts[0]


# ---------------------------------------------------------------------------------------------
# files that are no model the backend can load


def _truncated(tmp_path: Path) -> Path:
    whole = mean_model(tmp_path / "whole.onnx").read_bytes()
    (tmp_path / "m.onnx").write_bytes(whole[: len(whole) // 2])
    return tmp_path / "m.onnx"


def _text(tmp_path: Path) -> Path:
    (tmp_path / "m.onnx").write_text("<html>404 Not Found</html>\n" * 4)
    return tmp_path / "m.onnx"


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "m.onnx").write_bytes(b"")
    return tmp_path / "m.onnx"


NOT_ONNX = {
    "truncated": (_truncated, {}, "is not a readable ONNX model (truncated, or another format"),
    "a web page": (_text, {}, "is not a readable ONNX model"),
    "empty": (_empty, {}, "is empty, not an ONNX model"),
    "torchscript named .onnx": (lambda p: torchscript_file(p / "m.onnx"), {},
                                "is a PyTorch file, not ONNX; export it with torch.onnx.export"),
    "torchscript to onnxruntime": (lambda p: torchscript_file(p / "m.pt"), {"backend": "onnxruntime"},
                                   "is a PyTorch file, not ONNX"),
    "onnx to the torch backend": (lambda p: mean_model(p / "m.onnx"), {"backend": "torch"},
                                  "is not a TorchScript (.pt) or ExportedProgram (.pt2) file"),
}


@pytest.mark.parametrize("case", list(NOT_ONNX))
def test_a_file_the_backend_cannot_load_is_refused_naming_it(
        tmp_path: Path, slide_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    make, model_keys, words = NOT_ONNX[case]
    model = make(tmp_path)
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"].update(model_keys)
    err = refused_by_both(tmp_path, job, capsys)
    assert f"model.path: {model} " in err and words in err


# ---------------------------------------------------------------------------------------------
# models whose inputs or outputs the job cannot feed or keep


def test_a_model_with_a_second_input_is_refused_not_run_into_quarantine(
        tmp_path: Path, slide_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every slide was quarantined with ONNX Runtime's "Required inputs (['y']) are missing"."""
    from onnx import helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Add", ["m", "y"], ["z"])]
    model = onnx_graph(tmp_path / "two.onnx", nodes,
                       [("x", "FLOAT", ["N", 3, 64, 64]), ("y", "FLOAT", ["N", 3])], [("z", "FLOAT", ["N", 3])])
    err = refused_by_both(tmp_path, slide_job([str(slide_path)], model, tmp_path / "out"), capsys)
    assert f"model.path: {model} takes 2 inputs (x, y), but gpubatch feeds one batch" in err


# ---------------------------------------------------------------------------------------------
# outputs that are not numbers


def test_nan_outputs_are_counted_and_flagged_not_written_as_valid(
        tmp_path: Path, slide_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """sqrt(channel mean - 0.8): NaN for the darker tiles only. The run said nothing: exit 0, no
    note, report and zarr silent, NaN rows in predictions.parquet as if they were predictions."""
    import json

    import numpy as np
    import pandas as pd
    import zarr
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(0.8), "c")),
             helper.make_node("Sub", ["m", "c"], ["d"]), helper.make_node("Sqrt", ["d"], ["root"]),
             helper.make_node("Identity", ["m"], ["mean"])]
    model = onnx_graph(tmp_path / "nan.onnx", nodes, [("x", "FLOAT", ["N", 3, 64, 64])],
                       [("root", "FLOAT", ["N", 3]), ("mean", "FLOAT", ["N", 3])])
    out = tmp_path / "out"
    spec = write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], model, out))
    assert main(["run", str(spec)]) == 0
    terminal = capsys.readouterr().out
    df = pd.read_parquet(out / "predictions.parquet")
    bad = int(df.filter(like="root").isna().any(axis=1).sum())
    assert 0 < bad < len(df)  # some tiles, not all: the count is per item
    report = json.loads((out / "report.json").read_text())
    assert report["nonfinite"] == {"items": bad, "outputs": {"root": bad}}
    words = f"{bad} of {len(df)} item(s) have NaN or infinite model outputs (root {bad})"
    assert f"note: {slide_path}: {words}" in terminal
    group = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    (name,) = list(group)
    assert any(words in note for note in group[name].attrs["notes"])


# ---------------------------------------------------------------------------------------------
# quantization of a model the quantizer cannot take


def _fp16_mean(path: Path) -> Path:
    from onnx import helper

    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)
    return onnx_graph(path, [node], [("x", "FLOAT16", ["N", 3, 64, 64])], [("y", "FLOAT16", ["N", 3])])


def _int8_job(tmp_path: Path, slide_path: Path, on_fail: str) -> dict[str, Any]:
    job = slide_job([str(slide_path)], _fp16_mean(tmp_path / "half.onnx"), tmp_path / "out")
    job["model"].update({"precision": "int8", "calibration": {"items": 8},
                         "validation": {"items": 8, "on_fail": on_fail}})
    return job


def test_int8_of_a_float16_model_is_refused_by_validate_and_run(
        tmp_path: Path, slide_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate passed it; run died in ONNX Runtime's quantizer with a traceback (exit 1)."""
    err = refused_by_both(tmp_path, _int8_job(tmp_path, slide_path, "error"), capsys)
    assert f"model.precision: int8 quantizes a float32 model, but {tmp_path / 'half.onnx'}'s input 'x' is float16" in err
    assert "set model.validation.on_fail: fp32" in err


def test_a_model_the_quantizer_fails_on_runs_fp32_when_allowed_and_the_report_says_why(
        tmp_path: Path, slide_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    spec = write_job(tmp_path / "job.yaml", _int8_job(tmp_path, slide_path, "fp32"))
    assert main(["validate", str(spec)]) == 0
    assert main(["run", str(spec)]) == 0
    terminal = capsys.readouterr()
    assert "Traceback" not in terminal.err
    q = json.loads((tmp_path / "out" / "report.json").read_text())["quantization"]
    assert q["requested"] == "int8" and q["fell_back_to"] == "fp32" and not q["passed"]
    assert f"{tmp_path / 'half.onnx'} could not be converted to int8: " in q["reason"]
    assert "precision: int8 requested, fp32 used" in terminal.out


def test_a_model_with_integer_outputs_is_written(tmp_path: Path, slide_path: Path) -> None:
    """ONNX Runtime's int64 arrays carry dtype 'q' (long long), which zarr's registry did not
    match: every shard of a class-index model was quarantined ("No Zarr data type found")."""
    import numpy as np
    import pandas as pd
    import zarr
    from onnx import helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("ArgMax", ["m"], ["label"], axis=1, keepdims=0)]
    model = onnx_graph(tmp_path / "argmax.onnx", nodes, [("x", "FLOAT", ["N", 3, 64, 64])],
                       [("label", "INT64", ["N"])])
    out = tmp_path / "out"
    assert main(["run", str(write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], model, out)))]) == 0
    labels = pd.read_parquet(out / "predictions.parquet")["label"]
    group = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    (name,) = list(group)
    stored = group[name]["label"][:]
    assert stored.dtype == np.int64 and sorted(stored) == sorted(labels) and len(labels) > 0


def test_a_tile_output_parquet_cannot_hold_is_refused_without_zarr(
        tmp_path: Path, slide_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A (N, 3, 8, 8) map per tile is 192 values, more than parquet's columns take: it goes to
    zarr only, and with ``output.formats: [parquet]`` it was left out and the run exited 0 with
    the index columns alone. Both commands refuse it, naming the output and the fix; with zarr
    beside parquet it runs and zarr holds the map whole."""
    import zarr
    from onnx import helper

    node = helper.make_node("AveragePool", ["x"], ["maps"], kernel_shape=[8, 8], strides=[8, 8])
    model = onnx_graph(tmp_path / "maps.onnx", [node], [("x", "FLOAT", ["N", 3, 64, 64])],
                       [("maps", "FLOAT", ["N", 3, 8, 8])])
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["output"]["formats"] = ["parquet"]
    err = refused_by_both(tmp_path, job, capsys)
    assert "output.formats" in err and "'maps'" in err and "add zarr" in err, err
    job["output"]["formats"] = ["zarr", "parquet"]
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 0
    group = zarr.open_group(str(tmp_path / "out" / "predictions.zarr"), mode="r")
    (name,) = list(group)
    assert group[name]["maps"].shape[1:] == (3, 8, 8) and group[name]["maps"].shape[0] > 0


def test_a_model_whose_output_has_no_batch_axis_is_refused(
        tmp_path: Path, slide_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output of one value per call (a mean over the whole batch) passed validate, and run
    quarantined every slide with numpy's "zero-dimensional arrays cannot be concatenated"."""
    from onnx import helper

    node = helper.make_node("ReduceMean", ["x"], ["score"], keepdims=0)
    model = onnx_graph(tmp_path / "scalar.onnx", [node], [("x", "FLOAT", ["N", 3, 64, 64])],
                       [("score", "FLOAT", [])])
    err = refused_by_both(tmp_path, slide_job([str(slide_path)], model, tmp_path / "out"), capsys)
    assert "model.path" in err and "'score'" in err and "no batch axis" in err, err


def test_a_model_whose_output_keeps_fewer_rows_than_its_batch_is_named(
        tmp_path: Path, slide_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An output that keeps 8 rows whatever the batch (a graph traced at batch 8, its shapes
    declared dynamic): every slide was quarantined with pyarrow's "ArrowInvalid: ... column
    length", which named neither the model nor the fix. Now each failure names the output, its
    rows against the batch's, and what to change."""
    import json

    from onnx import TensorProto, helper

    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("st", 0), ("en", 8), ("ax", 0))]
    nodes = [helper.make_node("Constant", [], [c.name], value=c) for c in consts]
    nodes += [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
              helper.make_node("Slice", ["m", "st", "en", "ax"], ["y"])]
    model = onnx_graph(tmp_path / "cap8.onnx", nodes, [("x", "FLOAT", ["N", 3, 64, 64])], [("y", "FLOAT", ["N", 3])])
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"]["batch_size"] = 16
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 1
    terminal = capsys.readouterr()
    failures = json.loads((tmp_path / "out" / "report.json").read_text())["failed"]
    assert failures and "ArrowInvalid" not in json.dumps(failures), failures
    words = "output 'y' has 8 rows for a batch of 16"
    assert all(words in f["error"] and "dynamic batch axis" in f["error"] for f in failures), failures
    assert words in terminal.out + terminal.err


def test_nan_in_a_padded_last_batch_is_counted_once_per_item(tmp_path: Path, slide_path: Path) -> None:
    """The short last batch is padded with copies of its last item to the model's batch size;
    the NaN count was taken before the padding was cut off, and a run of 29 tiles said "32 of
    29 item(s) have NaN". A model that gives NaN for every tile now counts exactly the tiles."""
    import json

    import numpy as np
    import pandas as pd
    from onnx import helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.float32(1000.0), "c")),
             helper.make_node("Sub", ["m", "c"], ["d"]), helper.make_node("Sqrt", ["d"], ["root"])]
    model = onnx_graph(tmp_path / "allnan.onnx", nodes, [("x", "FLOAT", ["N", 3, 64, 64])], [("root", "FLOAT", ["N", 3])])
    out = tmp_path / "out"
    job = slide_job([str(slide_path)], model, out)
    job["model"]["batch_size"] = 7
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 0
    tiles = len(pd.read_parquet(out / "predictions.parquet"))
    assert tiles % 7, "the slide's tiles must leave a short last batch for this test to mean anything"
    report = json.loads((out / "report.json").read_text())
    assert report["nonfinite"] == {"items": tiles, "outputs": {"root": tiles}}
