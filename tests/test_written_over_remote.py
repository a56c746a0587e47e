"""An object written over while its shard reads it: read again, never mixed (the local case is in
test_hostile's ``test_a_slide_written_over_while_read_is_read_again_not_mixed``).

Against a real S3 server (moto) through the fault proxy, through both range clients: obstore pins
every read to one ETag (If-Match, so the server refuses a read of the new version with 412);
fsspec cannot, so the worker asks the object's size and ETag again before the commit. Either way
the attempt fails saying so, the next attempt reads one version, and an input that keeps changing
is quarantined after run.retries, named.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import slide_job, write_job
from s3_fixtures import S3Stack

import gpubatch
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.stage_cache import StageCache

pytest_plugins = ["s3_fixtures"]
CLIENTS = ["obstore", "fsspec"]


def _two_versions(tmp_path: Path) -> tuple[Path, Path]:
    """Two uncompressed tiled slides of one layout (the same tile offsets): mixed tiles of the two
    would be a valid slide, so nothing in the reads themselves could tell."""
    import tifffile

    paths = (tmp_path / "old.tif", tmp_path / "new.tif")
    for seed, path in enumerate(paths, 1):
        pixels = np.random.default_rng(seed).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
        tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", resolution=(20000, 20000),
                         resolutionunit="CENTIMETER")
    return paths


def _job(tmp_path: Path, uris: list[str], model: Path, storage: dict[str, object],
         **inputs: object) -> tuple[Path, Path]:
    out = tmp_path / "out"
    job = slide_job(uris, model, out, tiles={"level": 0, "mpp": None})
    del job["tiles"]["mpp"]
    job["input"].update({"storage": storage, "access": "stream", **inputs})
    return write_job(tmp_path / "job.yaml", job), out


def _writing_over(monkeypatch: pytest.MonkeyPatch, write: Callable[[], None]) -> list[int]:
    """Each shard attempt's first block read first calls ``write`` (another writer, mid-shard)."""
    from gpubatch.sources.slides.source import SlideReader

    read_block = SlideReader._read_block
    seen: set[int] = set()
    writes: list[int] = []

    def written_over(self: SlideReader, members: np.ndarray) -> object:
        if id(self) not in seen:
            seen.add(id(self))
            writes.append(1)
            write()
        return read_block(self, members)

    monkeypatch.setattr(SlideReader, "_read_block", written_over)
    return writes


def _assert_a_clean_runs_predictions(got: gpubatch.Result, tmp_path: Path, version: Path, model: Path) -> None:
    """``got`` predicted what a clean run on ``version`` alone (a local file) predicts."""
    (tmp_path / "clean").mkdir()
    want = gpubatch.run(_job(tmp_path / "clean", [str(version)], model, {})[0])
    cols = ["x", "y", "probs_0", "probs_1", "probs_2"]
    pd.testing.assert_frame_equal(got.predictions()[cols].reset_index(drop=True),
                                  want.predictions()[cols].reset_index(drop=True))


def _failures(out: Path) -> pd.DataFrame:
    audit = pd.read_json(out / "audit.jsonl", lines=True)
    return audit[audit["event"] == "shard_failed"]


def _written_over_once(tmp_path: Path, store: Any, classifier: Path,
                       monkeypatch: pytest.MonkeyPatch) -> tuple[gpubatch.Result, Path, Path]:
    """One slide on ``store`` (an S3, GCS or Azure test stack) written over once, after its shard
    opened it and before its tiles, and the job run: (result, output folder, the new version).
    Tiles are read as needed, after the write (read ahead, obstore's pinned reads could all be
    of the old version before it: a shard wholly of the version it records, which is no change)."""
    old, new = _two_versions(tmp_path)
    key = f"over-{uuid.uuid4().hex[:8]}/slide.tif"
    uri = store.upload(old, key)
    writes = _writing_over(monkeypatch, lambda: store.upload(new, key) if len(writes) == 1 else None)
    job, out = _job(tmp_path, [uri], classifier, store.options(), read_ahead_mb=0)
    return gpubatch.run(job), out, new


def _assert_read_again(got: gpubatch.Result, out: Path) -> None:
    """The first attempt failed saying the input changed; the second was committed."""
    assert got.exit_code == 0, got.report["failed"]
    failed = _failures(out)
    assert failed["attempt"].tolist() == [1] and "changed while it was read" in failed["error"].iloc[0]
    assert [r["attempts"] for r in got.report["retried"]["listed"]] == [2]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_remote_slide_written_over_while_read_is_read_again_not_mixed(
        tmp_path: Path, s3: S3Stack, classifier: Path, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    """Overwritten once, after the shard opened it and before its tiles: the first attempt fails
    saying the input changed, the second reads the new version only, and its predictions are a
    clean run's on the new version; the report lists the shard as retried."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    got, out, new = _written_over_once(tmp_path, s3, classifier, monkeypatch)
    _assert_read_again(got, out)
    assert got.report["counters"][f"storage.client.{client}"] >= 1
    monkeypatch.undo()
    _assert_a_clean_runs_predictions(got, tmp_path, new, classifier)


def test_obstore_refuses_the_read_itself_with_if_match(
        tmp_path: Path, s3: S3Stack, classifier: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through obstore the server refuses the first read of the new version (412), mid-shard, not
    only the check at its end: the failed attempt says so."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    got, out, _ = _written_over_once(tmp_path, s3, classifier, monkeypatch)
    assert got.exit_code == 0
    assert "412 Precondition Failed" in _failures(out)["error"].iloc[0]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_remote_slide_that_keeps_changing_is_quarantined_named(
        tmp_path: Path, s3: S3Stack, classifier: Path, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    """Written over during every attempt: no loop, run.retries (1) more attempts, then the slide is
    quarantined with an error naming it and saying why."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    versions = _two_versions(tmp_path)
    key = f"churn-{uuid.uuid4().hex[:8]}/slide.tif"
    uri = s3.upload(versions[0], key)
    writes = _writing_over(monkeypatch, lambda: s3.upload(versions[len(writes) % 2], key))
    job, out = _job(tmp_path, [uri], classifier, s3.options(), read_ahead_mb=0)  # read after each write
    got = gpubatch.run(job)
    assert got.exit_code != 0 and len(writes) == 2
    assert _failures(out)["attempt"].tolist() == [1, 2]
    [failed] = got.report["failed"]
    assert failed["input"] == uri and "changed while it was read" in failed["error"]


@pytest.mark.parametrize("client", CLIENTS)
def test_a_staged_download_is_of_one_version(tmp_path: Path, s3: S3Stack, monkeypatch: pytest.MonkeyPatch,
                                             client: str) -> None:
    """Written over between the listing (whose size and ETag tag the copy) and the download: the
    download fails, retryable, instead of keeping the new bytes under the old version's tag."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    old, new = _two_versions(tmp_path)
    key = f"stage-{uuid.uuid4().hex[:8]}/slide.tif"
    uri = s3.upload(old, key)
    fetch = StageCache._fetch_file

    def written_over(self: StageCache, *args: object, **kwargs: object) -> None:
        s3.upload(new, key)
        fetch(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(StageCache, "_fetch_file", written_over)
    cache = StageCache(str(tmp_path / "stage"), max_bytes=1 << 30)
    with pytest.raises(InputError) as caught:
        cache.open(uri, s3.options(), StageClocks())
    assert caught.value.retryable and "changed while it was read" in caught.value.message
    monkeypatch.setattr(StageCache, "_fetch_file", fetch)
    with cache.open(uri, s3.options(), StageClocks()) as staged:  # the next try: the new version
        assert Path(staged.path).read_bytes() == new.read_bytes()


def test_a_copy_staged_ahead_of_a_write_is_told_apart_and_forgotten(
        tmp_path: Path, s3: S3Stack, classifier: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Staged ahead (as a worker stages its next shards' slides), then written over: the copy's
    version and the one a shard starting now records differ, the worker's check says so, and
    forgetting the input makes the next open download the new version."""
    from gpubatch.core.errors import InputChanged
    from gpubatch.engine.worker import unchanged_while_read
    from gpubatch.io.stage_cache import get_stage_cache
    from gpubatch.io.storage import input_identity
    from gpubatch.sources.base import Shard
    from gpubatch.sources.slides.source import SlideSource
    from gpubatch.spec import JobSpec

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    old, new = _two_versions(tmp_path)
    key = f"ahead-{uuid.uuid4().hex[:8]}/b.tif"
    uri = s3.upload(old, key)
    cache = get_stage_cache()
    cache.prefetch([uri], s3.options())
    with cache.open(uri, s3.options(), StageClocks()) as staged:  # waits for the prefetch
        s3.upload(new, key)
        with pytest.raises(InputChanged, match="changed after it was opened or staged ahead"):
            unchanged_while_read(uri, input_identity(uri, s3.options()), s3.options(), staged.etag)
    job = JobSpec.model_validate({"input": {"uris": [uri]}, "model": {"path": "m.onnx"}, "output": {"uri": "o"}})
    SlideSource().forget_input(job, Shard("b", uri, {}))
    with cache.open(uri, s3.options(), StageClocks()) as staged:
        assert Path(staged.path).read_bytes() == new.read_bytes()
        unchanged_while_read(uri, input_identity(uri, s3.options()), s3.options(), staged.etag)


def test_a_streamed_reader_pinned_before_a_write_is_told_apart(tmp_path: Path, s3: S3Stack,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A slide opened (its reader pinned) and then written over: the version its reads are of and
    the one a shard starting now records differ, and the worker's check says so."""
    from gpubatch.core.errors import InputChanged
    from gpubatch.engine.worker import unchanged_while_read
    from gpubatch.io.storage import input_identity
    from gpubatch.sources.slides.open import open_stream

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    old, new = _two_versions(tmp_path)
    key = f"pinned-{uuid.uuid4().hex[:8]}/b.tif"
    uri = s3.upload(old, key)
    backend = open_stream(uri, s3.options(), StageClocks())
    try:
        unchanged_while_read(uri, input_identity(uri, s3.options()), s3.options(), backend.input_version())
        s3.upload(new, key)
        with pytest.raises(InputChanged, match="changed after it was opened or staged ahead"):
            unchanged_while_read(uri, input_identity(uri, s3.options()), s3.options(), backend.input_version())
    finally:
        backend.close()


def test_a_plain_http_server_refuses_a_read_of_another_version_too(
        tmp_path: Path, classifier: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If-Match is no S3 speciality: a plain HTTP server that keeps RFC 9110 (tests' FileServer)
    answers a read naming the old ETag with 412 once the file is written over mid-shard; the
    attempt fails saying so, the next one reads the new version only, as a clean run would."""
    from http_servers import FileServer

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    old, new = _two_versions(tmp_path)
    server = FileServer({"/s/slide.tif": old.read_bytes()}, etag='"v1"')

    def write_over() -> None:
        server.files["/s/slide.tif"], server.etag = new.read_bytes(), '"v2"'

    try:
        writes = _writing_over(monkeypatch, lambda: write_over() if len(writes) == 1 else None)
        job, out = _job(tmp_path, [f"{server.url}/s/slide.tif"], classifier, {}, read_ahead_mb=0)
        got = gpubatch.run(job)
        assert got.exit_code == 0, got.report["failed"]
        assert "412" in _failures(out)["error"].iloc[0]
        sent = {m for method, _, m in server.requests if method == "GET"}
        assert {'"v1"', '"v2"'} <= sent, sent  # every read named the version its attempt began with
    finally:
        server.close()
    monkeypatch.undo()
    _assert_a_clean_runs_predictions(got, tmp_path, new, classifier)
