"""One output location, a local folder or an object-store prefix, behind the storage entry point.

Object stores have no rename and no append, so nothing in gpubatch's outputs relies on either:
files that must appear whole are written in one request (``write_bytes``: a single PUT on object
storage, a temporary name and a rename on disk), streams (parquet parts, the merged table) are
written to names that only a later commit record makes visible, and zarr groups are written
through zarr's own fsspec store. Every path here is relative to the output's root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpubatch.core.errors import GpubatchError, InputError
from gpubatch.core.files import write_bytes_atomic
from gpubatch.io.redact import redact
from gpubatch.io.retried_fs import RetriedFS
from gpubatch.io.retry import (
    RetryPolicy,
    call_with_retries,
    is_transient,
    register_output,
    storage_error,
)
from gpubatch.io.storage import get_fs, open_seekable, upload_fs
from gpubatch.io.uris import is_remote, local_path, protocol_of
from gpubatch.io.zarr_groups import open_zarr_group
from gpubatch.outputs import conditional as conditions
from gpubatch.outputs.layout import TMP_PREFIX

POLICY = RetryPolicy(attempts=5)


class HashingWriter:
    """A write-only file wrapper that hashes the bytes as they pass, so a part's sha256 costs no
    second read (on object storage, no second download)."""

    def __init__(self, raw: Any):
        self.raw, self.sha = raw, hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        self.raw.write(view)
        return len(view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    @property
    def closed(self) -> bool:
        return bool(self.raw.closed)


class OutputStore:
    """The files of one output: ``uri`` a local path, ``file://`` or any fsspec URL."""

    def __init__(self, uri: str | Path, options: dict[str, Any] | None = None):
        text = str(uri)
        self.remote = is_remote(text)
        self.uri = text.rstrip("/") if self.remote else os.path.abspath(local_path(text))
        self.options = dict(options or {})
        self.fs, self.root = get_fs(self.uri, self.options)
        self.root = self.root.rstrip("/")
        if self.remote:
            register_output(self.uri)

    @classmethod
    def of(cls, where: OutputStore | str | Path, options: dict[str, Any] | None = None) -> OutputStore:
        return where if isinstance(where, OutputStore) else cls(where, options)

    def __repr__(self) -> str:
        return f"OutputStore({redact(self.uri)!r})"

    # -- names -----------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """The filesystem path (fsspec's form) of a file under the root."""
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def url(self, *parts: str) -> str:
        """The full URI of a file under the root (what zarr and users are given)."""
        return "/".join([self.uri, *(p.strip("/") for p in parts if p)])

    def local(self, *parts: str) -> Path:
        """The local path of a file; only for a local output."""
        if self.remote:
            raise GpubatchError(f"{redact(self.uri)} is not a local folder")
        return Path(self.path(*parts))

    # -- reads -------------------------------------------------------------------------------------

    def exists(self, name: str = "") -> bool:
        return bool(call_with_retries(lambda: self.fs.exists(self.path(name)), self.url(name), POLICY))

    def read_bytes(self, name: str) -> bytes:
        return bytes(call_with_retries(lambda: self.fs.cat_file(self.path(name)), self.url(name), POLICY))

    def open_read(self, name: str) -> Any:
        """A seekable binary file object (for readers that stream, such as parquet's); on object
        storage each of its reads is a request retried on its own (storage.open_seekable)."""
        if self.remote:
            return open_seekable(self.url(name), self.options, POLICY)
        return call_with_retries(lambda: self.fs.open(self.path(name), "rb"), self.url(name), POLICY)

    def modified(self, name: str) -> float | None:
        """A local file's modification time (what :meth:`touch` sets); None on object storage,
        or for a file that is not there."""
        if self.remote:
            return None
        try:
            return os.stat(self.path(name)).st_mtime
        except FileNotFoundError:
            return None

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """Several small files at once (concurrent requests on object storage); missing files are
        left out, and a file whose request failed transiently is read again under the retry
        policy rather than being taken for missing."""
        if not names:
            return {}
        paths = [self.path(n) for n in names]
        found = call_with_retries(lambda: self.fs.cat(paths, on_error="return"), self.uri, POLICY)
        out: dict[str, bytes] = {}
        for name, path in zip(names, paths, strict=True):
            value = found.get(path, FileNotFoundError(path))
            if not isinstance(value, BaseException):
                out[name] = bytes(value)
            elif not isinstance(value, FileNotFoundError):
                try:
                    out[name] = self.read_bytes(name)
                except InputError as exc:
                    if exc.retryable:  # still failing after the retries: an error, not a missing file
                        raise
        return out

    def listdir(self, name: str = "") -> list[str]:
        """Names (not paths) of the entries directly under ``name``; [] when it does not exist."""
        try:
            entries = call_with_retries(lambda: self.fs.ls(self.path(name), detail=False), self.url(name), POLICY)
        except Exception:  # noqa: BLE001 - a missing folder or prefix lists as empty
            return []
        base = self.path(name).rstrip("/") + "/"
        return sorted(e[len(base):] if e.startswith(base) else e.rsplit("/", 1)[-1] for e in entries)

    def iter_names(self, name: str = "") -> Iterator[str]:
        """The names under ``name`` as a stream, in no set order: a local folder is read entry by
        entry (a 100,000-shard output's parts are never one list in memory); object storage
        lists as ``listdir`` does. Deleting names already seen while iterating is safe."""
        if self.remote:
            yield from self.listdir(name)
            return
        try:
            with os.scandir(self.path(name)) as entries:
                yield from (e.name for e in entries)
        except FileNotFoundError:
            return

    def is_empty(self) -> bool:
        return not self.exists() or not self.listdir()

    # -- writes ------------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes) -> None:
        """A whole file, seen complete or not at all (one PUT; or a temporary name, then rename)."""
        if not self.remote:
            write_bytes_atomic(self.path(name), data)
            return
        call_with_retries(lambda: self.fs.pipe_file(self.path(name), data), self.url(name), POLICY)

    def write_json(self, name: str, data: Any, indent: int | None = 1) -> None:
        """``data`` as JSON; ``indent=None`` for files only gpubatch reads (json's C encoder runs
        only without an indent: a shard's commit record encodes 3x faster)."""
        self.write_bytes(name, _json_bytes(data, indent))

    def touch(self, name: str) -> None:
        """Set a local file's modification time to now, its contents untouched (FileNotFoundError
        if it is gone): whichever file is at ``name`` now, so a touch meant for one that was
        replaced meanwhile refreshes its replacement, which is all it can do to it."""
        os.utime(self.local(name))

    def set_aside(self, name: str) -> Path | None:
        """Move a local file ``name`` to a temporary name beside it, atomically (a rename), and
        give that name; None when there was none. Whatever was at ``name`` the instant of the
        rename is what is set aside: the file can then be read and kept or put back without
        another writer's file landing at ``name`` in between being mistaken for it."""
        target, aside = self._temporary_beside(name)
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            return None
        return aside

    def put_back(self, aside: Path, name: str) -> bool:
        """Return a file :meth:`set_aside` moved to ``name``, unless another has landed there
        since (a hard link: it never replaces one): True when put back. The set-aside name goes
        either way."""
        try:
            os.link(aside, self.path(name))
            return True
        except FileExistsError:
            return False
        finally:
            aside.unlink(missing_ok=True)

    def create_json(self, name: str, data: Any) -> bool | None:
        """Write ``name`` only if it does not exist, atomically: True when this call created it,
        False when it existed, None where the store cannot tell (object storage other than S3,
        Azure Blob and GCS, or a filesystem without hard links), and the caller must settle it
        another way.

        On disk: a complete temporary file hard-linked to the name, which fails if the name
        exists, on NFS too (the classic exclusive create that ``O_EXCL`` is not there). On S3 and
        Azure Blob: a conditional write (``If-None-Match: *``, see :meth:`replace_json`); on GCS
        its like (``ifGenerationMatch=0``).
        """
        if self.remote:
            return self.replace_json(name, data, None)
        target, tmp = self._temporary_beside(name)
        try:
            tmp.write_bytes(_json_bytes(data))
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        except OSError:
            return None
        finally:
            tmp.unlink(missing_ok=True)

    def version(self, name: str) -> str | None:
        """The version of ``name`` now (for :meth:`replace_json`): its ETag, on GCS its
        generation (outputs.conditional.version_of); None when it does not exist or the store has
        no conditional writes. Ask it before reading the file: a write landing in between then
        fails the condition rather than being replaced unseen."""
        if not self.conditional:
            return None
        try:
            found = call_with_retries(lambda: self.fs.info(self.path(name)), self.url(name), POLICY)
        except InputError as exc:
            if exc.retryable:
                raise
            return None
        return conditions.version_of(found, protocol_of(self.uri))

    def replace_json(self, name: str, data: Any, version: str | None) -> bool | None:
        """Write ``name`` only if it is still at ``version`` (from :meth:`version`), or,
        for ``None``, only if it does not exist: True when written, False when another writer's
        object was there (412), None where the store has no conditional writes (the caller
        writes plainly and checks another way)."""
        if not self.conditional:
            return None
        return self.put_json_if(name, data, version) is not None

    def put_json_if(self, name: str, data: Any, version: str | None) -> str | None:
        """:meth:`replace_json` giving the version of the object it wrote (None when refused): a
        writer that must only ever replace its own object (the lease's heartbeat) conditions
        its next write on it. Only where :attr:`conditional` (outputs.conditional: S3, Azure
        Blob and GCS); a retry of a write that landed but whose answer was lost meets its own
        object and is refused: the caller reads it back. An ``If-Match`` on an object that is
        gone is refused too."""
        body, path, protocol = _json_bytes(data), self.path(name), protocol_of(self.uri)
        return call_with_retries(lambda: conditions.put_if(self.fs, protocol, path, body, version),
                                 self.url(name), POLICY)

    def delete_if(self, name: str, version: str) -> bool:
        """Delete ``name`` only if it is still at ``version`` (``If-Match`` on DELETE; on GCS,
        ``ifGenerationMatch`` on the delete of that generation): True when deleted, False when
        another writer's object is there now or none is. Only where :attr:`conditional`; a
        server that ignores the condition deletes plainly."""
        path, protocol = self.path(name), protocol_of(self.uri)
        return bool(call_with_retries(lambda: conditions.delete_if(self.fs, protocol, path, version),
                                      self.url(name), POLICY))

    @property
    def conditional(self) -> bool:
        """Whether writes here can be made conditional on the object's version (S3, Azure Blob,
        GCS)."""
        return self.remote and protocol_of(self.uri) in conditions.CONDITIONAL_PROTOCOLS

    @contextlib.contextmanager
    def open_write(self, name: str) -> Iterator[HashingWriter]:
        """A binary stream to ``name``, hashed as it goes, that appears only when closed without
        an error: on object storage the upload completes on close; on disk it is written under a
        temporary name and renamed."""
        if self.remote:
            fs, _ = upload_fs(self.uri, self.options)
            with output_errors(self, name):
                raw = fs.open(self.path(name), "wb")
                try:
                    yield HashingWriter(raw)
                except BaseException:
                    _discard(raw)
                    raise
                raw.close()
            return
        target, tmp = self._temporary_beside(name)
        try:
            with open(tmp, "wb") as raw:
                yield HashingWriter(raw)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def _temporary_beside(self, name: str) -> tuple[Path, Path]:
        """(the local file ``name``, a temporary name beside it), its folder made: written under
        the temporary name, a file appears whole or not at all (sweeps remove leftovers)."""
        target = Path(self.path(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        return target, target.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}")

    def makedirs(self, name: str) -> None:
        if not self.remote:
            os.makedirs(self.path(name), exist_ok=True)

    def delete(self, name: str, recursive: bool = False) -> None:
        """Remove a file or folder; a missing one is not an error.

        A folder on object storage is its keys: they are listed, then deleted a thousand to a
        request, each request retried on its own (one retried ``rm``, a dozen requests, failed
        a run's start when one request in five was answered 503)."""
        if self.remote and recursive:
            fs = RetriedFS(self.fs, self.url(name), POLICY)
            fs.rm_files(fs.find(self.path(name)))
            return

        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path(name), recursive=recursive)

        call_with_retries(rm, self.url(name), POLICY)

    def zarr_group(self, name: str, mode: str = "r", attributes: dict[str, Any] | None = None) -> Any:
        """A zarr group under the root (LocalStore on disk, FsspecStore on object storage);
        ``attributes``: a new group's, written with its metadata rather than after it. On object
        storage zarr's requests go through the storage entry point's counted client, so they are
        counted as the store's other requests are."""
        if not self.remote:
            return open_zarr_group(self.path(name), mode=mode, attributes=attributes)
        return open_zarr_group(self.url(name), self.options, mode=mode, counted=True, attempts=POLICY.attempts,
                               attributes=attributes)


@contextlib.contextmanager
def output_errors(store: OutputStore, name: str = "") -> Iterator[None]:
    """Failures of writes a library makes (zarr's store, a streamed upload), which retry on
    their own, raised as the storage errors the output store's own calls raise: naming the file
    (``name`` under the output; a 503's message names none), retryable when transient, and a
    timeout naming output.storage's setting."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise storage_error(store.url(name), exc, POLICY.attempts) from exc


def _json_bytes(data: Any, indent: int | None = 1) -> bytes:
    return json.dumps(data, indent=indent, default=str).encode()


def _discard(raw: Any) -> None:
    """Drop a half-written upload without publishing it. fsspec's files commit what they hold
    when closed, and a with-block closes them on an error too: a failed merge published a
    truncated predictions.parquet. ``discard`` aborts a started multipart (s3fs) or resumable
    (gcsfs) upload; marked closed, the file is never committed, not even by its finaliser (a
    small file, or adlfs's staged blocks, are only ever sent on close)."""
    with contextlib.suppress(Exception):  # the error being raised is the one to report
        raw.discard()
    raw.closed = True
