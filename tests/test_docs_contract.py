"""The documents say what the program does: every key a real run writes to report.json and
status.json is in docs/outputs.md, and every command, option and exit code of the CLI is in the
README or docs/ (as test_fresh_clone checks every spec key against docs/spec.md).

Keys are looked for as `key` in backticks, so a word of prose does not count as documenting one.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import pytest
from conftest import slide_job, write_job

import gpubatch.core.errors as errors
from gpubatch.cli.main import COMMANDS, _parser, main

REPO = Path(__file__).resolve().parents[1]
OUTPUTS_MD = REPO / "docs" / "outputs.md"


def _undocumented(keys: set[str], doc: str) -> list[str]:
    return sorted(k for k in keys if f"`{k}`" not in doc)


@pytest.fixture(scope="module")
def run_output(tmp_path_factory: pytest.TempPathFactory, slide_path: Path, mean_model: Path) -> Path:
    """A small real run (inline profile) of one synthetic slide and one that is no slide, so
    that ``failed`` has an entry: exit 3."""
    folder = tmp_path_factory.mktemp("docs-run")
    bad = folder / "not-a-slide.tif"
    bad.write_bytes(b"II*\0" + b"not a tiff" * 10)
    job = slide_job([str(slide_path), str(bad)], mean_model, folder / "out")
    assert main(["run", str(write_job(folder / "job.yaml", job))]) == errors.EXIT_PARTIAL
    return folder / "out"


def test_every_report_key_a_run_writes_is_documented(run_output: Path) -> None:
    report = json.loads((run_output / "report.json").read_text())
    assert {"storage", "stages", "verdict"} <= set(report) and report["storage"]["by_kind"]
    keys = set(report) | set(report["storage"]) | set(report["storage"]["by_kind"]) | set(report["verdict"])
    for name, clocks in report["stages"].items():
        keys |= {name, *clocks}
    missing = _undocumented(keys, OUTPUTS_MD.read_text())
    assert not missing, f"not in docs/outputs.md: {missing}"


def test_every_status_key_is_documented(run_output: Path, tmp_path: Path) -> None:
    """A finished run's status.json, and the keys only a waiting or stopped run writes, made by
    the real progress writer: worker jobs pending for a reason only a person clears, then a stop."""
    from gpubatch.outputs.store import OutputStore
    from gpubatch.runtime.progress import Progress
    from gpubatch.runtime.waiting import Queued

    keys = set(json.loads((run_output / "status.json").read_text()))
    progress = Progress(2, store=OutputStore(str(tmp_path)), enabled=False, run_id="r1")
    progress.queued(Queued(2, ("JobHeldUser",), clears=False, action="scontrol release 7,8"), time.time() - 90)
    while_waiting = json.loads((tmp_path / "status.json").read_text())
    waiting = while_waiting["waiting"]
    assert waiting["action"] == "scontrol release 7,8"
    progress.finish("interrupted", reason="interrupted: the terminal closed (SIGHUP)")
    stopped = json.loads((tmp_path / "status.json").read_text())
    keys |= set(while_waiting) | set(waiting) | set(stopped)
    assert {"waiting", "reason", "action", "jobs"} <= keys
    missing = _undocumented(keys, OUTPUTS_MD.read_text())
    assert not missing, f"not in docs/outputs.md: {missing}"


def _documents() -> str:
    return (REPO / "README.md").read_text() + "".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))


def test_every_command_and_option_is_documented() -> None:
    """Each command as `gpubatch NAME ...` and each of its long options (`--resume`) in the README or docs."""
    docs = _documents()
    assert set(COMMANDS) >= {"demo", "validate", "run", "submit", "status", "report", "tune", "ingest", "inspect"}
    assert [c for c in COMMANDS if f"`gpubatch {c}" not in docs] == []
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, parser in sub.choices.items():
        table_row = next((line for line in docs.splitlines() if line.startswith(f"| `gpubatch {name}")), "")
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        missing += [f"{name} {o}" for o in sorted(options) if o not in table_row]
    top = {o for a in _parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    missing += [o for o in sorted(top) if f"`{o}`" not in docs and f"`gpubatch {o}" not in docs]
    assert not missing, f"not in README.md or docs/: {missing}"


def _exit_codes() -> dict[str, int]:
    """The EXIT_* constants the CLI returns: those gpubatch/cli names, and the ones its errors
    and results carry (core.errors holds them all)."""
    named = set(re.findall(r"\bEXIT_[A-Z]+\b", "".join(p.read_text() for p in (REPO / "gpubatch" / "cli").glob("*.py"))))
    codes = {n: v for n, v in vars(errors).items() if n.startswith("EXIT_") and isinstance(v, int)}
    assert named <= set(codes) and {"EXIT_OK", "EXIT_USAGE", "EXIT_ERROR"} <= named
    return codes


def test_every_exit_code_is_documented() -> None:
    """Each code in docs/spec.md's table (`| 3 |`) and in the README's "Exit codes:" line."""
    codes = _exit_codes()
    assert sorted(codes.values()) == [0, 1, 2, 3]
    table = (REPO / "docs" / "spec.md").read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    assert [c for c in codes.values() if f"\n| {c} |" not in table] == []
    readme = (REPO / "README.md").read_text()
    line = readme[readme.index("Exit codes:"):].split("\n\n", 1)[0]
    assert [c for c in codes.values() if not re.search(rf"(:|;) {c} \w", line)] == []



def test_section_references_name_headings_that_exist() -> None:
    """`docs/spec.md, "Track outputs"` in the README or docs names a heading of that file."""
    refs = set(re.findall(r'(docs/[\w-]+\.md), "([^"]+)"', _documents()))
    assert ("docs/spec.md", "Cluster profiles") in refs
    missing = [f'{path}, "{title}"' for path, title in sorted(refs)
               if not re.search(rf"^#+ {re.escape(title)}$", (REPO / path).read_text(), re.MULTILINE)]
    assert not missing, f"no such heading: {missing}"


def _documented_columns(file: str) -> dict[str, list[tuple[str, str]]]:
    """kind -> [(column, type)], in order, from docs/outputs.md's "Columns and their types" rows
    for ``file``; a row naming no column in backticks (``model outputs``) is kept by its words."""
    table = OUTPUTS_MD.read_text().split("## Columns and their types", 1)[1].split("\n## ", 1)[0]
    columns: dict[str, list[tuple[str, str]]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] == file:
            names = re.findall(r"`([^`]+)`", cells[2]) or [cells[2]]
            columns.setdefault(cells[1], []).extend((name, cells[3]) for name in names)
    return columns


def _index_columns(kind: str) -> list[tuple[str, str]]:
    return [(name, kind_) for name, kind_ in _documented_columns("predictions.parquet")[kind] if name != "model outputs"]


def test_the_documented_index_columns_are_the_ones_an_empty_run_writes() -> None:
    """Each kind's documented index columns, in order and type, are its source's index columns
    as a run with no rows types them (merge.empty_index_table; SourceTests checks the readers'
    rows against the same)."""
    from gpubatch.outputs.merge import empty_index_table
    from gpubatch.sources import get_source
    from gpubatch.spec import JobSpec

    windows = {"reference": "g.fa", "length": 100}
    jobs = {"slides": {"kind": "slides", "input": {"uris": ["s.svs"]}},
            "windows": {"kind": "genome", "windows": windows},
            "variants": {"kind": "genome", "windows": {**windows, "variants": "v.vcf"}}}
    for kind, fields in jobs.items():
        job = JobSpec.model_validate({"model": {"path": "m.onnx"}, "output": {"uri": "out"}, **fields})
        schema = empty_index_table(get_source(job.kind).index_schema(job)).schema
        assert _index_columns(kind) == [(f.name, str(f.type)) for f in schema], kind


@pytest.fixture(scope="module")
def genome_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A windows run and a variant run (one variant with an ID, one without) of a small genome model."""
    from gpubatch.cli.demo import write_synthetic_genome
    from gpubatch.cli.demo_models import make_genome_model

    folder = tmp_path_factory.mktemp("docs-genome")
    fasta = write_synthetic_genome(folder / "g.fa", {"chr1": 2000}, seed=3)
    (folder / "v.vcf").write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                                  "chr1\t100\t.\tN\tT\t.\t.\t.\nchr1\t300\trs1\tN\tG\t.\t.\t.\n")
    model = make_genome_model(folder / "m.onnx", 100)
    outs = {}
    for kind, extra in {"windows": {"windows_per_shard": 5}, "variants": {"variants": str(folder / "v.vcf"),
                                                                          "max_ref_mismatch": 1.0}}.items():
        job = {"name": kind, "kind": "genome", "windows": {"reference": str(fasta), "length": 100, **extra},
               "model": {"path": str(model), "backend": "onnxruntime", "batch_size": 4},
               "output": {"uri": str(folder / kind)}, "run": {"profile": "inline"}}
        assert main(["run", str(write_job(folder / f"{kind}.yaml", job))]) == errors.EXIT_OK
        outs[kind] = folder / kind
    return outs


def test_real_predictions_have_the_documented_columns_and_types(run_output: Path,
                                                                genome_outputs: dict[str, Path]) -> None:
    """The documented index columns begin each kind's predictions.parquet; the model's (float32
    models here) follow, as the outputs' row says."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert dict(_documented_columns("predictions.parquet")["all"]) == {"model outputs": "the model's"}
    assert "float (float32) from a float32 model" in OUTPUTS_MD.read_text()
    for kind, out in {"slides": run_output, **genome_outputs}.items():
        schema = pq.read_schema(out / "predictions.parquet")
        index = _index_columns(kind)
        assert [(f.name, str(f.type)) for f in schema][:len(index)] == index, kind
        outputs = list(schema)[len(index):]
        assert outputs and all(f.type == pa.float32() for f in outputs), (kind, outputs)


def test_slide_predictions_have_the_documented_columns_and_types(tmp_path: Path, slide_path: Path,
                                                                 classifier: Path) -> None:
    """A slide head over the classifier's probabilities, on a slide with tissue and one without."""
    import numpy as np
    import pyarrow.parquet as pq

    from gpubatch.cli.demo import write_synthetic_slide
    from gpubatch.cli.pathology_models import make_abmil

    blank = write_synthetic_slide(tmp_path / "blank.tif", 512, 512, levels=1, image=np.full((512, 512, 3), 240, np.uint8))
    job = slide_job([str(slide_path), str(blank)], classifier, tmp_path / "out",
                    tiles={"tissue": {"method": "otsu", "min_fraction": 0.5}},
                    slide_model={"path": str(make_abmil(tmp_path / "head.onnx", dim=3, hidden=4, classes=2))})
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == errors.EXIT_OK
    table = pq.read_table(tmp_path / "out" / "slide_predictions.parquet")
    documented = _documented_columns("slide_predictions.parquet")["slides"]
    head = [(f"logits_{i}", dict(documented)["head outputs"]) for i in range(2)]
    assert [(f.name, str(f.type)) for f in table.schema] == documented[:2] + head
    assert table.column("logits_0").to_pylist()[1] is None  # the blank slide
