"""A job's ``run.storage_attempts`` and ``run.storage_max_wait_s`` reach every read of its run,
not only a slide's: a genome reference on a real S3 server (moto, behind the fault proxy of
``s3_fixtures``) that answers one GET 503 SlowDown fails that read where the job allows one
attempt, and is read where it allows three. Before, only the slide source passed the job's
policy: every other read retried five times whatever the job said."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from gpubatch.core.errors import EXIT_PARTIAL, SpecError
from gpubatch.spec import JobSpec

pytest.importorskip("pysam")
pytest.importorskip("moto")

from s3_fixtures import S3Stack  # noqa: E402
from test_input_versions import CONTIGS, genome_spec, write_fasta  # noqa: E402

pytest_plugins = ["s3_fixtures"]


def _reference(s3: S3Stack, tmp_path: Path) -> str:
    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    key = f"retry-policy/{uuid.uuid4().hex}/ref.fa"
    s3.upload(Path(f"{fasta}.fai"), f"{key}.fai")
    return s3.upload(fasta, key)


def _spec(s3: S3Stack, tmp_path: Path, uri: str, attempts: int, **run: Any) -> JobSpec:
    spec = genome_spec(tmp_path, uri, s3.options(), windows_per_shard=10)
    spec["model"]["batch_size"] = 16  # not auto: no tuning reads on the client
    spec["run"] = {"profile": "inline", "retries": 0, "storage_attempts": attempts,
                   "storage_max_wait_s": 1.0, **run}
    return JobSpec.model_validate(spec)


@pytest.mark.parametrize("attempts", [1, 3])
def test_the_plans_reads_of_a_reference_take_the_jobs_attempts(
        s3: S3Stack, tmp_path: Path, attempts: int) -> None:
    """The client's plan reads the FASTA (its format, the .fai checked against it): one 503 on
    its first GET refuses the job with one attempt (validate, as run would), not with three."""
    from gpubatch.runtime.preflight import validate_job

    uri = _reference(s3, tmp_path)
    s3.proxy.configure(slow_gets={uri.removeprefix("s3://"): 1})
    job = _spec(s3, tmp_path, uri, attempts)
    if attempts == 1:
        with pytest.raises(SpecError, match=r"windows.reference.*after 1 attempt"):
            validate_job(job, open_inputs=False)
    else:
        assert validate_job(job, open_inputs=False).shards == 3


@pytest.mark.parametrize(("attempts", "exit_code"), [(1, EXIT_PARTIAL), (3, 0)])
def test_a_workers_reads_of_a_reference_take_the_jobs_attempts(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, attempts: int, exit_code: int) -> None:
    """On a worker process (the job's policy handed in RunContext.storage_policy): the server
    throttles the first GET of the FASTA after the plan, which is a shard's. With one attempt
    that shard fails (run.retries 0: quarantined, the others done); with three it is read."""
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.source import GenomeSource

    uri = _reference(s3, tmp_path)
    planned = GenomeSource.plan

    def plan_then_throttle(self: GenomeSource, job: JobSpec) -> Any:
        shards = planned(self, job)
        s3.proxy.configure(slow_gets={uri.removeprefix("s3://"): 1})
        return shards

    monkeypatch.setattr(GenomeSource, "plan", plan_then_throttle)
    job = _spec(s3, tmp_path, uri, attempts, profile="local", workers=1)
    result = run_job(job, show_progress=False)
    assert result.exit_code == exit_code, result.report["failed"]
    if attempts == 1:
        [failed] = result.report["failed"]
        assert failed["input"] == uri and "503 SlowDown) after 1 attempt" in failed["error"], failed
    assert s3.proxy.faults.slow_gets[uri.removeprefix("s3://")] == 0  # the 503 was met
