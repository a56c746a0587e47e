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
