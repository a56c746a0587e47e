"""What the stage cache keeps of each remote slide: its entry's state, the files to download,
and the pinned local copy a shard reads (io.stage_cache, the cache itself, is their only maker).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.io.host_files import EntryLock
from gpubatch.io.uris import uri_name


class RemoteFile(NamedTuple):
    """One file to download: where from and to, and the version (size, unquoted ETag) listed."""

    uri: str
    local: str
    size: int
    etag: str | None


@dataclass
class StageEntry:
    """One remote slide in the cache; ``state``: pending -> downloading -> ready | failed."""

    uri: str
    root: str
    local: str
    lock: EntryLock
    record: str
    state: str = "pending"
    size: int = 0
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    #: set once its version was asked and recorded (or it ended): what another process can take
    recorded: threading.Event = field(default_factory=threading.Event)
    error: InputError | None = None
    released: bool = False
    reported: bool = False
    #: when the entry was asked for (a prefetch asked before its copy was released is stale)
    asked: float = field(default_factory=time.time)
    clocks: StageClocks = field(default_factory=StageClocks)
    etag: str | None = None  # the listed version of the (first) file, once listed
    #: a lone file's identity (io.storage.identity_of) as its listing's HEAD found it: the
    #: version the copy is of, which its shard takes instead of asking again
    identity: dict[str, Any] | None = None


class StagedFile:
    """A ready local copy, pinned (never evicted) until :meth:`close`."""

    def __init__(self, path: str, unpin: Any, etag: str | None = None,
                 identity: dict[str, Any] | None = None):
        self.path, self._unpin = path, unpin
        self.etag = etag  # the object's version the copy is of, where the listing gave one
        self.identity = identity  # that version's size, ETag and mtime (a lone file's), else None

    def close(self) -> None:
        if self._unpin is not None:
            self._unpin()
            self._unpin = None

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_name(uri: str) -> str:
    """A file name for ``uri``'s copy: its own name, made safe and short."""
    from gpubatch.core.files import safe_filename

    return safe_filename(uri_name(uri) or "file", 120)
