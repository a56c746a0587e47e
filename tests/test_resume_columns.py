"""A resume over committed parts written with other columns than this gpubatch writes (no version
string tells them apart: an earlier gpubatch's windows parts lacked the ``region`` column) is
refused before any shard is computed, by ``run --resume`` and ``validate --resume`` alike (exit
2, naming the output, the part, the column and the fix); the merge names such a part too, rather
than failing in pyarrow's cast after every shard was computed.

The older parts are made for real: a run's committed part rewritten without a column, and its
commit record's sha256 set to the new bytes, so that only the columns differ."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import audit_lines, cli, slide_job, synthetic_slides, write_job

import gpubatch
from gpubatch.core.errors import GpubatchError, SpecError
from gpubatch.core.results import ShardResult
from gpubatch.outputs.manifest import Manifest
from gpubatch.outputs.merge import merge_parquet
from gpubatch.outputs.store import OutputStore
from gpubatch.outputs.writer import ShardWriter
from gpubatch.runtime.preflight import validate_job


def _records(out: Path) -> list[Path]:
    return sorted((out / "_manifest").glob("*.json"))


def _drop_column(out: Path, record: Path, column: str) -> str:
    """Rewrite the record's committed part without ``column``, as an older gpubatch wrote it, and
    record the new bytes' sha256 (the part still verifies: only its columns differ); its name."""
    entry = json.loads(record.read_text())
    part = out / "_parts" / entry["part"]
    table = pq.read_table(part)
    assert column in table.column_names and table.num_rows > 0
    buf = io.BytesIO()
    pq.write_table(table.drop_columns([column]), buf)
    part.write_bytes(buf.getvalue())
    entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    record.write_text(json.dumps(entry))
    return str(entry["part"])


def _windows_job(tmp_path: Path) -> Path:
    """A windows job over a BED (two regions overlap, so `region` tells rows apart), 7 shards."""
    from gpubatch.cli.demo import write_synthetic_genome
    from gpubatch.cli.demo_models import make_genome_model

    fasta = write_synthetic_genome(tmp_path / "g.fa", {"chr1": 4000, "chr2": 3000}, seed=3)
    (tmp_path / "r.bed").write_text("chr1\t0\t2000\nchr1\t1000\t3000\nchr2\t0\t3000\n")
    job = {"name": "w", "kind": "genome",
           "windows": {"reference": str(fasta), "regions": str(tmp_path / "r.bed"), "length": 100,
                       "windows_per_shard": 10},
           "model": {"path": str(make_genome_model(tmp_path / "m.onnx", 100)), "backend": "onnxruntime",
                     "batch_size": 8},
           "output": {"uri": str(tmp_path / "out")}, "run": {"profile": "inline"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _files(out: Path) -> set[str]:
    return {p.name for p in (out / "_parts").iterdir()} | {p.name for p in (out / "_manifest").iterdir()}


def test_a_resume_over_windows_parts_without_the_region_column_is_refused_before_computing(
        tmp_path: Path) -> None:
    job = _windows_job(tmp_path)
    out = tmp_path / "out"
    assert gpubatch.run(job, show_progress=False).exit_code == 0
    records = _records(out)
    assert len(records) == 7
    old = _drop_column(out, records[0], "region")
    records[-1].unlink()  # a shard left to compute: the resume must not compute it
    before, commits = _files(out), len(audit_lines(out))
    for command in ("validate", "run"):
        proc = cli(command, str(job), "--resume")
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 2, log
        assert str(out) in log and f"_parts/{old}" in log and "lacks the column(s) region" in log, log
        assert "--overwrite" in log and "new output.uri" in log, log
    assert _files(out) == before and len(audit_lines(out)) == commits  # nothing computed, nothing removed
    assert (out / "report.json").exists()  # the refused run left the run before's report
    fresh = gpubatch.run(job, overwrite=True, show_progress=False)
    assert fresh.exit_code == 0 and fresh.predictions()["region"].notna().all()


def test_a_resume_over_a_slide_part_with_other_output_columns_is_refused(tmp_path: Path,
                                                                          classifier: Path) -> None:
    slides = synthetic_slides(tmp_path, 3, 300, "s")
    spec = slide_job([str(slides / "*.tif")], classifier, tmp_path / "out")
    spec["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    job = write_job(tmp_path / "job.yaml", spec)
    out = tmp_path / "out"
    first = gpubatch.run(job, show_progress=False)
    outputs = [c for c in first.predictions().columns if c.startswith("probs_")]
    assert first.exit_code == 0 and len(outputs) > 1
    records = _records(out)
    changed = _drop_column(out, records[0], outputs[-1])
    kept = {json.loads(r.read_text())["part"] for r in records[1:]}
    records[-1].unlink()
    commits = len(audit_lines(out))
    with pytest.raises(SpecError) as refused:
        validate_job(gpubatch.load_job(job), resume=True)
    with pytest.raises(SpecError) as resumed:
        gpubatch.run(job, resume=True, show_progress=False)
    for error in (refused.value, resumed.value):
        text = str(error)
        assert f"_parts/{changed}" in text and outputs[-1] in text, text
        assert any(f"_parts/{name}" in text for name in kept), text  # the part it differs from
        assert "--overwrite" in text and error.exit_code == 2
    assert len(audit_lines(out)) == commits


def test_the_merge_names_a_part_with_other_columns(tmp_path: Path) -> None:
    """Parts of one output whose columns differ (the run's own, where no resume checked them):
    a GpubatchError (exit 1) naming the part, the column and the fix, not pyarrow's cast error,
    and no predictions.parquet."""
    store = OutputStore(tmp_path / "out")
    committed = []
    for shard, outputs in (("a", {"score": np.ones((4, 2), np.float32)}),
                           ("b", {"score": np.ones((4, 2), np.float32), "extra": np.zeros(4, np.float32)})):
        writer = ShardWriter(store, shard, "x1", {"slide": shard}, {}, ["parquet"])
        writer.write({"x": np.arange(4), "y": np.arange(4), "level": np.zeros(4, np.int32)}, outputs)
        result = ShardResult(shard, shard, **writer.commit())
        Manifest(store).record(result)
        committed.append(result)
    with pytest.raises(GpubatchError) as error:
        merge_parquet(store, committed, ["slide", "x", "y", "level"])
    text = str(error.value)
    assert f"_parts/{committed[1].part} has extra besides against _parts/{committed[0].part}" in text, text
    assert "--overwrite" in text and error.value.exit_code == 1
    assert not (tmp_path / "out" / "predictions.parquet").exists()
