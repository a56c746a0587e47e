"""Ctrl-C and SIGTERM are never lost: a signal whose exception Python dropped (raised inside a
finaliser, where Dask's futures release themselves) is raised again at the submit loop's next
poll. A CI run lost one that way: the client printed "Exception ignored in: Future.__del__ ...
KeyboardInterrupt", then ran all its shards and exited 0."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import audit_lines, windows_job

from gpubatch.runtime.stopping import Terminated, raise_if_stopped, stop_on_signals


class _SignalsInItsFinaliser:
    def __init__(self, sig: int):
        self.sig = sig

    def __del__(self) -> None:
        os.kill(os.getpid(), self.sig)
        for _ in range(10_000):  # the handler runs here, between bytecodes of the finaliser
            pass


@pytest.mark.parametrize(("sig", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_a_finaliser_swallowed_is_raised_at_the_next_check(sig: int, raised: type[BaseException],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    dropped: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: dropped.append(info.exc_type))
    with stop_on_signals():
        _SignalsInItsFinaliser(sig)  # freed at once: its __del__ takes the signal
        assert dropped == [raised]  # Python printed and dropped the handler's exception
        with pytest.raises(raised):
            raise_if_stopped()
    raise_if_stopped()  # the run is over: nothing is latched for the next one


def test_the_previous_handlers_come_back_and_an_ignored_sigint_stays_ignored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job without job control
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not before
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGINT, previous_int)


def test_a_ctrl_c_during_an_import_comes_after_it_not_inside_it(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process's first run (a notebook's first cell) spends seconds importing pandas,
    Dask and ONNX Runtime, and a Ctrl-C there landed inside an import: the module stayed
    half-imported for the rest of the process (the next run: "partially initialized module
    'pandas' has no attribute '_pandas_datetime_CAPI'"), or importlib's lock stayed held and the
    next run's Dask event loop thread waited on it ("assert loop is not None" after 10 s). Now
    the import finishes and the interrupt is raised just after it."""
    import time

    (tmp_path / "slow_to_import.py").write_text(
        "import os, signal\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "for _ in range(100_000):  # the handler runs here, inside the module's import\n"
        "    pass\n"
        "WHOLE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imported = False
    try:
        with stop_on_signals(), pytest.raises(KeyboardInterrupt):
            import slow_to_import  # noqa: F401
            imported = True
            for _ in range(500):  # the signal, sent again after the import, ends this
                time.sleep(0.01)
        assert imported and sys.modules["slow_to_import"].WHOLE
    finally:
        sys.modules.pop("slow_to_import", None)


def test_a_run_whose_ctrl_c_a_finaliser_swallowed_stops_at_the_next_poll(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The CI failure, made certain: Ctrl-C lands in a finaliser on the client after two shards
    are final. The run stops (interrupted, exit 1 from the CLI) instead of running the rest."""
    import gpubatch
    from gpubatch.runtime.progress import Progress

    update = Progress.update

    def update_then_signal(self: Progress, result: Any) -> None:
        update(self, result)
        if self.done == 2:
            _SignalsInItsFinaliser(signal.SIGINT)

    dropped: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: dropped.append(info.exc_type))
    monkeypatch.setattr(Progress, "update", update_then_signal)
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(windows_job(tmp_path, 20), show_progress=False)
    assert dropped == [KeyboardInterrupt]
    out = tmp_path / "out"
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
    assert 2 <= len(audit_lines(out)) < 20


def test_a_ctrl_c_during_the_run_s_end_is_recorded_and_resume_finishes_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while predictions.parquet is merged (a minute on a large run): the run is recorded
    as interrupted (status.json said "running" for a client that had gone, and audit.jsonl was
    not written), nothing half-merged is left as the output, and --resume ends the run."""
    import gpubatch
    from gpubatch.runtime import runner

    merge = runner.merge_parquet

    def merge_interrupted(*args: Any, **kwargs: Any) -> int:
        os.kill(os.getpid(), signal.SIGINT)
        return merge(*args, **kwargs)

    job = windows_job(tmp_path, 6)
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "merge_parquet", merge_interrupted)
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(job, show_progress=False)
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
    assert [e["event"] for e in audit_lines(out, None) if e["event"].startswith("run_")] == ["run_start", "run_interrupted"]
    assert len(audit_lines(out)) == 6 and not (out / "predictions.parquet").exists()
    monkeypatch.setattr(runner, "merge_parquet", merge)
    result = gpubatch.run(job, show_progress=False, resume=True)
    assert result.exit_code == 0 and len(result.predictions()) == 6
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


def _resume_interrupted(tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch,
                        tiles: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """A finished run over two slides (its report.html not marked unfinished), then a --resume
    over a third that SIGINT stops after its first result: the output and the three-input job.
    Progress.update is left patched to interrupt; a test that runs again puts it back."""
    from conftest import slide_job, write_job

    import gpubatch
    from gpubatch.runtime.progress import Progress

    out = tmp_path / "out"
    job = slide_job([str(slides_dir / "s0.tif"), str(slides_dir / "s1.tif")], mean_model, out)
    if tiles is not None:
        job["tiles"] = tiles
    assert gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False).exit_code == 0
    assert 'id="unfinished"' not in (out / "report.html").read_text()
    job["input"]["uris"].append(str(slides_dir / "s2.tif"))
    update = Progress.update

    def update_then_interrupt(self: Progress, result: Any) -> None:
        update(self, result)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Progress, "update", update_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(write_job(tmp_path / "b.yaml", job), resume=True, show_progress=False)
    return out, job


def test_a_resume_interrupted_is_not_reported_as_the_run_before_it(tmp_path: Path, slides_dir: Path,
                                                                   mean_model: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished run, then a --resume over one more input that is interrupted: `report` and
    open_results gave the earlier run's report.json (finished, two inputs, nothing failed) as the
    output's report, though status said interrupted and a third input was committed since."""
    from conftest import cli

    import gpubatch

    out, _ = _resume_interrupted(tmp_path, slides_dir, mean_model, monkeypatch,
                                 {"size": 128, "mpp": 0.5, "tissue": {"method": "none"}})
    report = gpubatch.open_results(str(out)).report
    assert report["complete"] is False and report["state"] == "interrupted" and report["shards_done"] == 3
    text = cli("report", str(out)).communicate(timeout=120)[0]
    assert "no finished run" in text, text


def test_a_resume_interrupted_or_killed_leaves_no_report_html_saying_finished(tmp_path: Path, slides_dir: Path,
                                                                             mean_model: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """report.html, the page read in the morning, stayed the finished run's (2 inputs, done)
    after a --resume over a third input was interrupted; now the stopped run writes a page
    marked unfinished with what is committed, and a resume starts by removing the old page (a
    SIGKILLed resume writes nothing at its end)."""
    from conftest import write_job

    import gpubatch
    from gpubatch.runtime import resume
    from gpubatch.runtime.progress import Progress

    update = Progress.update
    out, job = _resume_interrupted(tmp_path, slides_dir, mean_model, monkeypatch)
    page = (out / "report.html").read_text()
    assert "This run did not finish (interrupted)" in page and "the 3 shard(s) committed so far" in page

    def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed")  # as if SIGKILLed after the resume's checks: no end of run at all

    monkeypatch.setattr(Progress, "update", update)
    monkeypatch.setattr(resume, "sweep", killed)
    with pytest.raises(SystemExit):
        gpubatch.run(write_job(tmp_path / "b.yaml", job), resume=True, show_progress=False)
    assert not (out / "report.html").exists()


def test_a_run_whose_end_fails_otherwise_than_by_storage_is_recorded_as_failed(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An error at the run's end that is not a storage error (a part that no longer parses: pyarrow
    raises ArrowInvalid, a ValueError) left status.json saying "running" and no run_failed in
    the ledger: `status` then called the run interrupted, and --resume the thing to do."""
    import gpubatch
    from gpubatch.runtime import runner

    merge = runner.merge_parquet

    def merge_a_damaged_part(store: Any, committed: Any, *args: Any, **kwargs: Any) -> int:
        refs = list(committed)
        part = Path(store.path("_parts", refs[0].part))
        part.write_bytes(b"not parquet" + part.read_bytes()[11:-11] + b"not parquet")
        return merge(store, refs, *args, **kwargs)

    monkeypatch.setattr(runner, "merge_parquet", merge_a_damaged_part)
    with pytest.raises(ValueError):
        gpubatch.run(windows_job(tmp_path, 3), show_progress=False)
    out = tmp_path / "out"
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "ArrowInvalid" in status["reason"], status
    assert [e["event"] for e in audit_lines(out, None) if e["event"].startswith("run_")] == ["run_start", "run_failed"]


def test_an_unfinished_run_s_report_lists_only_inputs_that_are_still_failed(tmp_path: Path, slides_dir: Path,
                                                                            mean_model: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`report` and open_results on an interrupted run list what failed from the ledger: every
    failed attempt was listed, those whose retry then committed too (and open_results said the
    run was partial). A shard that is committed has not failed; one that is not, once."""
    from conftest import slide_job, write_job

    import gpubatch
    from gpubatch.runtime import runner
    from gpubatch.sources.slides.source import SlideSource

    real_open, merge = SlideSource.open, runner.merge_parquet
    opened: dict[str, int] = {}

    def flaky_open(self: SlideSource, shard: Any, job: Any, clocks: Any) -> Any:
        opened[shard.input_uri] = opened.get(shard.input_uri, 0) + 1
        if shard.input_uri.endswith("s2.tif") or (shard.input_uri.endswith("s1.tif") and opened[shard.input_uri] == 1):
            raise ConnectionResetError("connection reset by peer")
        return real_open(self, shard, job, clocks)

    def merge_interrupted(*args: Any, **kwargs: Any) -> int:
        os.kill(os.getpid(), signal.SIGINT)
        return merge(*args, **kwargs)

    monkeypatch.setattr(SlideSource, "open", flaky_open)
    monkeypatch.setattr(runner, "merge_parquet", merge_interrupted)
    job = slide_job([str(slides_dir / "*.tif")], mean_model, tmp_path / "out", run={"retries": 1})
    job["tiles"] = {"size": 128, "mpp": 0.5, "tissue": {"method": "none"}}
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(write_job(tmp_path / "job.yaml", job), show_progress=False)
    assert len(audit_lines(tmp_path / "out", "shard_failed")) == 3  # s1 once, s2 twice
    result = gpubatch.open_results(str(tmp_path / "out"))
    assert [Path(f["input"]).name for f in result.failed] == ["s2.tif"]
    assert result.report["shards_done"] == 2 and result.exit_code == 3


def test_a_heartbeat_after_the_run_s_end_keeps_the_reason_it_ended(tmp_path: Path) -> None:
    """The lease's heartbeat writes status.json until the lease is released, after the run
    recorded why it stopped: a beat in between wrote the state without its reason."""
    from gpubatch.outputs.store import OutputStore
    from gpubatch.runtime.progress import Progress

    progress = Progress(3, store=OutputStore(tmp_path / "out"), enabled=False, run_id="r")
    progress.finish("failed", reason="WorkersUnavailable: no worker for 5 s")
    progress.heartbeat()
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "failed" and status["reason"] == "WorkersUnavailable: no worker for 5 s"


def test_a_run_whose_outputs_cannot_be_written_says_which_inputs_failed(tmp_path: Path, slides_dir: Path,
                                                                        mean_model: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's end fails (predictions.parquet cannot be written: here a folder holds its
    name) after an input failed: no report is written, and the one line said "no shard is
    computed again", hiding that an input failed and that --resume tries it again."""
    from conftest import slide_job, write_job

    import gpubatch
    from gpubatch.core.errors import OutputsNotWrittenError
    from gpubatch.runtime.progress import Progress
    from gpubatch.sources.slides.source import SlideSource

    real_open, update = SlideSource.open, Progress.update
    out = tmp_path / "out"

    def failing_open(self: SlideSource, shard: Any, job: Any, clocks: Any) -> Any:
        if shard.input_uri.endswith("s2.tif"):
            raise TimeoutError("read timed out")
        return real_open(self, shard, job, clocks)

    def update_and_block_the_merge(self: Progress, result: Any) -> None:
        update(self, result)
        (out / "predictions.parquet" / "in-the-way").mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(SlideSource, "open", failing_open)
    monkeypatch.setattr(Progress, "update", update_and_block_the_merge)
    job = slide_job([str(slides_dir / "*.tif")], mean_model, out, run={"retries": 0})
    job["tiles"] = {"size": 128, "mpp": 0.5, "tissue": {"method": "none"}}
    with pytest.raises(OutputsNotWrittenError) as info:
        gpubatch.run(write_job(tmp_path / "job.yaml", job), show_progress=False)
    assert "1 input(s) failed" in str(info.value) and "--resume" in str(info.value), info.value
