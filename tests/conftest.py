"""Shared fixtures: real files made with real tools (tifffile slides, torch-exported ONNX models)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

#: small third-party files vendored with their licences (tests/data/README.md)
TEST_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(autouse=True)
def _gpubatch_logger_as_found() -> Iterator[None]:
    """The CLI's main() gives the "gpubatch" logger a handler and stops its propagation; a test
    that calls main() in-process must not leave that behind for later tests' caplog."""
    import logging

    log = logging.getLogger("gpubatch")
    state = (list(log.handlers), log.propagate, log.level)
    yield
    log.handlers[:], log.propagate, log.level = state[0], state[1], state[2]


def shared_file(*parts: str) -> Path:
    """A vendored third-party test file (tests/data); a missing one is a broken checkout."""
    path = TEST_DATA.joinpath(*parts)
    assert path.exists(), f"{path} is missing: tests/data is part of the repository"
    return path


@pytest.fixture(autouse=True)
def _own_stage_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Each test stages into a directory of its own. The stage cache is the host's and keeps a
    valid copy for whoever asks next (another worker, a later run), so without this a test could
    be served an object another test staged, and count no download."""
    from gpubatch.io import stage_cache

    monkeypatch.setenv("GPUBATCH_STAGE_DIR", str(tmp_path_factory.mktemp("stage")))
    monkeypatch.setattr(stage_cache, "_cache", None)
    yield
    stage_cache.forget_stage_caches()


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("assets")


@pytest.fixture(scope="session")
def slide_path(assets: Path) -> Path:
    """A 2048x1536 pyramidal JPEG TIFF at 0.25 mpp, three levels, with tissue blobs."""
    from gpubatch.cli.demo import write_synthetic_slide

    return write_synthetic_slide(assets / "slide.tif", 2048, 1536, seed=1)


@pytest.fixture(scope="session")
def slides_dir(assets: Path) -> Path:
    from gpubatch.cli.demo import write_synthetic_slide

    d = assets / "slides"
    d.mkdir()
    for i in range(3):
        write_synthetic_slide(d / f"s{i}.tif", 1536, 1024, seed=10 + i)
    return d


@pytest.fixture(scope="session")
def classifier(assets: Path) -> Path:
    from gpubatch.cli.demo import make_classifier

    return make_classifier(assets / "classifier.onnx")


@pytest.fixture(scope="session")
def mean_model(assets: Path) -> Path:
    from gpubatch.cli.demo import make_mean_colour_model

    return make_mean_colour_model(assets / "mean.onnx")


def synthetic_slides(folder: Path, n: int, seed: int, prefix: str, size: tuple[int, int] = (768, 512)) -> Path:
    """``folder`` with ``n`` small two-level synthetic slides, PREFIX0.tif ..., seeded from ``seed``."""
    from gpubatch.cli.demo import write_synthetic_slide

    for i in range(n):
        write_synthetic_slide(folder / f"{prefix}{i}.tif", *size, seed=seed + i, levels=2)
    return folder


def slide_job(uris: list[str], model: Path, out: Path, **sections: Any) -> dict[str, Any]:
    """A slides job mapping; keyword sections (tiles=..., run=...) are merged in."""
    job: dict[str, Any] = {
        "name": "test", "kind": "slides", "input": {"uris": uris},
        "tiles": {"size": 64, "mpp": 0.5, "tissue": {"method": "none"}},
        "model": {"path": str(model), "backend": "onnxruntime", "batch_size": 16,
                  "input": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}},
        "output": {"uri": str(out)},
        "run": {"profile": "inline", "readers": 2, "prefetch_batches": 4, "retries": 1},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def windows_job(tmp_path: Path, shards: int) -> Path:
    """A genome job of ``shards`` one-window shards on the inline profile: a run of many tiny shards."""
    from gpubatch.cli.demo import write_synthetic_genome
    from gpubatch.cli.demo_models import make_genome_model

    fasta = write_synthetic_genome(tmp_path / "g.fa", {"chr1": shards * 32}, seed=3)
    model = make_genome_model(tmp_path / "m.onnx", 32)
    job = {"name": "many", "kind": "genome",
           "windows": {"reference": str(fasta), "regions": "genome", "length": 32, "windows_per_shard": 1},
           "model": {"path": str(model), "backend": "onnxruntime", "batch_size": 1},
           "output": {"uri": str(tmp_path / "out"), "formats": ["parquet"]}, "run": {"profile": "inline"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def by_slide_name(df: Any) -> Any:
    """Slide predictions keyed by the slide's file name and sorted: the same rows whichever folder
    or object store the slides were read from."""
    df = df.assign(slide=df["slide"].map(lambda s: Path(s).name))
    return df.sort_values(["slide", "x", "y"]).reset_index(drop=True)


@pytest.fixture(scope="session")
def local_reference(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path, mean_model: Path) -> Any:
    """The mean-colour job's predictions over ``slides_dir`` read from disk (:func:`by_slide_name`):
    what the same job over the same slides on object storage must give."""
    import gpubatch

    tmp = tmp_path_factory.mktemp("local")
    job = slide_job([str(slides_dir / "*.tif")], mean_model, tmp / "out")
    return by_slide_name(gpubatch.run(write_job(tmp / "job.yaml", job)).predictions())


def upload_slides(store: Any, slides_dir: Path) -> str:
    """The test slides under a fresh folder of ``store`` (an S3, GCS or Azure test stack); its URI."""
    import uuid

    folder = f"run-{uuid.uuid4().hex[:8]}"
    for path in sorted(slides_dir.glob("*.tif")):
        store.upload(path, f"{folder}/{path.name}")
    return str(store.uri(folder))


def audit_lines(out: Path, event: str | None = "shard_committed") -> list[dict[str, Any]]:
    """audit.jsonl's lines (of one ``event`` kind, by default one per committed shard)."""
    import json

    lines = [json.loads(line) for line in (Path(out) / "audit.jsonl").read_text().splitlines()]
    return [line for line in lines if event is None or line.get("event") == event]


def cli(*args: str, env: dict[str, str] | None = None, **kw: Any) -> Any:
    """``python -m gpubatch ARGS`` as a real process (stdout and stderr together, text). SIGINT
    is restored to its default in the child: a shell without job control may have started us
    with it ignored, and the child would inherit that."""
    import os
    import signal
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "gpubatch", *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached in {timeout} s")


def outcome_within(fn: Any, seconds: float, what: str) -> Any:
    """``fn()``'s value, or the exception it raised, run on a thread; fails the test if ``fn``
    is still waiting after ``seconds`` (a wait with no bound would hang the suite instead)."""
    import threading

    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{what} still waiting after {seconds:g} s"
    return outcome[0]


def committed_count(out: Path) -> int:
    """Commit records in a local output (what a kill test waits on)."""
    d = Path(out) / "_manifest"
    return len([p for p in d.glob("*.json") if not p.name.startswith(".tmp")]) if d.is_dir() else 0


#: expected DNA codes written out by hand, never the encoder under test: A C G T in either case, else N
DNA_CODES = {"A": 0, "C": 1, "G": 2, "T": 3, "a": 0, "c": 1, "g": 2, "t": 3}


def dna_codes(seq: str) -> Any:
    """The uint8 codes a genome window of ``seq`` must hold (A=0 C=1 G=2 T=3, anything else 4)."""
    import numpy as np

    return np.array([DNA_CODES.get(base, 4) for base in seq], dtype=np.uint8)


def gpu_missing() -> str | None:
    """Why the CuPy GPU tests cannot run here, naming what is missing; None when they can."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'gpubatch[gpu]')"
    try:
        import cupy

        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # noqa: BLE001 - no driver, broken install: say which
        return f"CuPy is installed but cannot reach a CUDA device ({type(exc).__name__}: {exc})"
    return None if count > 0 else "CuPy is installed but sees no CUDA device"
