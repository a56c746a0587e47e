"""What an operator reaches for: `inspect model.onnx`, `ingest --overwrite`, `submit` to a scheduler
that is not there, and a Dask dashboard that stays off (and quiet) unless asked for."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import shared_file, slide_job, write_job

from gpubatch.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def test_inspect_an_onnx_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    from onnx import TensorProto, helper

    path = tmp_path / "m.onnx"
    node = helper.make_node("ReduceMean", ["pixels"], ["score"], axes=[2, 3], keepdims=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT16, ["batch", 3, 96, 96])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT16, ["batch", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hand"), str(path))
    assert main(["inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"] == [{"name": "pixels", "shape": ["batch", 3, 96, 96], "dtype": "float16"}]
    assert info["outputs"] == [{"name": "score", "shape": ["batch", 3], "dtype": "float16"}]
    assert info["opset"] == {"ai.onnx": 17} and info["producer"] == "hand"
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["bytes"] == path.stat().st_size


def test_ingest_overwrite_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fa, out = shared_file("genomics", "tangermeme", "test.fa"), tmp_path / "g.zarr"
    assert main(["ingest", "genome", str(fa), str(out)]) == 0
    assert main(["ingest", "genome", str(fa), str(out)]) == 2  # refused, nothing ran: usage
    assert "--overwrite" in capsys.readouterr().err
    (out / "stray").write_text("left from the first store")
    assert main(["ingest", "genome", str(fa), str(out), "--overwrite"]) == 0
    assert not (out / "stray").exists()  # replaced, not merged


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def test_submit_to_an_unreachable_scheduler_fails_in_one_line(tmp_path: Path, slide_path: Path,
                                                             classifier: Path) -> None:
    spec = write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], classifier, tmp_path / "out"))
    address = f"tcp://127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gpubatch", "submit", str(spec), "--scheduler", address],
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert time.perf_counter() - t0 < 30
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"gpubatch: cannot reach the Dask scheduler at {address}: Connection refused; check the address "
        "(tcp://HOST:PORT, port 8786 by default) and that the scheduler is running and reachable from here"]


def test_client_timeout_is_one_error_too() -> None:
    """Past the quick check (a scheduler that accepts TCP but never speaks Dask), Dask's own
    connection attempt is bounded and summarised in one message."""
    from gpubatch.core.errors import GpubatchError
    from gpubatch.runtime import cluster

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        old = cluster.SCHEDULER_TIMEOUT_S
        cluster.SCHEDULER_TIMEOUT_S = 2
        try:
            t0 = time.perf_counter()
            with pytest.raises(GpubatchError, match=f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within 2 s"):
                cluster.connect_scheduler(f"tcp://127.0.0.1:{port}")
            assert time.perf_counter() - t0 < 20
        finally:
            cluster.SCHEDULER_TIMEOUT_S = old


def _scheduler_port(profile: dict[str, Any]) -> tuple[int, str | None]:
    from gpubatch.runtime.cluster import open_executor

    with open_executor(profile, 1) as executor:
        http = executor.cluster.scheduler.http_server  # type: ignore[attr-defined]
        return int(http.port), executor.cluster.dashboard_link if profile.get("dashboard") else None  # type: ignore[attr-defined]


def test_dashboard_is_off_and_quiet_unless_asked() -> None:
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 8787))
        held.listen(1)
    except OSError:
        held.close()  # someone else holds 8787 already: the same situation
    base = {"cluster": "local", "threads_per_worker": 1}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        port, _ = _scheduler_port(base)
    held.close()
    assert port != 8787
    assert not [w for w in seen if "8787" in str(w.message)]
    wanted = _closed_port()
    port, link = _scheduler_port({**base, "dashboard": f"127.0.0.1:{wanted}"})
    assert port == wanted and link is not None and str(wanted) in link


def _one_line_error(code: int, expected: int, capsys: pytest.CaptureFixture[str], *words: str) -> None:
    err = capsys.readouterr().err
    assert code == expected and err.startswith("gpubatch: ") and all(w in err for w in words), (code, err)


def test_user_errors_are_one_message_with_the_right_exit_never_a_traceback(
        tmp_path: Path, slide_path: Path, mean_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A truncated model made validate and run die in protobuf's DecodeError (exit 1, no field
    named) and inspect print it; a binary file given as the job spec died in PyYAML's reader;
    a damaged status.json or report.json was a JSONDecodeError; and `report` on a folder that was
    never an output printed an empty report and exited 0."""
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(mean_model.read_bytes()[:100])
    spec = write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], bad, tmp_path / "out"))
    for command in ("validate", "run"):
        _one_line_error(main([command, str(spec)]), 2, capsys, "model.path: ", "not a readable ONNX model", "export it again")
    assert not (tmp_path / "out").exists()
    _one_line_error(main(["inspect", str(bad)]), 1, capsys, "cut.onnx: not an ONNX model onnx can read")
    (tmp_path / "job.yaml.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(32)) * 4)  # gzipped by mistake
    _one_line_error(main(["validate", str(tmp_path / "job.yaml.gz")]), 2, capsys, "not a YAML text file")

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("mine\n")
    for command in ("status", "report"):
        _one_line_error(main([command, str(folder)]), 2, capsys, "is not a gpubatch output")
        _one_line_error(main([command, str(tmp_path / "nowhere")]), 2, capsys, "nowhere does not exist")

    out = tmp_path / "ran"
    good = write_job(tmp_path / "good.yaml", slide_job([str(slide_path)], mean_model, out))
    assert main(["run", str(good)]) == 0
    items = json.loads((out / "report.json").read_text())["items"]
    capsys.readouterr()
    (out / "report.json").write_text('{"items": ')  # a disk that filled up while it was written
    assert main(["report", str(out)]) == 0
    assert f"{items} items" in capsys.readouterr().out  # what is committed, not a traceback
    (out / "status.json").write_text("{")
    _one_line_error(main(["status", str(out)]), 1, capsys, "status.json cannot be read", f"gpubatch report {out}")


def test_validate_given_a_directory_says_so_and_what_it_wants(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`validate DIR` said "job spec file not found: DIR", of a folder that is there: it says it
    is a directory, that a job spec's YAML file is wanted, and names the YAML files it holds."""
    empty, specs = tmp_path / "empty", tmp_path / "specs"
    empty.mkdir()
    specs.mkdir()
    (specs / "wsi.yaml").write_text("name: a\n")
    for command in ("validate", "run"):
        _one_line_error(main([command, str(empty)]), 2, capsys, f"{empty} is a directory",
                        "give the job spec's YAML file, e.g. job.yaml")
    _one_line_error(main(["validate", str(specs)]), 2, capsys, f"{specs} is a directory", "(it holds wsi.yaml)")
