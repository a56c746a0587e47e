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

Small files read whole (a FASTA's ``.fai`` and ``.gzi``: :func:`read_small`) take the same
answer: the run's result fields ask their version, and the plan's read is of that version (one
GET, pinned), with no HEAD of its own. Outside a run (a worker), obstore's one GET says the
version it read beside its bytes: no HEAD either.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpubatch.core.errors import InputChanged, InputError
from gpubatch.core.files import cache_root, write_bytes_atomic
from gpubatch.io.redact import redact
from gpubatch.io.retry import changed_while_read, storage_error
from gpubatch.io.storage import (
    file_version,
    identity_differs,
    identity_of,
    obstore_reads,
    open_ranges,
    stat,
    version_text,
)
from gpubatch.io.uris import is_remote, local_path, uri_name

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

#: bytes a small file's first read asks for where its size is not known: a .fai of 10,000
#: contigs, a human genome's .gzi (46,000 blocks, 740 kB) in one request; a larger one takes two
FIRST_READ_BYTES = 1 << 20

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
    known = _asked_before(uri, options)
    if known is not None:
        return known
    version = identity_of(uri, stat(uri, options, clocks=clocks))
    _remember(uri, options, version)
    return version


def _asked_key(uri: str, options: dict[str, Any] | None) -> str:
    return uri + "\n" + json.dumps(options or {}, sort_keys=True, default=str)


def _asked_before(uri: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The version this run asked of ``uri`` already (no request), None where it did not."""
    asked = _asked.get()
    return asked.get(_asked_key(uri, options)) if asked is not None else None


def _remember(uri: str, options: dict[str, Any] | None, version: dict[str, Any]) -> None:
    asked = _asked.get()
    if asked is not None:
        asked[_asked_key(uri, options)] = version


def run_file_version(uri: str, options: dict[str, Any] | None = None) -> str | None:
    """:func:`gpubatch.io.storage.file_version` of a file, a remote one's asked once per run
    (:func:`remote_version`): the version the run's result fields record is the one its plan
    then reads (:func:`read_small`), with no HEAD of its own. None where there is no such file."""
    if not is_remote(uri):
        return file_version(uri, options)
    try:
        return version_text(remote_version(uri, options))
    except InputError:
        return None


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


def read_small(uri: str, options: dict[str, Any] | None = None,
               clocks: StageClocks | None = None) -> tuple[bytes, dict[str, Any] | None]:
    """A small remote file whole (a FASTA's index) and the version those bytes are of
    (:func:`remote_version`'s form), in as few requests as its client allows:

    * the version this run asked already: its bytes read pinned to it (obstore: If-Match, one
      GET); fsspec cannot pin, so a HEAD after the read checks it is still that version;
    * else through obstore: one GET of the first :data:`FIRST_READ_BYTES`, whose answer carries
      the object's size and ETag (no HEAD), the rest, if any, read pinned to that ETag;
    * else (fsspec): the version asked first (a HEAD), then as above.

    InputChanged where it changed while read, or since this run asked its version (the plan read
    it: the plan's windows were cut by the other one); a missing file is the read's own 404."""
    asked = _asked_before(uri, options)
    if asked is None and obstore_reads(uri, options):
        return _read_unasked(uri, options, clocks)
    version = asked or remote_version(uri, options, clocks)
    try:
        return _fetch(uri, options, version, clocks), version
    except InputChanged as exc:
        if asked is None:
            raise
        raise InputChanged(redact(uri), f"{redact(uri)} changed since this run asked its version ({exc.detail}): "
                           "the run was planned with the other one; run the job again (--overwrite) to plan "
                           "with this one", detail=exc.detail) from exc


def _read_unasked(uri: str, options: dict[str, Any] | None,
                  clocks: StageClocks | None) -> tuple[bytes, dict[str, Any] | None]:
    """:func:`read_small` through obstore of a file whose version nobody asked: its first GET's
    answer says it. An empty object answers a ranged GET 416: asked by a HEAD then."""
    with open_ranges(uri, options, clocks) as reader:
        (first,) = reader.fetch_spans([(0, FIRST_READ_BYTES)])
        if first.error is not None:
            error = storage_error(uri, first.error)
            if "416" not in error.message:
                raise error
            version = identity_of(uri, stat(uri, options, clocks=clocks))
            if version["size"]:
                raise error
            return b"", version
        answered = reader.answered()
        data = bytes(first.data or b"")
        if answered is None:  # no answer to say the version: (auto) switched to fsspec
            return data + reader.fetch(len(data), reader.size()), None
        if answered["size"] > len(data):  # pinned to the first answer's ETag where it is strong
            data += reader.fetch(len(data), answered["size"])
    version = identity_of(uri, answered)
    _remember(uri, options, version)
    return data, version
