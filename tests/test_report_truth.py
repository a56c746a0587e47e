"""What the morning report says must be true: `status`, report.json, report.html and the
terminal summary agree on a run's figures, say what each figure measures, and never present an
earlier or unfinished run as the output's finished one. Each test runs a real small job."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import slide_job, write_job

from gpubatch.cli.main import main


def _status(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "status.json").read_text()))


def _report(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "report.json").read_text()))


def _interrupt_after_first_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run is interrupted (SIGINT, as Ctrl-C) once its first shard is counted."""
    from gpubatch.runtime.progress import Progress

    update = Progress.update

    def update_then_interrupt(self: Progress, result: Any) -> None:
        update(self, result)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Progress, "update", update_then_interrupt)


def test_status_and_report_json_give_one_rate_over_one_span(tmp_path: Path, slides_dir: Path, mean_model: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`status` said 83.1 items/s where report.json said 88.1 for the same finished run (30.0 and
    30.9 after a resume): status.json timed from the first shard's submission to its last write,
    report.json from the run's start to its report. Both now cover the run's start to its end,
    and `status` says how many items over how many seconds the rate is."""
    import gpubatch

    out = tmp_path / "out"
    job = slide_job([str(slides_dir / "s0.tif"), str(slides_dir / "s1.tif")], mean_model, out)
    assert gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False).exit_code == 0
    for resumed in (False, True):
        status, report = _status(out), _report(out)
        assert status["items"] == report["items"] > 0
        assert status["items_per_s"] == pytest.approx(report["items_per_s"], rel=1e-9)
        assert status["wall_s"] == pytest.approx(report["wall_s"], rel=1e-9)
        assert main(["status", str(out)]) == 0
        line = capsys.readouterr().out
        assert f"{report['items']} items{' this run' if resumed else ''} in {report['wall_s']:.1f} s " \
               f"= {report['items_per_s']:.1f} items/s" in line, line
        if not resumed:
            job["input"]["uris"].append(str(slides_dir / "s2.tif"))
            assert gpubatch.run(write_job(tmp_path / "b.yaml", job), resume=True, show_progress=False).exit_code == 0


def _headline_tile(page: str, key: str) -> str:
    """The headline tile whose label starts with ``key``: 'value | label'."""
    import re

    for value, label in re.findall(r'<div class="tile"><div class="v">([^<]*)</div><div class="k">([^<]*)</div>', page):
        if label.startswith(key):
            return f"{value} | {label}"
    raise AssertionError(f"no headline tile {key!r}")


def test_an_input_left_empty_by_the_run_before_a_resume_is_not_counted_done(
        tmp_path: Path, slides_dir: Path, mean_model: Path) -> None:
    """report.html's "inputs done" counted an input that yielded no items in the run before a
    --resume as done (only this run's empty inputs were taken off): "3/3 inputs done" over an
    output holding an empty slide. The terminal's resumed line says how many of the kept
    shards are empty too."""
    import gpubatch
    from gpubatch.cli.demo import write_synthetic_slide
    from gpubatch.report.text import format_summary

    tiny = write_synthetic_slide(tmp_path / "tiny.tif", 64, 64, levels=1, tile=16, seed=5)  # under one tile
    out = tmp_path / "out"
    job = slide_job([str(tiny), str(slides_dir / "s0.tif")], mean_model, out)
    assert gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False).exit_code == 0
    assert _headline_tile((out / "report.html").read_text(), "inputs done") == "1/2 | inputs done, 1 empty"
    job["input"]["uris"].append(str(slides_dir / "s1.tif"))
    result = gpubatch.run(write_job(tmp_path / "b.yaml", job), resume=True, show_progress=False)
    assert _headline_tile((out / "report.html").read_text(), "inputs done") == "2/3 | inputs done, 1 empty"
    assert "2 shard(s) already committed, skipped (" in format_summary(result.report)
    assert "1 of them empty" in format_summary(result.report)


def test_report_of_a_damaged_report_json_says_so_not_no_finished_run(
        tmp_path: Path, slides_dir: Path, mean_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`report` on an output whose report.json is damaged printed "no finished run ...
    (finished, 1 shards)": the run had finished (status.json says so); its report.json is what
    cannot be read, and the figures shown are then what is committed."""
    import gpubatch

    out = tmp_path / "out"
    job = slide_job([str(slides_dir / "s0.tif")], mean_model, out)
    assert gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False).exit_code == 0
    (out / "report.json").write_text('{"items": ')
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "no finished run" not in first and f"{out}/report.json cannot be read" in first, first
    assert "latest run: finished; 1 of 1 shard(s) committed" in first, first


def test_an_interrupted_resume_leaves_no_report_json_saying_the_run_before_finished(
        tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """After a --resume was interrupted, report.json stayed the finished run's before it (its
    run_id, its two inputs): `report` and open_results looked at status.json and knew, a person
    or a script reading report.json did not. Like report.html, it now says what is committed,
    marked unfinished, with the interrupted run's id; and `inspect OUTDIR` says so too."""
    import gpubatch

    out = tmp_path / "out"
    job = slide_job([str(slides_dir / "s0.tif"), str(slides_dir / "s1.tif")], mean_model, out)
    assert gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False).exit_code == 0
    assert _report(out).get("complete", True) is True
    job["input"]["uris"].append(str(slides_dir / "s2.tif"))
    _interrupt_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(write_job(tmp_path / "b.yaml", job), resume=True, show_progress=False)
    report, status = _report(out), _status(out)
    assert report["run_id"] == status["run_id"] and status["state"] == "interrupted"
    assert report["complete"] is False and report["state"] == "interrupted" and report["shards_done"] == 3
    assert main(["inspect", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["complete"] is False and shown["state"] == "interrupted"


def test_a_resume_removes_the_finished_report_json_while_it_runs(tmp_path: Path, slides_dir: Path,
                                                               mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume killed after its checks (SIGKILL: no end of run is written) left the finished
    run's report.json in place, as if nothing had happened since; report.html was removed."""
    import gpubatch
    from gpubatch.runtime import resume

    out = tmp_path / "out"
    job = slide_job([str(slides_dir / "s0.tif")], mean_model, out)
    assert gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False).exit_code == 0
    job["input"]["uris"].append(str(slides_dir / "s1.tif"))

    def killed(*args: Any, **kwargs: Any) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(resume, "sweep", killed)
    with pytest.raises(SystemExit):
        gpubatch.run(write_job(tmp_path / "b.yaml", job), resume=True, show_progress=False)
    assert not (out / "report.json").exists() and not (out / "report.html").exists()


def _starvation_tile(page: str) -> str:
    return _headline_tile(page, "model starvation")


def test_a_run_with_no_model_time_claims_no_starvation_band(tmp_path: Path, mean_model: Path) -> None:
    """A run whose every input was empty showed "100.0% model starvation (input-bound)" in
    report.html and on the terminal (its model stage waited, and never ran a batch), and one
    whose every input was quarantined "0.0% (not input-bound)": no batch was measured, so
    neither is true. Both now say the starvation was not measured."""
    import gpubatch
    from gpubatch.cli.demo import write_synthetic_slide
    from gpubatch.report.html import render_html
    from gpubatch.report.summary import summarize
    from gpubatch.report.text import format_summary

    tiny = write_synthetic_slide(tmp_path / "tiny.tif", 64, 64, levels=1, tile=16, seed=5)
    result = gpubatch.run(write_job(tmp_path / "a.yaml", slide_job([str(tiny)], mean_model, tmp_path / "out")),
                          show_progress=False)
    page = (tmp_path / "out" / "report.html").read_text()
    assert _starvation_tile(page) == "– | model starvation (not measured: the model ran no batch)"
    assert "starvation – (not measured: the model ran no batch)" in format_summary(result.report)
    quarantined = summarize([], [{"input": "a.svs", "error": "bad"}], 1.0, {"name": "q", "workers": 1}).to_dict()
    assert _starvation_tile(render_html(quarantined)) == "– | model starvation (not measured: the model ran no batch)"


def test_a_run_too_small_to_judge_names_no_band(tmp_path: Path, slides_dir: Path, mean_model: Path) -> None:
    """A run too small for a verdict said "starvation 0.3% (not input-bound)" above "verdict:
    none (too little work ...)": the band is the verdict's, and there is none."""
    import gpubatch
    from gpubatch.report.text import format_summary

    out = tmp_path / "out"
    result = gpubatch.run(write_job(tmp_path / "a.yaml", slide_job([str(slides_dir / "s0.tif")], mean_model, out)),
                          show_progress=False)
    assert result.report["verdict"]["state"] == "too-small"
    starvation = result.report["starvation"]
    assert f"starvation {starvation:.1%} (too little work to judge)" in format_summary(result.report)
    assert _starvation_tile((out / "report.html").read_text()) == \
        f"{starvation:.1%} | model starvation (too little work to judge)"


def test_small_shares_and_rates_are_not_rounded_to_nothing() -> None:
    """A data path costing 0.4% of the model's speed read "0%" in report.html and the verdict,
    a 4.6% starvation "5%" (the band's edge) on the progress bar, batches 99.6% full "100%",
    and a genome run's 0.4 items/s "0 items/s" on the bar."""
    from gpubatch.report.gap import gap
    from gpubatch.report.html import render_html
    from gpubatch.report.words import pct
    from gpubatch.runtime.progress import _rate

    assert [pct(x) for x in (0.0, 0.0004, 0.004, 0.046, 0.25, 0.996, 0.99996, 1.0)] == \
        ["0%", "<0.1%", "0.4%", "4.6%", "25%", "99.6%", ">99.9%", "100%"]
    assert [_rate(x) for x in (0.4, 12.34, 1234.5)] == ["0.4", "12.3", "1,234"]
    summary = {"items_per_s": 99.6, "model_only_items_per_s": 100.0, "wall_s": 10.0, "items": 996}
    assert "the data path costs 0.4% of the model's speed" in gap(summary)["text"]
    assert _headline_tile(render_html({**summary, "batch_fill": 0.996}), "of model speed") == \
        "0.4% | of model speed lost to the data path"


def test_the_log_is_not_silent_while_one_long_shard_runs(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Without a terminal, progress lines came only when a shard finished: a run of one
    100k-tile slide (or one shard of a million windows) logged nothing for as long as it ran.
    The heartbeat now logs that the run is alive and how long since a shard finished, and
    says the finished shards' figures when some finished since the last line."""
    import logging

    from gpubatch.core.results import ShardResult
    from gpubatch.runtime import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    bar = progress.Progress(2, enabled=False)
    with caplog.at_level(logging.INFO, logger="gpubatch"):
        bar.heartbeat()
        assert "shards 0/2 done, 0 failed; still running: no shard finished in the last" in caplog.text
        caplog.clear()
        monkeypatch.setattr(progress, "LOG_EVERY_S", 3600.0)
        bar.update(ShardResult.from_dict({"shard_id": "a", "input": "a", "items": 5, "wall_s": 1.0}))
        assert caplog.text == ""  # inside LOG_EVERY_S of the last line
        monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
        bar.heartbeat()
        assert "shards 1/2 done, 0 failed, " in caplog.text and "items/s" in caplog.text


def test_the_report_of_a_stopped_run_names_the_job_as_its_spec_does(
        tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`report` of an interrupted output headed its summary "job: ..." (and report.json and
    report.html said "job"): the unfinished output's report did not read the spec record the
    run wrote at its start. It now names the job as the spec does."""
    import gpubatch

    out = tmp_path / "out"
    job = slide_job([str(slides_dir / "s0.tif"), str(slides_dir / "s1.tif")], mean_model, out, name="tumour-scan")
    _interrupt_after_first_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False)
    assert _report(out)["name"] == "tumour-scan" and _report(out)["complete"] is False
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "latest run: interrupted" in lines[0] and lines[1].startswith("tumour-scan: "), lines[:2]
