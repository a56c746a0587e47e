"""A model on object storage (a real S3 server, moto, behind the counting proxy): fetched once
per run and host, its version asked once by the client and handed to the workers (no HEAD per
shard), and never a stale copy: an object written over between runs is fetched anew, and one
written over mid-run fails a fetch of the version the run checked instead of being kept as it."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import audit_lines, slide_job, synthetic_slides, write_job

import gpubatch
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputChanged
from gpubatch.io.localized import cached_copy, localize, remote_version, versions_asked_once

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_slides(tmp_path_factory.mktemp("remote-model"), 3, 700, "m")


@pytest.fixture(scope="module")
def other_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classifier's architecture with other weights: what a model written over holds."""
    from gpubatch.cli.demo import make_classifier

    return make_classifier(tmp_path_factory.mktemp("other-model") / "classifier.onnx", seed=1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _key(s3: S3Stack, uri: str) -> str:
    return uri.removeprefix("s3://")


def test_a_remote_model_is_asked_once_per_run_and_fetched_anew_when_written_over(
        tmp_path: Path, slides: Path, classifier: Path, other_classifier: Path, s3: S3Stack,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """model.path on S3, three shards on worker processes: the client's checks (validate's in
    the run, the spec record, the preparation) shared one HEAD and the workers none (3 HEADs on
    the client and one per shard before); the one GET is the client's, the workers loading its
    copy (in the client's cache, RunContext.cache_dir: workers forked from a forkserver that an
    earlier test started looked in that test's cache, and fetched the model again). Written over between runs, the next run's HEAD sees it and its workers load the new one."""
    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))  # the workers' too (cache_dir)
    uri = s3.upload(classifier, f"models/{uuid.uuid4().hex}/classifier.onnx")
    job = slide_job([str(slides / "*.tif")], classifier, tmp_path / "out1",
                    run={"profile": "local", "workers": 2, "readers": 1, "prefetch_batches": 1})
    job["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    job["model"].update(path=uri, batch_size=8)
    job["input"]["storage"] = s3.options()
    first = gpubatch.run(write_job(tmp_path / "one.yaml", job))
    assert first.exit_code == 0, first.report.get("failed")
    key = _key(s3, uri)
    assert (s3.proxy.heads.get(key), s3.proxy.gets.get(key)) == (1, 1), (s3.proxy.heads, s3.proxy.gets)
    shards = audit_lines(tmp_path / "out1")
    assert len(shards) == 3 and {s["model_sha256"] for s in shards} == {_sha(classifier)}

    s3.fs().put_file(str(other_classifier), key)  # written over between runs
    job["output"]["uri"] = str(tmp_path / "out2")
    second = gpubatch.run(write_job(tmp_path / "two.yaml", job))
    assert second.exit_code == 0, second.report.get("failed")
    assert (s3.proxy.heads.get(key), s3.proxy.gets.get(key)) == (2, 2), (s3.proxy.heads, s3.proxy.gets)
    assert {s["model_sha256"] for s in audit_lines(tmp_path / "out2")} == {_sha(other_classifier)}
    assert second.report["model_sha256"] == _sha(other_classifier)
    ordered = [r.predictions().sort_values(["slide", "x", "y"]).reset_index(drop=True) for r in (first, second)]
    assert not ordered[0].equals(ordered[1])  # the new weights' predictions


@pytest.mark.parametrize(("client", "heads"), [("obstore", 1), ("fsspec", 2)])
def test_a_worker_handed_the_version_loads_its_copy_without_a_request(
        tmp_path: Path, classifier: Path, s3: S3Stack, client: str, heads: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's fetch: one HEAD (its version), one GET counted in the storage metrics, and
    for fsspec, whose GET cannot be pinned, one HEAD after it. A worker handed that version finds
    the copy with no request at all (it asked a HEAD per shard)."""
    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    uri = s3.upload(classifier, f"models/{uuid.uuid4().hex}/m.onnx")
    clocks = StageClocks()
    with versions_asked_once():
        version = remote_version(uri, s3.options())
        path = localize(uri, s3.options(), clocks=clocks)
        assert localize(uri, s3.options()) == path  # the block's other checks: the same answer
    assert clocks.counters["storage.requests"] == 1 and clocks.counters["storage.bytes"] == classifier.stat().st_size
    key = _key(s3, uri)
    assert (s3.proxy.heads.get(key), s3.proxy.gets.get(key)) == (heads, 1), (s3.proxy.heads, s3.proxy.gets)
    worker = StageClocks()
    for _ in range(3):  # three shards on a worker of this host
        assert localize(uri, s3.options(), version, worker) == path
    assert not worker.counters.get("storage.requests")
    assert (s3.proxy.heads.get(key), s3.proxy.gets.get(key)) == (heads, 1)
    assert Path(path).read_bytes() == classifier.read_bytes()


@pytest.mark.parametrize("client", ["obstore", "fsspec"])
def test_a_model_written_over_mid_run_is_not_kept_as_the_version_the_run_checked(
        tmp_path: Path, classifier: Path, other_classifier: Path, s3: S3Stack, client: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker on a host without the copy fetches the version it was handed: the object written
    over since fails the fetch (InputChanged: retried, then reported) rather than its new bytes
    being kept, and loaded, under the checked version's name; a later run's version is fetched."""
    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    uri = s3.upload(classifier, f"models/{uuid.uuid4().hex}/m.onnx")
    checked = remote_version(uri, s3.options())
    s3.fs().put_file(str(other_classifier), _key(s3, uri))
    with pytest.raises(InputChanged, match="changed while it was read"):
        localize(uri, s3.options(), checked)
    assert not cached_copy(uri, checked).exists()
    now = localize(uri, s3.options())
    assert Path(now).read_bytes() == other_classifier.read_bytes()


@pytest.fixture(scope="module")
def bag_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ViT over 32-pixel tiles and two gated-ABMIL heads over its 16-wide features."""
    from gpubatch.cli.pathology_models import make_abmil, make_vit

    root = tmp_path_factory.mktemp("bag-models")
    return {"vit": make_vit(root / "vit.onnx", img=32, patch=16, dim=16, depth=1, heads=2, seed=1),
            "head": make_abmil(root / "head.onnx", dim=16, hidden=8, classes=2, seed=2),
            "other": make_abmil(root / "other.onnx", dim=16, hidden=8, classes=2, seed=3)}


def test_a_remote_slide_model_is_asked_once_per_run(
        tmp_path: Path, slides: Path, bag_models: dict[str, Path], s3: S3Stack,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """slide_model.path on S3, three shards on two worker processes: one HEAD for the run (the
    client's; each shard asked one more before) and one GET, the workers loading the client's
    copy of that version (in the client's cache: RunContext.cache_dir)."""
    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))
    uri = s3.upload(bag_models["head"], f"models/{uuid.uuid4().hex}/head.onnx")
    job = slide_job([str(slides / "*.tif")], bag_models["vit"], tmp_path / "out",
                    run={"profile": "local", "workers": 2, "readers": 1, "prefetch_batches": 1},
                    slide_model={"path": uri})
    job["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    job["model"]["batch_size"] = 8
    job["input"]["storage"] = s3.options()
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.report.get("failed")
    key = _key(s3, uri)
    assert (s3.proxy.heads.get(key), s3.proxy.gets.get(key)) == (1, 1), (s3.proxy.heads, s3.proxy.gets)
    assert len(result.slide_predictions()) == 3


def test_a_slide_model_written_over_mid_run_is_refused_by_a_worker_handed_its_version(
        tmp_path: Path, bag_models: dict[str, Path], s3: S3Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker without the copy fetches the head's version the client asked: the object written
    over since fails the fetch (InputChanged, the shard retried then quarantined) instead of the
    new head running over the run's bags under the checked version's name."""
    from gpubatch.engine.slide_head import SlideHead

    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))
    uri = s3.upload(bag_models["head"], f"models/{uuid.uuid4().hex}/head.onnx")
    job = slide_job(["unused.tif"], bag_models["vit"], tmp_path / "out", slide_model={"path": uri})
    job["input"]["storage"] = s3.options()
    spec = gpubatch.load_job(write_job(tmp_path / "job.yaml", job))
    checked = remote_version(uri, s3.options())
    s3.fs().put_file(str(bag_models["other"]), _key(s3, uri))
    with pytest.raises(InputChanged, match="changed while it was read"):
        SlideHead.for_job(spec, 1, checked)
    assert not cached_copy(uri, checked).exists()


def test_validate_refuses_a_remote_slide_model_that_is_not_there(
        tmp_path: Path, slides: Path, bag_models: dict[str, Path], s3: S3Stack) -> None:
    """A head on object storage whose widths are not checked (a torch file) was never asked for:
    validate passed and every slide of the run was quarantined on a missing file."""
    from gpubatch.core.errors import SpecError
    from gpubatch.runtime.preflight import validate_job

    uri = s3.uri(f"models/{uuid.uuid4().hex}/head.pt")
    job = slide_job([str(slides / "*.tif")], bag_models["vit"], tmp_path / "out",
                    slide_model={"path": uri, "backend": "torch"})
    job["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    job["input"]["storage"] = s3.options()
    spec = gpubatch.load_job(write_job(tmp_path / "job.yaml", job))
    with pytest.raises(SpecError, match="slide_model.path.*cannot be fetched"):
        validate_job(spec, open_inputs=False)


def test_a_resume_refuses_a_remote_slide_model_written_over_since(
        tmp_path: Path, slides: Path, bag_models: dict[str, Path], s3: S3Stack,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's outputs are committed with each slide; a remote head's URI stood for its
    sha256 in the result fields, so a head written over between a run and its --resume kept the
    old head's outputs beside the new one's (exit 0). Now its copy's sha256 is compared."""
    from gpubatch.core.errors import SpecError

    monkeypatch.setenv("GPUBATCH_CACHE", str(tmp_path / "cache"))
    uri = s3.upload(bag_models["head"], f"models/{uuid.uuid4().hex}/head.onnx")
    job = slide_job([str(slides / "m0.tif")], bag_models["vit"], tmp_path / "out", slide_model={"path": uri})
    job["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    job["input"]["storage"] = s3.options()
    path = write_job(tmp_path / "job.yaml", job)
    assert gpubatch.run(path).exit_code == 0
    s3.fs().put_file(str(bag_models["other"]), _key(s3, uri))
    with pytest.raises(SpecError, match="slide_model.sha256"):
        gpubatch.run(path, resume=True)
