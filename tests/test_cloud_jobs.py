"""Whole slide jobs over gs:// and az://: fake-gcs-server and Azurite on loopback, each behind the
fault proxy (tests/cloud_fixtures.py), as tests/test_remote_jobs.py runs them over S3.

Inputs streamed from the emulator give the predictions of the same job over the local files; a
run's outputs written to the emulator read back the same and hold no credentials; a slide written
over while its shard reads it is read again, never mixed (tests/test_written_over_remote.py's
helpers, there for S3).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd
import pytest
from cloud_fixtures import AZURITE_KEY, CloudStack
from conftest import by_slide_name, slide_job, upload_slides, write_job
from test_written_over_remote import (
    _assert_a_clean_runs_predictions,
    _assert_read_again,
    _written_over_once,
)

import gpubatch

pytest_plugins = ["s3_fixtures", "cloud_fixtures"]


def test_a_job_streams_its_slides_from_the_cloud_as_from_disk(
        tmp_path: Path, cloud: CloudStack, slides_dir: Path, mean_model: Path,
        local_reference: pd.DataFrame) -> None:
    """``gs://bucket/dir/*.tif`` and ``az://container/dir/*.tif`` as a job's input, read through
    obstore (the default) behind a proxy that fails some requests: the predictions of the same
    job over the local files, every slide read by obstore, the failures retried and counted, and
    the inputs named as the user spelled them."""
    folder = upload_slides(cloud, slides_dir)
    cloud.proxy.configure(error_rate=0.05, seed=9)
    job = slide_job([f"{folder}/*.tif"], mean_model, tmp_path / "out")
    job["input"].update(storage=cloud.options(), access="stream")
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.report["failed"]
    pd.testing.assert_frame_equal(by_slide_name(result.predictions()), local_reference)
    assert set(result.predictions()["slide"]) == {f"{folder}/s{i}.tif" for i in range(3)}
    counters = result.report["counters"]
    assert counters.get("storage.client.obstore", 0) >= 3 and "storage.client.fsspec" not in counters
    assert cloud.proxy.stats["errors"] == 0 or counters.get("storage.retries", 0) > 0


def test_a_job_s_outputs_land_on_the_cloud_and_read_back(
        tmp_path: Path, cloud: CloudStack, slides_dir: Path, mean_model: Path,
        local_reference: pd.DataFrame) -> None:
    """Inputs and outputs both on the emulator (outputs through gcsfs/adlfs, zarr's included):
    the run's results read back from there equal the local run's, and no object it wrote holds
    the account key (Azure's rides in the connection string)."""
    from gpubatch.io.storage import get_fs

    folder = upload_slides(cloud, slides_dir)
    uri = cloud.uri(f"runs/{uuid.uuid4().hex[:8]}")
    job = slide_job([f"{folder}/*.tif"], mean_model, tmp_path / "unused")
    job["input"].update(storage=cloud.options(), access="stream")
    job["output"] = {"uri": uri, "formats": ["parquet", "zarr"], "storage": cloud.options()}
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0 and result.output_uri == uri, result.report["failed"]
    again = gpubatch.open_results(uri, cloud.options())
    pd.testing.assert_frame_equal(by_slide_name(again.predictions()), local_reference)
    fs, root = get_fs(uri, cloud.options())
    written = fs.find(root)
    names = {p.removeprefix(root + "/").split("/", 1)[0] for p in written}
    assert {"predictions.parquet", "predictions.zarr", "report.json", "audit.jsonl", "_manifest"} <= names
    for path in written:
        assert AZURITE_KEY.encode() not in fs.cat_file(path), path


def test_a_cloud_slide_written_over_while_read_is_read_again_not_mixed(
        tmp_path: Path, cloud: CloudStack, classifier: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written over after its shard opened it and before its tiles: obstore's reads, pinned to the
    version the shard opened, are refused; the attempt fails saying the input changed, the next
    reads the new version only, and its predictions are a clean run's on the new version."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    got, out, new = _written_over_once(tmp_path, cloud, classifier, monkeypatch)
    _assert_read_again(got, out)
    monkeypatch.undo()
    _assert_a_clean_runs_predictions(got, tmp_path, new, classifier)
