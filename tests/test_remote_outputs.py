"""Results on object storage: every output lands on S3 (a real S3 server, moto, on loopback), is
read back by status, report, open_results and Result.predictions, survives a killed client and a
--resume at several instants, and holds no credentials."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest
from conftest import cli, slide_job, synthetic_slides, wait_for, write_job

import gpubatch
from gpubatch.core.errors import OutputsNotWrittenError

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]
N_SLIDES = 5


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_slides(tmp_path_factory.mktemp("remote-out"), N_SLIDES, 500, "r")


def _job(tmp_path: Path, slides: Path, model: Path, uri: str, storage: dict | None = None, **run: object) -> Path:
    job = slide_job([str(slides / "*.tif")], model, tmp_path / "unused",
                    run={"readers": 1, "prefetch_batches": 1, "heartbeat_s": 0.3, **run})
    job["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    job["model"]["batch_size"] = 4
    job["output"] = {"uri": uri, "formats": ["zarr", "parquet", "geojson"], "storage": storage or {}}
    return write_job(tmp_path / "job.yaml", job)


def _env(s3: S3Stack) -> dict[str, str]:
    """Credentials the standard way: the AWS_* environment, endpoint included."""
    return {"AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret,
            "AWS_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["slide", "x", "y"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, slides: Path, classifier: Path) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("clean-local")
    return _sorted(gpubatch.run(_job(tmp, slides, classifier, str(tmp / "out"))).predictions())


def test_every_output_lands_on_s3_and_reads_back(tmp_path: Path, slides: Path, classifier: Path, s3: S3Stack,
                                                 clean: pd.DataFrame, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"s3://{s3.bucket}/runs/{uuid.uuid4().hex}"
    # the output path retries like the input path: reads, and writes (an upload's parts too)
    s3.proxy.configure(error_rate=0.05, write_error_rate=0.15, seed=11)
    result = gpubatch.run(_job(tmp_path, slides, classifier, uri, s3.options()), profile="inline")
    assert result.exit_code == 0 and result.output_uri == uri
    assert not list(tmp_path.glob("s3*"))  # no local folder named after the URI
    pd.testing.assert_frame_equal(_sorted(result.predictions()), clean)
    fs = s3.fs()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(uri.removeprefix("s3://"))}
    assert {"predictions.parquet", "predictions.zarr", "geojson", "heatmaps", "report.json", "report.html",
            "audit.jsonl", "status.json", "_manifest", "_parts", ".gpubatch-output"} <= names
    for folder in ("geojson", "heatmaps"):  # one file per slide, named by its key
        assert len(fs.ls(f"{uri.removeprefix('s3://')}/{folder}")) == N_SLIDES
    again = gpubatch.open_results(uri, s3.options())
    pd.testing.assert_frame_equal(_sorted(again.predictions()), clean)
    assert again.report["items"] == len(clean)
    root = json.loads(fs.cat(f"{uri.removeprefix('s3://')}/predictions.zarr/zarr.json"))["attributes"]
    assert len(root["groups"]) == N_SLIDES
    for path in fs.find(uri.removeprefix("s3://")):
        blob = fs.cat(path)
        assert s3.secret.encode() not in blob and s3.key.encode() not in blob, path


def test_a_streamed_upload_survives_503s_on_its_parts(s3: S3Stack) -> None:
    """A file written as a stream (a parquet part, predictions.parquet) uploads its parts as its
    buffer fills; one answered 503 cannot be sent again by gpubatch's retries (it has left the
    stream), so the client's own must: with them off, one upload in two failed here."""
    from gpubatch.outputs.store import OutputStore

    payload = os.urandom(12 << 20)  # three parts of a multipart upload at 5 MiB blocks
    for seed in range(5):
        store = OutputStore(f"s3://{s3.bucket}/uploads/{uuid.uuid4().hex}",
                            {**s3.options(), "default_block_size": 5 << 20})
        s3.proxy.configure(write_error_rate=0.3, seed=seed)
        with store.open_write("big.bin") as f:
            f.write(payload)
        s3.proxy.reset()
        assert store.read_bytes("big.bin") == payload


def test_the_output_store_s_retries_are_counted_for_the_report(s3: S3Stack) -> None:
    """Commit records, status.json, report files: written without a shard's clocks, their retries
    are counted per process and claimed by the next shard or the report, one per 503 (the writes
    are sequential and the proxy's faults seeded: the same writes fail every run)."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.io.retry_counts import count_claimed_retries
    from gpubatch.outputs.store import OutputStore

    store = OutputStore(f"s3://{s3.bucket}/counted/{uuid.uuid4().hex}", s3.options())
    count_claimed_retries(StageClocks())  # what earlier tests left
    s3.proxy.reset()
    s3.proxy.configure(write_error_rate=0.3, seed=5)
    for i in range(20):
        store.write_bytes(f"record-{i}.json", b"{}")
    injected = s3.proxy.stats["write_errors"]
    s3.proxy.reset()
    clocks = StageClocks()
    count_claimed_retries(clocks)
    assert injected > 3 and clocks.counters["storage.retries"] == injected
    assert "storage.library_retries" not in clocks.counters
    assert [store.read_bytes(f"record-{i}.json") for i in range(20)] == [b"{}"] * 20


def test_a_parquet_file_read_back_survives_503s(s3: S3Stack) -> None:
    """Reading an output back (predictions.parquet for the per-slide files, Result.predictions)
    seeks and reads through a file; each read is a request of its own, retried like a tile's.
    Through fsspec's file, with the client's retries off, the first 503 ended the run's finish."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpubatch.outputs.store import OutputStore

    table = pa.table({"x": np.arange(200_000), "p": np.random.default_rng(0).random(200_000)})
    store = OutputStore(f"s3://{s3.bucket}/readback/{uuid.uuid4().hex}", s3.options())
    with store.open_write("predictions.parquet") as f:
        pq.write_table(table, f, row_group_size=20_000)
    for seed in range(5):
        s3.proxy.configure(error_rate=0.3, seed=seed)
        with store.open_read("predictions.parquet") as f:
            pf = pq.ParquetFile(f)
            got = pa.concat_tables(pf.read_row_group(i) for i in range(pf.num_row_groups))
        s3.proxy.reset()
        assert got.equals(table)


def test_a_folder_is_deleted_through_503s(s3: S3Stack) -> None:
    """Deleting a folder (a run's start clears a previous run's zarr store with --overwrite, a
    failed attempt's group) lists its keys, then deletes them in bulk: each request retried on
    its own. One retried rm over all of it failed here, with one request in three answered 503."""
    from gpubatch.outputs.store import OutputStore

    for seed in range(5):
        store = OutputStore(f"s3://{s3.bucket}/wipe/{uuid.uuid4().hex}", s3.options())
        for i in range(30):
            store.write_bytes(f"predictions.zarr/c/{i // 10}/{i % 10}", b"x")
        s3.proxy.configure(error_rate=0.3, write_error_rate=0.3, seed=seed)
        store.delete("predictions.zarr", recursive=True)
        store.delete("never-written.zarr", recursive=True)
        s3.proxy.reset()
        assert store.listdir("predictions.zarr") == [] and not store.exists("predictions.zarr/c/0/0")


@pytest.mark.parametrize("refused", ["predictions.parquet", "audit.jsonl", "predictions.zarr/zarr.json"])
def test_outputs_that_cannot_be_written_fail_the_run_clearly_and_resume_writes_them(
        tmp_path: Path, slides: Path, classifier: Path, s3: S3Stack, clean: pd.DataFrame, refused: str) -> None:
    """Every shard committed, then one of the run's own files refused: the run stops with a
    message that says so, names the file and --resume (not a traceback), status.json says
    failed (audit.jsonl refused too: it was left saying running), and --resume writes the
    outputs without computing a shard again."""
    uri = f"s3://{s3.bucket}/runs/{uuid.uuid4().hex}"
    quick = {**s3.options(), "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}
    job = _job(tmp_path, slides, classifier, uri, quick)
    s3.proxy.configure(failing_writes={f"/{refused}"})
    with pytest.raises(OutputsNotWrittenError, match="rerun with --resume") as info:
        gpubatch.run(job, profile="inline")
    named = refused.split("/")[0]  # the zarr root: its metadata's key is zarr's business
    assert s3.secret not in str(info.value) and f"{uri}/{named}:" in str(info.value), info.value
    status = json.loads(s3.fs().cat(f"{uri.removeprefix('s3://')}/status.json"))
    assert status["state"] == "failed" and status["done"] == N_SLIDES
    s3.proxy.reset()
    result = gpubatch.run(job, profile="inline", resume=True)
    assert result.exit_code == 0
    assert sum(1 for s in result.report["shards"] if s["resumed"]) == N_SLIDES
    pd.testing.assert_frame_equal(_sorted(result.predictions()), clean)


def test_status_and_report_read_an_s3_output(tmp_path: Path, slides: Path, classifier: Path, s3: S3Stack) -> None:
    uri = f"s3://{s3.bucket}/runs/{uuid.uuid4().hex}"
    run = cli("run", str(_job(tmp_path, slides, classifier, uri)), env=_env(s3))
    assert run.communicate(timeout=300)[0] and run.returncode == 0
    status = cli("status", uri, env=_env(s3)).communicate(timeout=60)[0]
    assert status.startswith(f"finished: {N_SLIDES}/{N_SLIDES} shards done"), status
    report = cli("report", uri, env=_env(s3)).communicate(timeout=60)[0]
    assert "verdict:" in report and "Traceback" not in report, report


def _commits(s3: S3Stack, uri: str) -> int:
    try:
        return len(s3.fs().ls(f"{uri.removeprefix('s3://')}/_manifest", refresh=True))
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("instant", [1, 3])
def test_killed_client_then_resume_on_s3_equals_a_clean_run(tmp_path: Path, slides: Path, classifier: Path,
                                                            s3: S3Stack, clean: pd.DataFrame, instant: int) -> None:
    uri = f"s3://{s3.bucket}/runs/{uuid.uuid4().hex}"
    job = _job(tmp_path, slides, classifier, uri, profile="inline")
    proc = cli("run", str(job), env=_env(s3), start_new_session=True)
    wait_for(lambda: _commits(s3, uri) >= instant, 180, f"{instant} commits on S3")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = _commits(s3, uri)
    assert kept >= instant  # counted after the kill: the client (and its inline workers) is gone
    resumed = cli("run", str(job), "--resume", env=_env(s3))
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert f"{kept} shard(s) already committed, skipped" in log
    result = gpubatch.open_results(uri, s3.options(via_proxy=False))
    assert sum(1 for s in result.report["shards"] if s["resumed"]) == kept  # computed exactly the rest
    df = _sorted(result.predictions())
    assert not df.duplicated(["slide", "x", "y"]).any()
    pd.testing.assert_frame_equal(df, clean)
    lines = [json.loads(x) for x in s3.fs().cat(f"{uri.removeprefix('s3://')}/audit.jsonl").decode().splitlines()]
    committed = [x["shard_id"] for x in lines if x["event"] == "shard_committed"]
    assert len(committed) == len(set(committed)) == N_SLIDES
    leftovers = [p for p in s3.fs().find(uri.removeprefix("s3://")) if "/.tmp-" in p]
    assert not leftovers


@pytest.mark.slow
@pytest.mark.parametrize("held", ["/predictions.parquet", "/report.json"])
def test_client_killed_while_writing_the_run_s_end_then_resume_is_whole_and_true(
        tmp_path: Path, slides: Path, classifier: Path, s3: S3Stack, clean: pd.DataFrame, held: str) -> None:
    """Every shard committed, then the client SIGKILLed while its merged table (or its report)
    is in flight to S3, the upload never landing. --resume computes nothing again and leaves the
    output whole: every row once, the report counting every shard, status finished."""
    prefix = f"runs/{uuid.uuid4().hex}"
    uri = s3.uri(prefix)
    job = _job(tmp_path, slides, classifier, uri, {"endpoint_url": s3.proxy.url}, profile="inline")
    s3.proxy.configure(dropped_writes={f"{prefix}{held}": 600.0})
    proc = cli("run", str(job), env=_env(s3), start_new_session=True)
    wait_for(lambda: s3.proxy.uploads.get(f"{s3.bucket}/{prefix}{held}", 0) >= 1, 180, f"{held} in flight")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _commits(s3, uri) == N_SLIDES
    status = json.loads(s3.fs().cat(f"{s3.bucket}/{prefix}/status.json"))
    assert status["state"] != "finished", status
    said = cli("status", uri, env=_env(s3)).communicate(timeout=60)[0]
    assert f"{N_SLIDES}/{N_SLIDES} shards done" in said and not said.startswith("finished"), said
    s3.proxy.configure(dropped_writes={})
    resumed = cli("run", str(job), "--resume", env=_env(s3))
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    result = gpubatch.open_results(uri, s3.options(via_proxy=False))
    assert [s["resumed"] for s in result.report["shards"]] == [True] * N_SLIDES
    assert result.report["items"] == 0 and result.report["items_total"] == len(clean)
    df = _sorted(result.predictions())
    assert not df.duplicated(["slide", "x", "y"]).any()
    pd.testing.assert_frame_equal(df, clean)
    assert json.loads(s3.fs().cat(f"{s3.bucket}/{prefix}/status.json"))["state"] == "finished"
    leftovers = [p for p in s3.fs().find(f"{s3.bucket}/{prefix}") if "/.tmp-" in p]
    assert not leftovers


def test_read_many_retries_what_failed_instead_of_calling_it_missing(s3: S3Stack) -> None:
    """A record whose request got a 503 is read again; only a file that is not there is left out
    (commit records streamed to the per-slide outputs were dropped under transient errors)."""
    from gpubatch.outputs.store import OutputStore

    uri = f"s3://{s3.bucket}/many/{uuid.uuid4().hex}"
    names = [f"r{i}.json" for i in range(24)]
    for name in names:
        s3.upload_bytes(name.encode(), f"{uri.removeprefix(f's3://{s3.bucket}/')}/{name}")
    s3.proxy.configure(error_rate=0.2, seed=5)
    got = OutputStore(uri, s3.options()).read_many([*names, "absent.json"])
    s3.proxy.reset()
    assert got == {n: n.encode() for n in names}


@pytest.mark.parametrize("size", [1000, 12 << 20])
def test_a_write_that_fails_midway_leaves_no_object(s3: S3Stack, size: int) -> None:
    """open_write's promise on object storage as on disk: the file appears only when closed
    without an error. fsspec's file commits what it has on leaving a with-block, error or not:
    a Ctrl-C or a failed part read in the middle of merging predictions.parquet published the
    half written so far, a small file in one PUT, a large one by completing its multipart."""
    from gpubatch.outputs.store import OutputStore

    prefix = f"aborted/{uuid.uuid4().hex}"
    store = OutputStore(f"s3://{s3.bucket}/{prefix}", {**s3.options(), "default_block_size": 5 << 20})
    with pytest.raises(KeyboardInterrupt), store.open_write("predictions.parquet") as f:
        f.write(os.urandom(size))
        raise KeyboardInterrupt
    assert not store.exists("predictions.parquet")
    uploads = s3.fs().call_s3("list_multipart_uploads", Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
    assert uploads == []  # a started multipart upload is aborted, not left to be billed
    with store.open_write("predictions.parquet") as f:  # the next write still lands
        f.write(b"whole")
    assert store.read_bytes("predictions.parquet") == b"whole"


def test_an_aborted_shard_uploads_none_of_its_part(s3: S3Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard that fails after its part was opened (a flush of a large slide, then a failed zarr
    append) drops the part unsent. Its abort closed the part as if it were complete: fsspec
    uploaded the half-written file, and a delete then removed it (where that delete failed too,
    the half part stayed on the store)."""
    import numpy as np

    from gpubatch.outputs import writer as writer_module
    from gpubatch.outputs.layout import PARTS_DIR, new_attempt
    from gpubatch.outputs.store import OutputStore

    monkeypatch.setattr(writer_module, "FLUSH_BYTES", 1)  # every batch is written out: the part is open
    store = OutputStore(f"s3://{s3.bucket}/aborted-shard/{uuid.uuid4().hex}", s3.options())
    writer = writer_module.ShardWriter(store, "s1", new_attempt(), {}, {}, ("parquet",))
    writer.write({"x": np.arange(8)}, {"p": np.ones(8, np.float32)})
    writer.abort()
    assert [k for k in s3.proxy.uploads if k.endswith(writer.part)] == []
    assert not store.exists(f"{PARTS_DIR}/{writer.part}")


def test_a_stray_attempt_that_cannot_be_deleted_is_left_for_the_next_sweep(s3: S3Stack) -> None:
    """Sweeping is tidying: files of attempts no commit record names are invisible to readers. A
    delete that kept failing (here every delete answered 503; on disk, a suspended run that took
    up its shard again, still writing its group: "Directory not empty") stopped the run at its
    start. The attempt is left, with a warning, for the next run's sweep."""
    from gpubatch.outputs.manifest import CommitRef, sweep
    from gpubatch.outputs.store import OutputStore

    quick = {**s3.options(), "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
    store = OutputStore(f"s3://{s3.bucket}/sweep/{uuid.uuid4().hex}", quick)
    for name in ("s1-akept.parquet", "s1-astuck.parquet"):
        store.write_bytes(f"_parts/{name}", b"x")
    s3.proxy.configure(write_error_rate=1.0)
    assert sweep(store, [CommitRef("s1", "s1-akept.parquet", None)]) == 0
    s3.proxy.reset()
    assert store.listdir("_parts") == ["s1-akept.parquet", "s1-astuck.parquet"]
    assert sweep(store, [CommitRef("s1", "s1-akept.parquet", None)]) == 1


def test_a_model_on_object_storage_is_checked_and_loaded_by_the_workers(
        tmp_path: Path, slides: Path, classifier: Path, s3: S3Stack, clean: pd.DataFrame) -> None:
    """model.path on S3: ``validate`` fetches and checks the file ``run`` will load (a model whose
    input disagrees with the tiles was let through, and every input quarantined), and worker
    processes load it from the URI (the client's copy is not theirs)."""
    from gpubatch.cli.main import main

    uri = f"s3://{s3.bucket}/models/{uuid.uuid4().hex}/classifier.onnx"
    s3.fs().put(str(classifier), uri.removeprefix("s3://"))
    job = _job(tmp_path, slides, classifier, str(tmp_path / "out"))
    spec = gpubatch.load_job(job).model_dump(mode="json")
    spec["model"]["path"], spec["input"]["storage"] = uri, s3.options()
    spec["run"]["profile"] = "local"
    good = write_job(tmp_path / "remote-model.yaml", spec)
    assert main(["validate", str(good)]) == 0
    result = gpubatch.run(good)
    assert result.exit_code == 0, result.report.get("failed")
    pd.testing.assert_frame_equal(_sorted(result.predictions()), clean)
    spec["model"]["input"]["layout"], spec["output"]["uri"] = "NHWC", str(tmp_path / "other")
    assert main(["validate", str(write_job(tmp_path / "mismatch.yaml", spec))]) == 2
