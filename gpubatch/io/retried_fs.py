"""An fsspec filesystem seen through the retry layer: each call retried and counted on its own.

Telling a folder's format and reading DICOM headers walk a store with fsspec's own calls (list,
exists, a few small reads). The clients :func:`gpubatch.io.storage.get_fs` makes have their
library's retries switched off, so a bare call fails on the first 503; and retrying a whole walk
of N requests as one call succeeds with probability (1-p)^N per attempt, which a folder of a
dozen files under a throttling store soon runs out of. Here each request has its own attempts.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from gpubatch.io.ranges import (
    LocalRangeReader,
    RangeFile,
    RangeReader,
    fsspec_reader,
    retried_and_measured,
)
from gpubatch.io.redact import redact
from gpubatch.io.retry import RetryPolicy, call_with_retries, default_policy
from gpubatch.io.uris import spelled_as

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks


class RetriedFS:
    """The calls a store walk needs, each under the policy; failures become InputError.

    ``name`` is what errors name (the URI the walk started from, redacted on the way out).
    """

    def __init__(self, fs: Any, name: str, policy: RetryPolicy | None = None,
                 clocks: StageClocks | None = None, reader_fs: Any = None):
        self.fs, self.name = fs, redact(name)
        self.policy, self.clocks = policy or default_policy(), clocks
        #: what :meth:`open` reads through: its reads are counted where they are made (io.ranges),
        #: so not by a client that counts its requests on the wire (io.storage.get_fs's ``metered``)
        self.reader_fs = reader_fs if reader_fs is not None else fs

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return call_with_retries(lambda: fn(*args, **kwargs), self.name, self.policy, self.clocks)

    def ls(self, path: str) -> list[dict[str, Any]]:
        """Entries directly under ``path`` with their details (name, type, size)."""
        return list(self._call(self.fs.ls, path, detail=True))

    def exists(self, path: str) -> bool:
        return bool(self._call(self.fs.exists, path))

    def isdir(self, path: str) -> bool:
        return bool(self._call(self.fs.isdir, path))

    def find(self, path: str) -> list[str]:
        """Every file under ``path`` (or ``path`` itself, a file); [] when nothing is there."""
        return list(self._call(self.fs.find, path))

    def rm_files(self, paths: list[str], batch: int = 1000) -> None:
        """Delete ``paths`` (files), ``batch`` to a call (S3 deletes 1000 keys to a request), each
        call retried; files already gone are no error."""
        def rm(chunk: list[str]) -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(chunk)

        for start in range(0, len(paths), batch):
            self._call(rm, paths[start:start + batch])

    def size(self, path: str) -> int:
        return int(self._call(self.fs.info, path).get("size") or 0)

    def open(self, path: str, size: int, blocksize: int = RangeFile.BLOCKSIZE) -> RangeFile:
        """A seekable file of ``size`` bytes whose every read is one retried, counted request of
        at least ``blocksize`` bytes; close it when done."""
        inner: RangeReader
        if self._local():  # pread, as every local read: not fsspec's async wrapper in a thread
            inner = LocalRangeReader(path)
        else:
            inner = fsspec_reader(self.reader_fs, path, self.name, max_concurrency=4)
        reader = retried_and_measured(inner, self.policy, self.clocks)
        return RangeFile(reader, size, path.rsplit("/", 1)[-1], blocksize=blocksize)

    def _local(self) -> bool:
        protocol = self.fs.protocol[0] if isinstance(self.fs.protocol, (tuple, list)) else self.fs.protocol
        return protocol in ("file", "local")

    def unstrip(self, path: str) -> str:
        """``path`` as a URL (fsspec strips the protocol) in the scheme the walk's URI was written
        in (adlfs would say ``abfs://`` for ``az://``); local paths stay paths."""
        return path if self._local() else spelled_as(self.name, str(self.fs.unstrip_protocol(path)))
