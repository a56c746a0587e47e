"""An output on object storage (a real S3 server, moto, on loopback) under hostile conditions:
two writers meeting on it, and writes of a shard's files that fail or stall.

Object stores have no rename and no exclusive create by name, so the lease there is taken with
S3's conditional writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to take a stale one
over). The race tests make one writer's lease write stall in its own fault proxy, so the other's
lands first, as a load balancer that holds a request would: write, wait, read back (what the
lease did before) lets both writers through then, a conditional write does not.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pandas as pd
import pytest
from conftest import cli, outcome_within, slide_job, synthetic_slides, wait_for, write_job
from s3_fixtures import FaultProxy, second_proxy

import gpubatch
from gpubatch.core.errors import SpecError
from gpubatch.outputs.layout import LEASE
from gpubatch.outputs.lease import Lease
from gpubatch.outputs.store import OutputStore

if TYPE_CHECKING:
    from collections.abc import Iterator

    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]
N_SLIDES = 4


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_slides(tmp_path_factory.mktemp("races"), N_SLIDES, 700, "q")


@pytest.fixture
def late(s3: S3Stack) -> Iterator[FaultProxy]:
    """A second fault proxy in front of the same server: one writer's own way to it."""
    with second_proxy(s3.endpoint) as proxy:
        yield proxy


def _job(folder: Path, slides: Path, model: Path, uri: str, endpoint: str, storage: dict | None = None,
         **run: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    job = slide_job([str(slides / "*.tif")], model, folder / "unused",
                    run={"readers": 1, "prefetch_batches": 1, **run})
    job["tiles"] = {"size": 32, "level": 0, "tissue": {"method": "none"}}
    job["model"]["batch_size"] = 4
    job["output"] = {"uri": uri, "formats": ["zarr", "parquet"],
                     "storage": {"endpoint_url": endpoint, **(storage or {})}}
    return write_job(folder / "job.yaml", job)


def _env(s3: S3Stack) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": s3.key, "AWS_SECRET_ACCESS_KEY": s3.secret, "AWS_DEFAULT_REGION": "us-east-1"}


def _lease_store(s3: S3Stack, proxy: FaultProxy, prefix: str) -> OutputStore:
    return OutputStore(s3.uri(prefix), {**s3.options(), "endpoint_url": proxy.url})


def _acquire_within(lease: Lease, seconds: float) -> BaseException | None:
    return cast(BaseException | None, outcome_within(lease.acquire, seconds, "acquire"))


def test_two_runs_started_together_into_one_s3_output_one_refuses(
        tmp_path: Path, slides: Path, classifier: Path, s3: S3Stack, late: FaultProxy) -> None:
    """Run B finds the output free and sends its lease; the write stalls; run A takes the lease
    meanwhile. When B's write lands it must not take the output from A: B stops with exit 2
    naming A, before writing a shard, and A's results are whole and its own."""
    prefix = f"runs/{uuid.uuid4().hex}"
    uri = s3.uri(prefix)
    # B's write lands once A holds the output, however long a loaded machine takes to start A
    late.configure(stalled_writes={f"{prefix}/{LEASE}": 120.0}, stall_release=lambda: _holder(s3, prefix) is not None)
    second = cli("run", str(_job(tmp_path / "b", slides, classifier, uri, late.url)), "--profile", "inline",
                 env=_env(s3))
    wait_for(lambda: late.uploads.get(f"{s3.bucket}/{prefix}/{LEASE}", 0) >= 1, 120, "run B's lease write")
    first = cli("run", str(_job(tmp_path / "a", slides, classifier, uri, s3.proxy.url)), "--profile", "inline",
                env=_env(s3))
    logs = {"a": first.communicate(timeout=300)[0], "b": second.communicate(timeout=300)[0]}
    assert (first.returncode, second.returncode) == (0, 2), logs
    assert "another run is writing this output" in logs["b"], logs["b"]
    result = gpubatch.open_results(uri, s3.options(via_proxy=False))
    df = result.predictions()
    assert not df.duplicated(["slide", "x", "y"]).any() and df["slide"].nunique() == N_SLIDES
    audit = [json.loads(x) for x in s3.fs().cat(f"{s3.bucket}/{prefix}/audit.jsonl").decode().splitlines()]
    assert {x.get("run_id") for x in audit if x.get("run_id")} == {result.report.get("run_id")}, audit
    assert not s3.fs().exists(f"{s3.bucket}/{prefix}/{LEASE}")  # A released it; B never held it


def _holder(s3: S3Stack, prefix: str) -> str | None:
    """The run id of the lease under ``prefix`` on the server (asked past any client cache)."""
    fs = s3.fs()
    fs.invalidate_cache()
    try:
        return str(json.loads(fs.cat(f"{s3.bucket}/{prefix}/{LEASE}"))["run_id"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def test_two_writers_taking_over_one_stale_s3_lease_one_refuses(s3: S3Stack, late: FaultProxy) -> None:
    """A killed run's lease is stale; two new writers take it over at once, B's write stalling.
    Only one may hold the output: B's late write must not replace the lease A now holds."""
    prefix = f"leases/{uuid.uuid4().hex}"
    killed = {"run_id": "killed", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 1000,
              "stale_after_s": 120}
    _lease_store(s3, s3.proxy, prefix).write_json(LEASE, killed)
    late.configure(stalled_writes={f"{prefix}/{LEASE}": 120.0},
                   stall_release=lambda: _holder(s3, prefix) == "run-a")  # once A has taken it over
    outcomes: dict[str, BaseException | None] = {}
    taker_b = Lease(_lease_store(s3, late, prefix), "run-b", stale_s=120.0, heartbeat_s=5.0)
    racer = threading.Thread(target=lambda: outcomes.update(b=_acquire_within(taker_b, 60)))
    racer.start()
    wait_for(lambda: late.uploads.get(f"{s3.bucket}/{prefix}/{LEASE}", 0) >= 1, 60, "B's lease write")
    taker_a = Lease(_lease_store(s3, s3.proxy, prefix), "run-a", stale_s=120.0, heartbeat_s=5.0)
    outcomes["a"] = _acquire_within(taker_a, 60)
    racer.join(90)
    assert outcomes["a"] is None, outcomes
    assert isinstance(outcomes["b"], SpecError) and "run run-a" in str(outcomes["b"]), outcomes
    assert _lease_store(s3, s3.proxy, prefix).read_json(LEASE)["run_id"] == "run-a"


def test_an_s3_lease_whose_create_was_answered_late_is_still_this_run_s(s3: S3Stack) -> None:
    """A conditional create that landed but whose answer was lost is sent again and meets its own
    lease (412): that is this run's lease, not another's, and it goes on."""
    prefix = f"leases/{uuid.uuid4().hex}"
    store = _lease_store(s3, s3.proxy, prefix)
    mine = Lease(store, "run-a", stale_s=120.0, heartbeat_s=5.0)
    store.write_json(LEASE, mine._record())  # as if the first try had landed
    assert _acquire_within(mine, 60) is None
    assert store.read_json(LEASE)["run_id"] == "run-a"


def test_two_different_jobs_cannot_share_an_s3_output(tmp_path: Path, slides: Path, classifier: Path,
                                                     mean_model: Path, s3: S3Stack) -> None:
    """An S3 prefix holding one job's results refuses another model's run, with --resume too,
    naming the fix, and its results stay as they were."""
    prefix = f"runs/{uuid.uuid4().hex}"
    uri = s3.uri(prefix)
    first = cli("run", str(_job(tmp_path / "a", slides, classifier, uri, s3.proxy.url)), "--profile", "inline",
                env=_env(s3))
    assert first.communicate(timeout=300)[0] and first.returncode == 0
    before = s3.fs().cat(f"{s3.bucket}/{prefix}/predictions.parquet")
    other = str(_job(tmp_path / "b", slides, mean_model, uri, s3.proxy.url))
    for extra, refusal in (((), "committed shard(s) of an earlier run"), (("--resume",), "model: sha256")):
        proc = cli("run", other, "--profile", "inline", *extra, env=_env(s3))
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 2 and refusal in log and "--overwrite" in log, log
        assert "Traceback" not in log and s3.secret not in log, log
    assert s3.fs().cat(f"{s3.bucket}/{prefix}/predictions.parquet") == before


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, slides: Path, classifier: Path) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("faults-clean")
    job = _job(tmp, slides, classifier, str(tmp / "out"), "unused")
    return _sorted(gpubatch.run(job, profile="inline").predictions())


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["slide", "x", "y"]).reset_index(drop=True)


@pytest.mark.parametrize("within", ["predictions.zarr/q1", "_parts/q1", "_manifest/q1"])
def test_a_shard_whose_writes_keep_failing_is_quarantined_never_committed(
        tmp_path: Path, slides: Path, classifier: Path, s3: S3Stack, clean: pd.DataFrame, within: str) -> None:
    """Every write of one slide's zarr group, parquet part or commit record is answered 503: the
    shard is retried per run.retries, then quarantined (exit 3) naming the slide; nothing of it
    is committed or merged, the others are whole; --resume computes that slide alone."""
    prefix = f"runs/{uuid.uuid4().hex}"
    uri = s3.uri(prefix)
    job = _job(tmp_path, slides, classifier, uri, s3.proxy.url, retries=1, storage_attempts=2)
    s3.proxy.configure(writes_failing_within={f"{prefix}/{within}"})
    proc = cli("run", str(job), "--profile", "inline", env=_env(s3))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 3, log
    result = gpubatch.open_results(uri, s3.options(via_proxy=False))
    assert [f["input"].rsplit("/", 1)[-1] for f in result.report["failed"]] == ["q1.tif"], result.report["failed"]
    assert not [k for k in s3.fs().ls(f"{s3.bucket}/{prefix}/_manifest", refresh=True) if "/q1" in k]
    df = _sorted(result.predictions())
    pd.testing.assert_frame_equal(df, clean[~clean["slide"].str.endswith("/q1.tif")].reset_index(drop=True))
    s3.proxy.reset()
    resumed = cli("run", str(job), "--profile", "inline", "--resume", env=_env(s3))
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    again = gpubatch.open_results(uri, s3.options(via_proxy=False))
    assert sum(1 for s in again.report["shards"] if not s["resumed"]) == 1
    pd.testing.assert_frame_equal(_sorted(again.predictions()), clean)


@pytest.mark.slow
@pytest.mark.parametrize("within", ["predictions.zarr/q1", "_parts/q1", "_manifest/q1"])
def test_a_shard_whose_writes_stall_fails_in_bounded_time_naming_the_setting(
        tmp_path: Path, slides: Path, classifier: Path, s3: S3Stack, clean: pd.DataFrame, within: str) -> None:
    """Every write of one slide's files is held by the server past the read timeout: each times
    out (no wait without a bound), the shard is quarantined with an error that says it timed
    out and names the setting that bounds it; the other slides are whole."""
    prefix = f"runs/{uuid.uuid4().hex}"
    uri = s3.uri(prefix)
    job = _job(tmp_path, slides, classifier, uri, s3.proxy.url, {"config_kwargs": {"read_timeout": 1}},
               retries=1, storage_attempts=2)
    s3.proxy.configure(writes_stalling_within={f"{prefix}/{within}": 4.0})
    proc = cli("run", str(job), "--profile", "inline", env=_env(s3))
    log = proc.communicate(timeout=400)[0]
    assert proc.returncode == 3, log
    result = gpubatch.open_results(uri, s3.options(via_proxy=False))
    failed = result.report["failed"]
    assert [f["input"].rsplit("/", 1)[-1] for f in failed] == ["q1.tif"], failed
    assert "output.storage config_kwargs.read_timeout" in failed[0]["error"], failed
    assert f"{prefix}/{within}" in failed[0]["error"] and s3.secret not in failed[0]["error"], failed
    df = _sorted(result.predictions())
    pd.testing.assert_frame_equal(df, clean[~clean["slide"].str.endswith("/q1.tif")].reset_index(drop=True))
