"""`validate` refuses what `run` would: model dtype and fixed batch, storage credentials, variant files.

Models are written with onnx.helper here (independently of gpubatch's own exporters), so the shapes
and element types under test are exactly the ones declared.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import slide_job, write_job

from gpubatch.cli.main import main
from gpubatch.core.errors import SpecError
from gpubatch.runtime.model_facts import onnx_dtype_name
from gpubatch.runtime.preflight import s3_credential_source, validate_job
from gpubatch.spec import load_job

pytest_plugins = ["s3_fixtures"]


def onnx_model(path: Path, shape: list[Any], elem_type: str = "FLOAT", reduce_axes: tuple[int, ...] = (2, 3)) -> Path:
    """One input of ``shape`` (ints fixed, strings dynamic), ReduceMean over ``reduce_axes``."""
    import onnx
    from onnx import TensorProto, helper

    dtype = getattr(TensorProto, elem_type)
    out_shape = [d for i, d in enumerate(shape) if i not in reduce_axes]
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=list(reduce_axes), keepdims=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", dtype, shape)],
                              [helper.make_tensor_value_info("y", dtype, out_shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _spec(tmp_path: Path, job: dict[str, Any], *sets: str) -> Any:
    return load_job(write_job(tmp_path / "job.yaml", job), list(sets))


def _refused(tmp_path: Path, job: dict[str, Any], *sets: str) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as err:
        validate_job(_spec(tmp_path, job, *sets))
    return err.value.problems


# ---------------------------------------------------------------------------------------------
# the model against the job


def test_fixed_batch_one_is_refused_with_the_fix(tmp_path: Path, slide_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    model = onnx_model(tmp_path / "b1.onnx", [1, 3, 64, 64])
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"]["batch_size"] = 32
    (field, message), = _refused(tmp_path, job)
    assert field == "model.batch_size"
    assert "fixed batch dimension of 1" in message and "set model.batch_size: 1" in message
    assert "dynamic_axes" in message
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["validate", str(spec)]) == 2
    assert main(["run", str(spec)]) == 2  # run refuses the same, before any slide is quarantined
    assert "fixed batch dimension of 1" in capsys.readouterr().err
    # the batch size the model was exported with validates, and runs
    assert main(["run", str(spec), "--set", "model.batch_size=1"]) == 0


def test_fixed_batch_and_variant_pairs(tmp_path: Path) -> None:
    from conftest import shared_file

    model = onnx_model(tmp_path / "g4.onnx", [4, 16, 4], reduce_axes=(1, 2))
    job = {"kind": "genome", "windows": {"reference": str(shared_file("genomics", "sarscov2", "EMN908947.fa")),
                                         "variants": str(shared_file("genomics", "sarscov2", "simple.vcf")),
                                         "length": 16},
           "model": {"path": str(model), "batch_size": 4}, "output": {"uri": str(tmp_path / "o")},
           "run": {"profile": "inline"}}
    (_, message), = _refused(tmp_path, job)
    assert "(2 rows per item)" in message and "set model.batch_size: 2" in message
    check = validate_job(_spec(tmp_path, job, "model.batch_size=2"))
    assert check.shards == 1 and check.items == 1


@pytest.mark.parametrize(("elem", "words"), [("INT64", "takes int64, but gpubatch feeds floating-point"),
                                             ("UINT8", "takes uint8"), ("INT32", "takes int32")])
def test_non_float_model_input_is_refused(tmp_path: Path, slide_path: Path, elem: str, words: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    model = onnx_model(tmp_path / "i.onnx", ["N", 3, 64, 64], elem_type=elem)
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    (field, message), = _refused(tmp_path, job)
    assert field == "model.path" and words in message and "input 'x'" in message
    assert "export the model with a float32 (or float16, or float64) input" in message
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(spec)]) == 2 and words in capsys.readouterr().err


def test_a_bf16_model_input_is_refused_by_validate_and_run(tmp_path: Path, slide_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """validate passed a bf16 input (listed as a float type), and every backend then failed at
    load or at every batch: numpy, and so gpubatch's batches, have no bfloat16."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["xf"], ["y"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 3, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "bf16.onnx"))
    job = slide_job([str(slide_path)], tmp_path / "bf16.onnx", tmp_path / "out")
    (field, message), = _refused(tmp_path, job)
    assert field == "model.path" and "input 'x' takes bfloat16, which numpy has no type for" in message
    assert "float32 (or float16) input and a Cast to bfloat16" in message
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(spec)]) == 2 and "takes bfloat16" in capsys.readouterr().err


def test_a_float64_model_input_runs_end_to_end(tmp_path: Path, slide_path: Path) -> None:
    """validate passed a float64 (DOUBLE) input, and ONNX Runtime then failed every batch ("Unexpected
    input data type. Actual: (tensor(float)), expected: (tensor(double))"): the run fed float32. It
    is fed the float32 batch widened, so its outputs are the float32 twin's, in float64."""
    import pandas as pd

    outputs = {}
    for elem in ("DOUBLE", "FLOAT"):
        model = onnx_model(tmp_path / f"{elem}.onnx", ["N", 3, 64, 64], elem_type=elem)
        spec = write_job(tmp_path / f"{elem}.yaml", slide_job([str(slide_path)], model, tmp_path / elem))
        assert main(["validate", str(spec)]) == 0
        assert main(["run", str(spec)]) == 0
        outputs[elem] = pd.read_parquet(tmp_path / elem / "predictions.parquet").sort_values(["x", "y"])
    wide, narrow = outputs["DOUBLE"], outputs["FLOAT"]
    assert len(wide) == len(narrow) > 0 and list(wide.columns) == list(narrow.columns)
    assert all(wide[f"y_{c}"].dtype == "float64" for c in range(3))
    for c in range(3):  # per-channel tile means of pixels / 255 (mean 0, std 1); float32 sums 4096 terms
        assert np.allclose(wide[f"y_{c}"], narrow[f"y_{c}"], rtol=0, atol=1e-5)
        assert wide[f"y_{c}"].between(0, 1).all() and wide[f"y_{c}"].nunique() > 1


def torch_module(path: Path, dtype_name: str, *, second_input: bool = False) -> Path:
    """A 1x1 convolution (seeded, the same weights in every dtype) then per-tile channel means,
    saved in ``dtype_name`` as TorchScript (.pt) or ExportedProgram (.pt2): the convolution refuses
    an input of another dtype, as a real first layer does."""
    import warnings

    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean(dim=(2, 3))

    class Two(Net):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return self.conv(x + y).mean(dim=(2, 3))

    torch.manual_seed(3)
    dtype = getattr(torch, dtype_name)
    net = (Two() if second_input else Net()).to(dtype).eval()
    example = (torch.rand(2, 3, 64, 64, dtype=dtype),) * (2 if second_input else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix == ".pt":
            torch.jit.save(torch.jit.trace(net, example), str(path))
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            shapes = ({0: batch},) * len(example)
            torch.export.save(torch.export.export(net, example, dynamic_shapes=shapes), str(path))
    return path


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_a_float64_torch_module_runs_end_to_end(tmp_path: Path, slide_path: Path, suffix: str) -> None:
    """validate passed a float64 TorchScript or ExportedProgram module, and every batch then failed
    ("Input type (torch.FloatTensor) and weight type (torch.DoubleTensor) should be the same"),
    every slide quarantined: the backend fed float32. It is fed the batch widened to float64, so
    its outputs are the float32 twin's, in float64."""
    import pandas as pd

    outputs = {}
    for dtype in ("float64", "float32"):
        model = torch_module(tmp_path / f"{dtype}{suffix}", dtype)
        job = slide_job([str(slide_path)], model, tmp_path / dtype)
        job["model"]["backend"] = "torch"
        spec = write_job(tmp_path / f"{dtype}.yaml", job)
        assert main(["validate", str(spec)]) == 0
        assert main(["run", str(spec)]) == 0
        outputs[dtype] = pd.read_parquet(tmp_path / dtype / "predictions.parquet").sort_values(["x", "y"])
    wide, narrow = outputs["float64"], outputs["float32"]
    columns = [f"output_{c}" for c in range(3)]
    assert len(wide) == len(narrow) > 0 and list(wide.columns) == list(narrow.columns)
    assert all(wide[c].dtype == "float64" and narrow[c].dtype == "float32" for c in columns)
    for c in columns:  # float32 sums 4096 terms per tile; the weights are the same numbers rounded
        assert np.allclose(wide[c], narrow[c], rtol=0, atol=1e-5) and wide[c].nunique() > 1


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_fp16_on_a_float64_torch_module_is_refused_by_validate_and_run(
        tmp_path: Path, slide_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    """autocast leaves float64 arithmetic alone: the run would be float64 under the name fp16."""
    model = torch_module(tmp_path / f"m{suffix}", "float64")
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"].update(backend="torch", precision="fp16")
    (field, message), = _refused(tmp_path, job)
    assert field == "model.precision" and "is a float64 module" in message and "module.float()" in message
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(spec)]) == 2 and "is a float64 module" in capsys.readouterr().err


@pytest.mark.parametrize(("dtype", "second", "words"), [("int64", False, "input 'x' takes int64"),
                                                         ("float32", True, "takes 2 inputs (x, y)")])
def test_an_exported_program_gpubatch_cannot_feed_is_refused_by_validate_and_run(
        tmp_path: Path, slide_path: Path, dtype: str, second: bool, words: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    if dtype == "int64":  # an integer input, converted in the module: its signature says int64
        import torch

        class Ints(torch.nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x.float().mean(dim=(2, 3))

        torch.export.save(torch.export.export(Ints(), (torch.zeros(2, 3, 64, 64, dtype=torch.int64),)),
                          str(tmp_path / "m.pt2"))
        model = tmp_path / "m.pt2"
    else:
        model = torch_module(tmp_path / "m.pt2", dtype, second_input=second)
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    job["model"]["backend"] = "torch"
    (field, message), = _refused(tmp_path, job)
    assert field == "model.path" and words in message
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(spec)]) == 2 and words in capsys.readouterr().err


def test_a_float64_genome_model_is_encoded_in_float32(tmp_path: Path) -> None:
    """A float64 model's one-hot is encoded in float32 and widened as it is fed: float16 is refused."""
    from conftest import shared_file

    fa = str(shared_file("genomics", "sarscov2", "EMN908947.fa"))
    model = onnx_model(tmp_path / "d.onnx", ["N", 32, 4], elem_type="DOUBLE", reduce_axes=(1, 2))
    job = {"kind": "genome", "windows": {"reference": fa, "length": 32}, "model": {"path": str(model)},
           "output": {"uri": str(tmp_path / "o")}, "run": {"profile": "inline"}}
    assert validate_job(_spec(tmp_path, job)).shards > 0
    (field, message), = _refused(tmp_path, job, "windows.encoding.dtype=float16")
    assert field == "windows.encoding.dtype"
    assert message == ("float16, but the model's input 'x' takes float64 (encoded in float32 and widened exactly "
                       "as it is fed); set windows.encoding.dtype: float32")


@pytest.mark.parametrize("elem", ["BFLOAT16", "FLOAT8E4M3FN"])
def test_an_output_onnx_runtime_cannot_hand_to_numpy_is_refused(tmp_path: Path, slide_path: Path, elem: str) -> None:
    """A bf16 embedding failed every batch of every slide ("No corresponding Numpy type"); an fp8
    one came back from ONNX Runtime as raw uint8 codes and was written as such, exit 0."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Cast", ["m"], ["embedding"], to=getattr(TensorProto, elem))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
                              [helper.make_tensor_value_info("embedding", getattr(TensorProto, elem), ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "cast.onnx"))
    (field, message), = _refused(tmp_path, slide_job([str(slide_path)], tmp_path / "cast.onnx", tmp_path / "out"))
    assert field == "model.path" and f"'embedding' ({onnx_dtype_name(getattr(TensorProto, elem))})" in message
    assert "Cast to float32" in message


def test_genome_encoding_dtype_must_be_the_models(tmp_path: Path) -> None:
    from conftest import shared_file

    fa = str(shared_file("genomics", "sarscov2", "EMN908947.fa"))
    model = onnx_model(tmp_path / "h.onnx", ["N", 32, 4], elem_type="FLOAT16", reduce_axes=(1, 2))
    job = {"kind": "genome", "windows": {"reference": fa, "length": 32}, "model": {"path": str(model)},
           "output": {"uri": str(tmp_path / "o")}, "run": {"profile": "inline"}}
    (field, message), = _refused(tmp_path, job)
    assert field == "windows.encoding.dtype"
    assert message == "float32, but the model's input 'x' takes float16; set windows.encoding.dtype: float16"
    assert validate_job(_spec(tmp_path, job, "windows.encoding.dtype=float16")).shards > 0


# ---------------------------------------------------------------------------------------------
# storage credentials, against a real S3 server (moto) with every credential source emptied

AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


@pytest.fixture()
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No AWS variables, no ~/.aws files, and no instance-metadata lookup."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def _s3_job(s3: Any, tmp_path: Path, classifier: Path, storage: dict[str, Any]) -> dict[str, Any]:
    from gpubatch.cli.demo import write_synthetic_slide

    uri = s3.upload(write_synthetic_slide(tmp_path / "s.tif", 512, 512, seed=3))
    return slide_job([uri], classifier, tmp_path / "out", input={"storage": storage})


def test_s3_without_credentials_is_refused_with_how_to_supply_them(
        s3: Any, tmp_path: Path, classifier: Path, no_credentials: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    storage = {"endpoint_url": s3.endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    spec = write_job(tmp_path / "job.yaml", _s3_job(s3, tmp_path, classifier, storage))
    t0 = time.perf_counter()
    assert main(["validate", str(spec)]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "input.uris[0]: no S3 credentials found" in err
    for way in ("AWS_ACCESS_KEY_ID", "cluster profile's `storage`", "input.storage", "anon: true"):
        assert way in err
    assert main(["run", str(spec)]) == 2  # the same refusal, not N quarantines
    # each way of supplying them is found: the environment ...
    no_credentials.setenv("AWS_ACCESS_KEY_ID", s3.key)
    no_credentials.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    assert main(["validate", str(spec)]) == 0
    no_credentials.delenv("AWS_ACCESS_KEY_ID")
    no_credentials.delenv("AWS_SECRET_ACCESS_KEY")
    # ... the profile's storage section ...
    profile = tmp_path / "creds.yaml"
    profile.write_text(f"cluster: inline\nstorage: {{key: {s3.key}, secret: {s3.secret}}}\n")
    assert main(["validate", str(spec), "--set", f"run.profile={profile}"]) == 0
    # ... and the job's own input.storage
    assert main(["validate", str(spec), "--set", f"input.storage.key={s3.key}",
                 "--set", f"input.storage.secret={s3.secret}"]) == 0
    assert s3.secret not in capsys.readouterr().out
    # an s3:// output takes its own options: input credentials do not reach it
    assert main(["validate", str(spec), "--set", f"input.storage.key={s3.key}", "--set",
                 f"input.storage.secret={s3.secret}", "--set", f"output.uri=s3://{s3.bucket}/out"]) == 2
    err = capsys.readouterr().err
    assert "output.uri: no S3 credentials found" in err and "the job's output.storage" in err
    assert "input.uris[0]" not in err


def test_credential_check_is_bounded_without_instance_metadata(no_credentials: pytest.MonkeyPatch) -> None:
    """With the metadata service allowed, one short attempt at most (no botocore 1 s timeouts)."""
    no_credentials.delenv("AWS_EC2_METADATA_DISABLED")
    t0 = time.perf_counter()
    s3_credential_source({})
    assert time.perf_counter() - t0 < 2.0


# ---------------------------------------------------------------------------------------------
# variant files: what `run` refuses at plan time, `validate` refuses too


def test_validate_reads_the_variant_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import shared_file

    from gpubatch.cli.demo_models import make_genome_model

    fa = str(shared_file("genomics", "sarscov2", "EMN908947.fa"))
    model = make_genome_model(tmp_path / "g.onnx", 16)
    vcf = tmp_path / "v.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   "chr1\t100\t.\tA\tG\t.\t.\t.\n")  # 'chr1': the reference calls it MN908947.3
    job = {"kind": "genome", "windows": {"reference": fa, "variants": str(vcf), "length": 16},
           "model": {"path": str(model)}, "output": {"uri": str(tmp_path / "o")}, "run": {"profile": "inline"}}
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["validate", str(spec)]) == 2
    assert "v.vcf line 3: contig 'chr1' is not in the reference" in capsys.readouterr().err
    body = tmp_path / "body.vcf"  # the header-less body of the vendored VCF: accepted, with a note
    body.write_text("".join(line for line in shared_file("genomics", "sarscov2", "simple.vcf").read_text()
                            .splitlines(keepends=True) if not line.startswith("#")))
    assert main(["validate", str(spec), "--set", f"windows.variants={body}"]) == 0
    out = capsys.readouterr().out
    assert "1 shard, 1 item)" in out and "note: body.vcf has no '#CHROM' header line" in out


_FACTS_THEN_MODULES = ("import sys; from gpubatch.runtime.model_facts import model_first_input, model_outputs; "
                       "i = model_first_input(sys.argv[1]); o = model_outputs(sys.argv[1]); "
                       "print(i.name, i.dims, i.dtype, o, 'onnx' in sys.modules)")


def _facts_in_a_fresh_process(model: Path, cache: Path) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "GPUBATCH_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", _FACTS_THEN_MODULES, str(model)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


def test_model_facts_are_read_once_per_file_and_again_when_it_changes(tmp_path: Path) -> None:
    """The first run imports onnx to read the model; the next ones (fresh processes, as every
    `gpubatch run` is) take the same facts from the cache without importing it; a model
    rewritten in place is read again."""
    model = onnx_model(tmp_path / "m.onnx", ["N", 3, 64, 64])
    first = _facts_in_a_fresh_process(model, tmp_path / "cache")
    again = _facts_in_a_fresh_process(model, tmp_path / "cache")
    assert first == "x [None, 3, 64, 64] float32 {'y': [None, 3]} True"
    assert again == "x [None, 3, 64, 64] float32 {'y': [None, 3]} False"
    onnx_model(model, ["N", 3, 32, 32, 2], reduce_axes=(2, 3, 4))
    changed = _facts_in_a_fresh_process(model, tmp_path / "cache")
    assert changed == "x [None, 3, 32, 32, 2] float32 {'y': [None, 3]} True"


def test_a_damaged_model_facts_cache_is_read_past_and_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache is gpubatch's own file, but a full disk or a killed process can leave it cut
    short: a file that is not the facts is ignored, the model read again, the entry rewritten."""
    from gpubatch.runtime import model_facts

    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))
    model = onnx_model(tmp_path / "m.onnx", ["N", 3, 64, 64])
    entry = Path(model_facts._cache_file(str(model)))
    for damage in ('{"version": 1, "first"', "[]", '{"version": 0}'):
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(damage)
        first = model_facts.model_first_input(str(model))
        assert (first.name, first.dims, first.dtype) == ("x", [None, 3, 64, 64], "float32"), damage
        assert json.loads(entry.read_text())["first"]["dims"] == [None, 3, 64, 64]


@pytest.mark.parametrize(("switch", "value"), [("GPUBATCH_PLAN_AHEAD", "off"), ("GPUBATCH_PLAN_AHEAD", "false"),
                                             ("GPUBATCH_PLAN_AHEAD", "2"), ("GPUBATCH_JOIN_READS", "no")])
def test_a_malformed_switch_variable_is_refused_before_anything_runs(
        tmp_path: Path, slide_path: Path, classifier: Path, monkeypatch: pytest.MonkeyPatch, switch: str, value: str) -> None:
    """The switches take 0 or 1; "off" read as on would be silently wrong."""
    monkeypatch.setenv(switch, value)
    job = slide_job([str(slide_path)], classifier, tmp_path / "out")
    (field, message), = _refused(tmp_path, job)
    assert field == switch and f"not {value!r}" in message and "must be 0 or 1" in message
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 2
    monkeypatch.setenv(switch, "0")
    validate_job(_spec(tmp_path, job))


# ---------------------------------------------------------------------------------------------
# slides: validate opens each as its shard would, and names the ones a run would quarantine


def _slides_with_two_bad(folder: Path) -> list[str]:
    from conftest import synthetic_slides
    from hostile_inputs import truncate_tile

    folder.mkdir()
    synthetic_slides(folder, 2, seed=5, prefix="good")
    (folder / "notes.svs").write_text("not a slide, a text file named like one\n")
    (folder / "cut.tif").write_bytes((folder / "good0.tif").read_bytes()[:300])
    truncate_tile(folder / "good1.tif", folder / "badtile.tif")  # corrupt tiles: only a run finds them
    truncate_tile(folder / "badtile.tif", folder / "badtile.tif", level=1)
    return [str(folder / "*.tif"), str(folder / "notes.svs")]


def test_validate_names_the_slides_a_run_would_quarantine(tmp_path: Path, classifier: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    uris = _slides_with_two_bad(tmp_path / "slides")
    spec = write_job(tmp_path / "job.yaml", slide_job(uris, classifier, tmp_path / "out"))
    assert main(["validate", str(spec)]) == 0
    out = capsys.readouterr().out
    warned = sorted(line.split()[1].rsplit("/", 1)[-1] for line in out.splitlines() if "would be quarantined" in line)
    assert warned == ["cut.tif", "notes.svs"]
    assert main(["validate", str(spec), "--no-open"]) == 0
    assert "would be quarantined" not in capsys.readouterr().out
    assert main(["run", str(spec)]) == 3  # what validate said, and the corrupt tile it could not see
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(Path(f["input"]).name for f in report["failed"]) == ["badtile.tif", "cut.tif", "notes.svs"]


def test_validate_refuses_slides_none_of_which_would_run(tmp_path: Path, classifier: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.svs").write_bytes(b"II*\x00" + b"\x00" * 60)
    spec = write_job(tmp_path / "job.yaml", slide_job([str(tmp_path / "a.svs")], classifier, tmp_path / "out"))
    assert main(["validate", str(spec)]) == 2
    assert "a.svs" in capsys.readouterr().err
    assert main(["validate", str(spec), "--no-open"]) == 0


def test_validate_opens_remote_slides_and_downloads_none(s3: Any, tmp_path: Path, classifier: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import tifffile
    from conftest import synthetic_slides

    synthetic_slides(tmp_path, 1, seed=7, prefix="s")
    good = s3.upload(tmp_path / "s0.tif", "v/good.tif")
    cut = s3.upload_bytes((tmp_path / "s0.tif").read_bytes()[:300], "v/cut.tif")
    staged = s3.upload_bytes(b"whatever a scanner wrote", "v/slide.mrxs")
    tifffile.imwrite(tmp_path / "nompp.tif", np.full((512, 512, 3), 90, np.uint8), tile=(256, 256),
                     photometric="rgb")  # streams, but records no MPP: its shard fails however it reads
    nompp = s3.upload(tmp_path / "nompp.tif", "v/nompp.tif")
    storage = {"endpoint_url": s3.endpoint, "key": s3.key, "secret": s3.secret,
               "client_kwargs": {"region_name": "us-east-1"}}
    spec = write_job(tmp_path / "job.yaml", slide_job([good, cut, staged, nompp], classifier, tmp_path / "out",
                                                      input={"storage": storage}))
    assert main(["validate", str(spec)]) == 0  # access auto: a slide that cannot stream is downloaded
    out = capsys.readouterr().out
    # ... unless it is cut short: its download would be the same bytes, refused the same way
    assert [line.split()[1] for line in out.splitlines() if "would be quarantined" in line] == [cut, nompp]
    assert f"{cut} would be quarantined: truncated" in out
    assert "note: 1 slide(s) not opened: a run downloads them" in out
    assert main(["validate", str(spec), "--set", "input.access=stream"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if "would be quarantined" in line] == [cut, staged, nompp]


def test_file_uris_name_this_machine_or_are_refused_by_validate_and_run(
        tmp_path: Path, classifier: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """RFC 8089: ``file:///p`` and ``file://localhost/p`` are ``/p`` here; ``file://server/p`` is
    ``/p`` on ``server``. It was read as the relative path ``server/p``: here a copy of the
    slide under the working directory, read in the real one's place. validate and run both
    refuse it (exit 2), naming the URI, its field and the fix; an output so named is refused too."""
    import shutil

    from gpubatch.cli.demo import write_synthetic_slide

    (tmp_path / "here").mkdir()
    slide = write_synthetic_slide(tmp_path / "here" / "a.tif", 256, 256, levels=1)
    impostor = tmp_path / "server" / str(slide).lstrip("/")
    impostor.parent.mkdir(parents=True)
    shutil.copy(slide, impostor)
    monkeypatch.chdir(tmp_path)
    for n, uri in enumerate(("file://" + str(slide), "file://localhost" + str(slide), "file://LOCALHOST" + str(slide))):
        spec = write_job(tmp_path / f"ok{n}.yaml", slide_job([uri], classifier, tmp_path / f"out{n}"))
        assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
        assert main(["run", str(spec)]) == 0
        assert json.loads((tmp_path / f"out{n}" / "report.json").read_text())["items"] == 4
    foreign = "file://server" + str(slide)
    for field, job in (("input.uris[0]", slide_job([foreign], classifier, tmp_path / "out-f")),
                       ("output.uri", slide_job([str(slide)], classifier, "file://server/results"))):
        spec = write_job(tmp_path / "foreign.yaml", job)
        for command in ("validate", "run"):
            assert main([command, str(spec)]) == 2
            err = capsys.readouterr().err
            uri = foreign if field == "input.uris[0]" else "file://server/results"
            assert f"{field}: {uri} names a file on the host 'server'" in err
            assert f"drop the host (file://{uri[len('file://server'):]})" in err and "mount server's share" in err
    assert not (tmp_path / "out-f").exists() and not (tmp_path / "server" / "results").exists()


# ---------------------------------------------------------------------------------------------
# the output: validate refuses (without writing there) every output run would refuse


def _both_refuse(spec: Path, field: str, words: str, capsys: pytest.CaptureFixture[str], *flags: str) -> None:
    """``validate`` and then ``run`` (same flags) both exit 2 naming ``field`` and ``words``."""
    for command in ("validate", "run"):
        assert main([command, str(spec), *flags]) == 2, command
        err = capsys.readouterr().err
        assert f"{field}: " in err and words in err, (command, err)


def test_validate_refuses_the_outputs_run_refuses_and_writes_nothing_there(
        tmp_path: Path, slides_dir: Path, mean_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """validate said "valid" for an output folder of someone else's files, for one another run
    was writing, and for one holding another job's (or this job's) committed shards; the run
    then stopped at once with exit 2. Now validate gives the same refusal, and touches nothing."""
    import os
    import socket

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("not gpubatch's\n")
    job = slide_job([str(slides_dir / "s0.tif")], mean_model, foreign)
    spec = write_job(tmp_path / "job.yaml", job)
    _both_refuse(spec, "output.uri", "holds files that gpubatch did not write", capsys)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]

    out = tmp_path / "out"
    spec = write_job(tmp_path / "job.yaml", slide_job([str(slides_dir / "s0.tif")], mean_model, out))
    assert main(["validate", str(spec)]) == 0 and not out.exists()  # a new folder: nothing made
    assert main(["run", str(spec)]) == 0
    _both_refuse(spec, "output.uri", "use --resume to finish that run", capsys)
    assert main(["validate", str(spec), "--resume"]) == 0 and main(["validate", str(spec), "--overwrite"]) == 0
    other = write_job(tmp_path / "other.yaml", slide_job([str(slides_dir / "s0.tif")], mean_model, out,
                                                          tiles={"size": 32}))
    _both_refuse(other, "tiles.size", "64 committed, 32 now", capsys, "--resume")

    lease = {"run_id": "someone-else", "host": socket.gethostname(), "pid": os.getpid(),
             "heartbeat": time.time() + 60, "stale_after_s": 600}
    (out / "_lease.json").write_text(json.dumps(lease))
    _both_refuse(spec, "output.uri", "another run is writing this output: run someone-else", capsys, "--overwrite")
    assert json.loads((out / "_lease.json").read_text())["run_id"] == "someone-else"


def test_tune_of_a_fixed_batch_model_says_tune_not_auto(tmp_path: Path, slide_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`gpubatch tune` refuses a model with a fixed batch dimension (exit 2, as validate does), but
    said "the job asks for batch_size auto" of a job that set batch_size 32 (or 1)."""
    model = onnx_model(tmp_path / "b1.onnx", [1, 3, 64, 64])
    job = slide_job([str(slide_path)], model, tmp_path / "out")
    for in_spec in (32, 1):
        job["model"]["batch_size"] = in_spec
        assert main(["tune", str(write_job(tmp_path / "job.yaml", job))]) == 2
        err = capsys.readouterr().err
        assert "batch_size auto" not in err
        assert "fixed batch dimension of 1" in err and "nothing to tune" in err
        assert "set model.batch_size: 1" in err and "dynamic_axes" in err
