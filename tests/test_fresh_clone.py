"""A fresh clone runs everything: the example jobs validate, references point to files that
exist, every spec key is documented, and a script without the ``__main__`` guard is told so."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from gpubatch.cli.main import main
from gpubatch.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]


def test_every_example_job_validates_after_the_demo_prepares(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """jobs/*.yaml name ../demo-work/... (the demo's models and slides) and ../tests/data/...:
    the same layout is built in a temporary folder, so the repository is left untouched."""
    from gpubatch.cli.demo import prepare_demo, prepare_genome_demo

    root = tmp_path / "clone"
    shutil.copytree(REPO / "jobs", root / "jobs")
    shutil.copytree(REPO / "tests" / "data", root / "tests" / "data")
    prepare_demo(root / "demo-work", n_slides=1, size=(1024, 768))  # small: the layout is the point
    prepare_genome_demo(root / "demo-work")
    jobs = sorted((root / "jobs").glob("*.yaml"))
    assert {p.name for p in jobs} >= {"wsi-classify.yaml", "cmu1-svs.yaml", "genome-windows.yaml",
                                      "variant-effect.yaml"}
    for job in jobs:
        assert main(["validate", str(job)]) == 0, capsys.readouterr().err
        assert ": valid (" in capsys.readouterr().out


def _references() -> set[str]:
    """Repository files named in messages, docstrings, the README and docs (``*.md``, ``.ci/``)."""
    texts = [p.read_text() for p in (REPO / "gpubatch").rglob("*.py")]
    texts += [(REPO / "README.md").read_text(), *(p.read_text() for p in (REPO / "docs").glob("*.md"))]
    found: set[str] = set()
    for text in texts:
        found |= set(re.findall(r"(?<![\w/.])((?:[\w-]+/)*[\w.-]+\.md)\b", text))
        found |= set(re.findall(r"`(\.ci/[\w.-]+)", text))
    return found


def test_messages_and_docs_point_to_files_that_exist() -> None:
    refs = _references()
    assert "docs/spec.md" in refs and "DESIGN.md" not in refs
    missing = [r for r in refs if not (REPO / r).exists()]
    assert missing == []


def _spec_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        types = [field.annotation, *typing.get_args(field.annotation)]
        sub = next((t for t in types if isinstance(t, type) and issubclass(t, BaseModel)), None)
        keys += _spec_keys(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return keys


def test_every_spec_key_is_documented() -> None:
    doc = (REPO / "docs" / "spec.md").read_text()
    keys = _spec_keys(JobSpec)
    assert "windows.max_ref_mismatch" in keys and "tiles.mpp_fallback" in keys
    assert [k for k in keys if f"`{k}`" not in doc] == []
    from gpubatch.runtime.cluster import PROFILE_KEYS

    assert [k for k in sorted(PROFILE_KEYS) if f"`{k}`" not in doc] == []


def _script(tmp_path: Path, slide: Path, model: Path, guarded: bool) -> Path:
    job = {"name": "g", "input": {"uris": [str(slide)]}, "tiles": {"size": 64, "tissue": {"method": "none"}},
           "model": {"path": str(model), "batch_size": 8, "input": {"mean": [0, 0, 0], "std": [1, 1, 1]}},
           "output": {"uri": str(tmp_path / ("out-guarded" if guarded else "out"))},
           "run": {"profile": "local", "workers": 1}}
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job))
    call = f"result = gpubatch.run({str(spec)!r}, show_progress=False)\nprint('exit code', result.exit_code)\n"
    body = f"import gpubatch\n\nif __name__ == '__main__':\n{textwrap.indent(call, '    ')}" if guarded \
        else f"import gpubatch\n{call}"
    path = tmp_path / ("guarded.py" if guarded else "unguarded.py")
    path.write_text(body)
    return path


def test_a_script_without_the_main_guard_is_told_what_to_do(tmp_path: Path, slide_path: Path,
                                                            mean_model: Path) -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    bad = subprocess.run([sys.executable, str(_script(tmp_path, slide_path, mean_model, False))],
                         capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert bad.returncode != 0
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("gpubatch.core.errors.GpubatchError: worker processes could not start:")
    assert "unguarded.py calls gpubatch at its top level" in last
    assert 'Put the call under `if __name__ == "__main__":`' in last
    assert "Port 8787" not in bad.stderr
    good = subprocess.run([sys.executable, str(_script(tmp_path, slide_path, mean_model, True))],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip().endswith("exit code 0")
