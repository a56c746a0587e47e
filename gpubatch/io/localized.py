"""Remote files a library needs as a local path (a model on object storage): fetched once per
host and version into gpubatch's cache, and found there again without a request.

A run asks a remote model's version once, on the client (one HEAD: size, ETag or mtime), and
every check the client makes of the model (``validate``'s, the spec record's, the preparation's,
a resume's) takes that answer: :func:`versions_asked_once` holds it for the run. The client hands
it to the workers (``RunContext.model_version``), which find the copy kept under that version
with no request at all; a host without one fetches the bytes of that very version (obstore's
reads carry ``If-Match``; fsspec's cannot, so the object is asked again after them), so a worker
never loads another version than the client checked, and a file written over mid-run fails the
fetch (InputChanged) instead of being kept under the old version's name. The next run asks
again, so an object written over between runs is fetched anew.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpubatch.core.files import cache_root, write_bytes_atomic
from gpubatch.io.retry import changed_while_read
from gpubatch.io.storage import identity_differs, identity_of, open_ranges, stat
from gpubatch.io.uris import is_remote, local_path, uri_name

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

#: the versions asked in this block (:func:`versions_asked_once`), by URI and options; None outside
_asked: contextvars.ContextVar[dict[str, dict[str, Any]] | None] = contextvars.ContextVar(
    "gpubatch_versions_asked", default=None)


@contextlib.contextmanager
def versions_asked_once() -> Iterator[None]:
    """Within the block (a run's client, ``validate``), a remote file's version is asked once and
    that answer taken by every later :func:`remote_version` and :func:`localize` of it: the run
    uses one version throughout, in one HEAD. Outside a block (or in another thread), each call
    asks, so a long-lived process never keeps a version past the run that asked it."""
    token = _asked.set({})
    try:
        yield
    finally:
        _asked.reset(token)


def remote_version(uri: str, options: dict[str, Any] | None = None,
                   clocks: StageClocks | None = None) -> dict[str, Any]:
    """{size, etag, mtime} of a remote file (:func:`gpubatch.io.storage.identity_of`'s form):
    one HEAD, or none where this run asked already. A missing file raises InputError."""
    asked = _asked.get()
    key = uri + "\n" + json.dumps(options or {}, sort_keys=True, default=str)
    if asked is not None and key in asked:
        return asked[key]
    version = identity_of(uri, stat(uri, options, clocks=clocks))
    if asked is not None:
        asked[key] = version
    return version


def version_if_remote(uri: str | None, options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """:func:`remote_version` of a remote file, None for a local one (or none): what the client hands its
    workers for each model file a run loads (``RunContext.model_version``, ``slide_model_version``)."""
    return remote_version(uri, options) if uri and is_remote(uri) else None


def cached_copy(uri: str, version: dict[str, Any]) -> Path:
    """Where the copy of ``uri`` at ``version`` is kept on this host: named by the URI (its query
    left out: a presigned URL's signature changes, the object does not) and the version."""
    tag = f"{uri.split('?', 1)[0]}|{version['size']}|{version.get('etag') or version.get('mtime')}"
    digest = hashlib.sha1(tag.encode()).hexdigest()
    return cache_root() / "remote" / digest[:16] / (uri_name(uri) or "file")


def localize(uri: str, options: dict[str, Any] | None = None, version: dict[str, Any] | None = None,
             clocks: StageClocks | None = None) -> str:
    """A local path for a file that may be remote: a local one as it is; a remote one's copy at
    ``version`` (the client's answer, which a worker is handed: no request where the copy is
    here), else at the version asked now (:func:`remote_version`), fetched if not kept yet."""
    if not is_remote(uri):
        return local_path(uri)
    version = version or remote_version(uri, options, clocks)
    target = cached_copy(uri, version)
    if not target.exists():
        write_bytes_atomic(target, _fetch(uri, options, version, clocks))
    return str(target)


def _fetch(uri: str, options: dict[str, Any] | None, version: dict[str, Any],
           clocks: StageClocks | None) -> bytes:
    """The bytes of ``uri`` at ``version``: obstore's reads pinned to its ETag (If-Match: another
    version is refused by the read); fsspec's, which cannot be, checked by a HEAD after them. A
    size known skips the reader's own HEAD for it. InputChanged where it is another version."""
    size = int(version.get("size") or 0)
    with open_ranges(uri, options, clocks, etag=version.get("etag")) as reader:
        data = bytes(reader.fetch(0, size or reader.size()))
        pinned = reader.version() is not None
    if size and len(data) != size:
        raise changed_while_read(uri, f"{size} bytes expected, {len(data)} read")
    if not pinned:
        now = identity_of(uri, stat(uri, options, clocks=clocks))
        if identity_differs(version, now):
            raise changed_while_read(uri, f"ETag {version.get('etag')} -> {now.get('etag')}, "
                                          f"size {version.get('size')} -> {now.get('size')}")
    return data
