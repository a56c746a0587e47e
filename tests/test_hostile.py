"""The hostile-input matrix: what an adversarial user tried, and what must hold (issue 16).

Each case runs real components on inputs made by ``hostile_inputs`` from good files and asserts
the exact outcome: the exit code, a message naming the file or field, no secret anywhere, memory
and time bounded. Cases are grouped by what must hold: secrets never leave; indexes are checked;
literal paths before globs; decoder integrity; bounded everything; spec errors are spec errors;
a clean terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pandas as pd
import pytest
from conftest import slide_job, write_job
from hostile_inputs import AuthRangeServer, output_text
from s3_fixtures import S3Stack

from gpubatch.cli.demo import write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["s3_fixtures"]


def cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``gpubatch ARGS`` in a fresh process (this checkout's code), output captured."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "gpubatch", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


# -- 1. secrets never leave --------------------------------------------------------------------


def _presign(s3: S3Stack, key: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.key,
                          aws_secret_access_key=s3.secret, region_name="us-east-1")
    return str(client.generate_presigned_url("get_object", Params={"Bucket": s3.bucket, "Key": key},
                                              ExpiresIn=3600))


def _secret_forms(secret: str) -> list[bytes]:
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    return [f.encode() for f in forms]


def test_credentials_in_input_urls_never_leave(tmp_path: Path, s3: S3Stack, classifier: Path) -> None:
    """A presigned S3 URL and an http://user:SECRET@ URL are read with their credentials, and no
    byte of a credential reaches any output file (parquet and zarr decoded too), the terminal or
    the log, for the slides that work and for the ones that fail."""
    served = tmp_path / "served"
    served.mkdir()
    write_synthetic_slide(served / "b.tif", 512, 512, seed=4, levels=1)
    local = write_synthetic_slide(tmp_path / "a.tif", 512, 512, seed=3, levels=1)
    s3.upload(local, "signed/a.tif")
    presigned = _presign(s3, "signed/a.tif")
    missing = _presign(s3, "signed/missing.tif")
    password = "pw-SECRET-7c1e9a"
    server = AuthRangeServer(served, "alice", password)
    try:
        uris = [presigned, server.url("b.tif"), missing, server.url("absent.tif")]
        out = tmp_path / "out"
        job = slide_job(uris, classifier, out, output={"formats": ["zarr", "parquet", "geojson"]})
        job_path = write_job(tmp_path / "job.yaml", job)
        run = cli("-v", "run", str(job_path))
        report = cli("report", str(out), "--html")
        status = cli("status", str(out))
    finally:
        server.close()
    assert server.requests > 0
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(presigned).query)
    secrets = [password, s3.key, s3.secret, query["Signature"][0],
               urllib.parse.parse_qs(urllib.parse.urlsplit(missing).query)["Signature"][0]]
    assert run.returncode == 3, run.stderr[-3000:]
    frame = pd.read_parquet(out / "predictions.parquet")
    assert sorted(frame["slide"].unique()) == sorted([
        presigned.split("?")[0] + "?AWSAccessKeyId=***&Signature=***&Expires=" + query["Expires"][0],
        f"http://***@127.0.0.1:{server.port}/b.tif"])
    assert frame.groupby("slide").size().tolist() == [16, 16]  # 512 px at 0.25 mpp: 4 x 4 tiles of 64 px at 0.5
    texts = [("terminal", (run.stdout + run.stderr + report.stdout + report.stderr + status.stdout).encode())]
    texts += [(str(p.relative_to(out)), data) for p, data in output_text(out)]
    assert len(texts) > 20 and any("_parts" in name for name, _ in texts)
    leaks = [(name, s[:6]) for name, data in texts for s in secrets for form in _secret_forms(s) if form in data]
    assert leaks == []
    assert "missing.tif" in run.stdout and "absent.tif" in run.stdout  # failures still named
