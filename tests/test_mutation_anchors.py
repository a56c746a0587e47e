"""The mutation runner's anchors still match the code, checked in the ordinary suite.

``tests/mutations.py`` runs after the suite in CI and refuses to start when an anchor no longer
matches; a refactor that moves an anchored line then fails CI only at its very end. This check
fails in the suite itself, naming the mutation and the file, and so does each test the runner
would ask for when it no longer exists.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _runner():
    spec = importlib.util.spec_from_file_location("gpubatch_mutations", ROOT / "tests" / "mutations.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_mutation_anchor_is_found_exactly_once() -> None:
    runner = _runner()
    assert runner.check_anchors(ROOT, tuple(runner.MUTATIONS)) == []


def test_every_catching_test_exists() -> None:
    runner = _runner()
    missing = []
    for m in runner.MUTATIONS:
        for test in m.tests:
            file, _, name = test.partition("::")  # a whole file, or one test in it
            path = ROOT / file
            if not path.is_file() or (name and f"def {name.split('[')[0]}(" not in path.read_text()):
                missing.append(f"{m.name}: {test}")
    assert missing == []
