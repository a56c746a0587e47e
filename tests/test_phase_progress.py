"""The long steps outside the shards say what they do and how far they are (core.phases).

Each ran silent at scale: at 3,000 shards with the output on object storage a resume's checks
took 110 s and the run's end 100 s with no line between "N shard(s) already committed" (or the
last shard's line) and the summary; a VCF of a million variants planned for 10 s, a genome
FASTA ingested for a minute. Here the interval is made zero, so that every step's line appears
at a tiny scale; the tests read the lines, never the clock. At the default interval a small job
says nothing of them.
"""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import slide_job, write_job

import gpubatch
from gpubatch.cli.main import main
from gpubatch.core import phases
from gpubatch.core.phases import Phase, phase, shown_as
from gpubatch.runtime import progress
from gpubatch.runtime.progress import Progress

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]

#: "what: 2 of 3 parts (0 s)": a step's words, its count done and its total
COUNTED = re.compile(r"^(.*): ([\d,]+) of ([\d,]+) ([\w ]+) \(\d+ s\)$")


def _said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gpubatch"]


def _counts(lines: list[str], what: str) -> list[tuple[int, int, str]]:
    """(done, total, unit) of each counted line whose step starts with ``what``."""
    found = []
    for line in lines:
        m = COUNTED.match(line)
        if m and m[1].startswith(what):
            found.append((int(m[2].replace(",", "")), int(m[3].replace(",", "")), m[4]))
    return found


@pytest.fixture
def every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step's progress logged at once (the interval zero), as lines, not a bar."""
    monkeypatch.setattr(phases, "LOG_EVERY_S", 0.0)


def _slides_job(tmp_path: Path, slides_dir: Path, model: Path, uri: str, storage: dict | None = None) -> Path:
    job = slide_job([str(slides_dir / "*.tif")], model, tmp_path / "unused")
    job["output"] = {"uri": uri, "formats": ["zarr", "parquet", "geojson"], "storage": storage or {}}
    return write_job(tmp_path / "job.yaml", job)


def test_the_run_s_end_says_each_step_between_the_last_shard_and_the_summary(
        tmp_path: Path, slides_dir: Path, mean_model: Path, caplog: pytest.LogCaptureFixture,
        every_step: None) -> None:
    """Planning, then the run's end: the merge, heatmaps, GeoJSON and the audit counted to their
    totals (three slides), the report said, and the phase's end; after the last shard's line."""
    job = _slides_job(tmp_path, slides_dir, mean_model, str(tmp_path / "out"))
    with caplog.at_level(logging.INFO, logger="gpubatch"):
        result = gpubatch.run(job, show_progress=False)
    assert result.exit_code == 0
    lines = _said(caplog)
    assert (1, 1, "pattern") in _counts(lines, "planning: listing the inputs")
    for step, unit in (("merging the parts into predictions.parquet", "parts"),
                       ("drawing the heatmaps into heatmaps/", "slides"),
                       ("writing the slides' GeoJSON into geojson/", "slides"),
                       ("rebuilding audit.jsonl from the records", "commit records")):
        counts = _counts(lines, step)
        assert counts and counts[-1] == (3, 3, unit), (step, lines)
    assert any(line.startswith("writing report.json and report.html") for line in lines), lines
    last_shard = max(i for i, line in enumerate(lines) if line.startswith("shards 3/3 done"))
    merge = min(i for i, line in enumerate(lines) if line.startswith("merging the parts"))
    assert last_shard < merge < lines.index(next(x for x in lines if x.startswith("the run's end: done")))


def test_a_small_job_s_steps_say_nothing_at_the_default_interval(
        tmp_path: Path, slides_dir: Path, mean_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No line flood: steps of a second say nothing (the first line comes after LOG_EVERY_S)."""
    job = _slides_job(tmp_path, slides_dir, mean_model, str(tmp_path / "out"))
    with caplog.at_level(logging.INFO, logger="gpubatch"):
        assert gpubatch.run(job, show_progress=False).exit_code == 0
    assert phases.LOG_EVERY_S >= 10
    lines = _said(caplog)
    assert not [line for line in lines if ": done (" in line or COUNTED.match(line)], lines


def test_a_resume_on_object_storage_says_how_many_committed_parts_it_has_verified(
        tmp_path: Path, slides_dir: Path, mean_model: Path, s3: S3Stack, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume reads every committed part whole for its checksum: counted, of the records'
    number; ``validate --resume`` reads them too, and says so."""
    uri = f"s3://{s3.bucket}/phases/{uuid.uuid4().hex}"
    job = _slides_job(tmp_path, slides_dir, mean_model, uri, s3.options())
    assert gpubatch.run(job, show_progress=False).exit_code == 0
    monkeypatch.setattr(phases, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="gpubatch"):
        assert main(["validate", str(job), "--resume"]) == 0
        checked = _counts(_said(caplog), "validate: checking the committed parts")
        caplog.clear()
        assert gpubatch.run(job, resume=True, show_progress=False).exit_code == 0
    assert checked and checked[-1] == (3, 3, "parts")
    verified = _counts(_said(caplog), "verifying the committed shards' parts")
    assert verified and verified[-1] == (3, 3, "shards"), _said(caplog)


def test_report_of_an_unfinished_output_counts_the_records_it_reads(
        tmp_path: Path, slides_dir: Path, mean_model: Path, caplog: pytest.LogCaptureFixture,
        every_step: None, capsys: pytest.CaptureFixture[str]) -> None:
    """`gpubatch report` on an output without a finished run's report reads every commit record
    (18 s at 10,000 shards on local disk)."""
    out = tmp_path / "out"
    assert gpubatch.run(_slides_job(tmp_path, slides_dir, mean_model, str(out)), show_progress=False).exit_code == 0
    (out / "report.json").unlink()
    with caplog.at_level(logging.INFO, logger="gpubatch"):
        assert main(["report", str(out)]) == 0
    assert "no finished run" in capsys.readouterr().out
    assert _counts(_said(caplog), "reading the commit records")[-1] == (3, 3, "records")


def test_ingesting_a_genome_counts_the_fasta_s_bytes(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       every_step: None) -> None:
    """The FASTA's bytes read, of its size (gzip: the compressed size, read to its end)."""
    import gzip

    from gpubatch.cli.demo import write_synthetic_genome
    from gpubatch.sources.genome.ingest import ingest_genome

    fasta = write_synthetic_genome(tmp_path / "g.fa", {"chr1": 300_000, "chr2": 200_000}, seed=2)
    packed = tmp_path / "g.fa.gz"
    packed.write_bytes(gzip.compress(fasta.read_bytes()))
    with caplog.at_level(logging.INFO, logger="gpubatch"):
        ingest_genome(str(packed), str(tmp_path / "g.zarr"))
    lines = [line for line in _said(caplog) if line.startswith(f"ingesting {packed}")]
    size_mb = f"{packed.stat().st_size / 1e6:.1f}"
    assert lines[-2].startswith(f"ingesting {packed}: {size_mb} of {size_mb} MB"), lines
    assert lines[-1].startswith(f"ingesting {packed}: done"), lines


def test_planning_variants_counts_the_records_read_and_the_refs_checked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, every_step: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpubatch.cli.demo import write_synthetic_genome
    from gpubatch.sources.genome import variants
    from gpubatch.sources.genome.source import GenomeSource
    from gpubatch.spec import parse_job

    monkeypatch.setattr(variants, "SAID_EVERY", 2)
    fasta = write_synthetic_genome(tmp_path / "g.fa", {"chr1": 5_000}, seed=4)
    seq = "".join(fasta.read_text().splitlines()[1:])
    vcf = tmp_path / "v.vcf"
    positions = range(100, 1_100, 100)
    vcf.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n" + "".join(
        f"chr1\t{p}\trs{p}\t{seq[p - 1]}\t{'A' if seq[p - 1] != 'A' else 'G'}\t.\t.\t.\n" for p in positions))
    job = parse_job({"kind": "genome", "windows": {"reference": str(fasta), "variants": str(vcf), "length": 16},
                     "model": {"path": str(tmp_path / "m.onnx")}, "output": {"uri": str(tmp_path / "out")}})
    with caplog.at_level(logging.INFO, logger="gpubatch"):
        shards, failed = GenomeSource().plan(job)
    assert not failed and len(shards) > 0
    lines = _said(caplog)
    assert "planning: reading the variants of v.vcf: 10 records (0 s)" in lines, lines
    assert _counts(lines, "planning: checking each variant's REF")[-1] == (10, 10, "variants")
    assert any(line.startswith("planning: reading the variants of v.vcf: done") for line in lines)


def test_a_step_inside_a_phase_is_its_next_step_and_short_phases_say_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    """One voice for nested steps (the report of an interrupted run reads the records inside
    the phase that records it); nothing at all for a phase shorter than the interval."""
    with caplog.at_level(logging.INFO, logger="gpubatch"), shown_as(False):
        with phase("quiet", 3, "part") as quiet:
            for _ in range(3):
                quiet.advance()
        assert not _said(caplog)
        phases.LOG_EVERY_S, before = 0.0, phases.LOG_EVERY_S
        try:
            with phase("outer") as outer, phase("inner", 2, "record") as inner:
                assert inner is outer
                inner.advance(2)
        finally:
            phases.LOG_EVERY_S = before
    lines = _said(caplog)
    assert "inner: 2 of 2 records (0 s)" in lines and lines[-1].startswith("outer: done")


def test_on_a_terminal_a_phase_shows_a_bar_and_logs_no_line(caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phases, "BAR_AFTER_S", 0.0)
    with caplog.at_level(logging.INFO, logger="gpubatch"), shown_as(True):
        shown = Phase("merging", 4, "part")
        try:
            shown.advance(2)
            assert shown._bar is not None
            task = shown._bar.tasks[0]
            assert (task.completed, task.total, task.fields["words"]) == (2, 4, "2 of 4 parts")
        finally:
            shown.close()
    assert not _said(caplog)


def test_once_the_shards_are_over_the_heartbeat_logs_no_still_running_line(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's end logged "shards 3000/3000 done, 0 failed; still running: no shard finished in
    the last 78 s (running shards report their items every few seconds)" while it merged."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="gpubatch")
    shown = Progress(2, enabled=False, run_id="r")
    shown.heartbeat()
    assert any("still running" in line for line in _said(caplog))  # the shards' wait: said
    caplog.clear()
    shown.close()
    shown.heartbeat()
    assert not _said(caplog)


def test_counting_leaves_the_items_as_they_were() -> None:
    with phase("counting", 3) as said:
        assert list(said.counting(np.arange(3).tolist())) == [0, 1, 2]
        assert said.done == 3 and said.words() == "3 of 3 items"
