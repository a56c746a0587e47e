"""Input patterns expanded into the URIs a job reads: literal names first, globs on local disk
and object storage, one file however it is spelled.

Kept apart from io/storage.py (the storage entry point: filesystems, readers, identities), which
this uses to list and to test existence.
"""

from __future__ import annotations

import glob as _glob
import logging
import os
from typing import Any

from gpubatch.core.errors import InputError
from gpubatch.io.redact import redact
from gpubatch.io.retry import RetryPolicy, call_with_retries
from gpubatch.io.storage import exists, get_fs
from gpubatch.io.uris import has_magic, is_remote, local_path, protocol_of, spelled_as, split_glob

log = logging.getLogger("gpubatch")


def _glob_remote(fs: Any, path: str, pattern: str) -> list[str]:
    """Matching object names; a missing bucket or prefix matches nothing."""
    try:
        # A listing is several requests and happens once, at plan time: be patient with it.
        return sorted(call_with_retries(lambda: fs.glob(path), pattern, RetryPolicy(attempts=10)))
    except InputError as exc:
        if "not found" in exc.message:
            return []
        raise


def expand_uris(patterns: list[str], options: dict[str, Any] | None = None) -> list[str]:
    """Expand input patterns into a sorted, de-duplicated list of URIs: literal before glob.

    A name that exists is that file, even when it holds ``[ ] * ?`` (``slide[1].svs`` is not a
    glob for ``slide1.svs``); glob characters expand only when no file has the literal name, or
    always behind the ``glob:`` prefix (``glob:slides/[ab].svs``). http(s) URLs are never globs
    (their ``?`` starts a query, which may carry a signature). Remote names without a glob are
    kept as given: existence is checked on the worker, where a missing object quarantines just
    that slide.
    """
    out: list[str] = []
    seen: dict[str, str] = {}  # one file, however spelled -> the first spelling
    for given in patterns:
        pattern, forced = split_glob(given)
        for uri in _expand_one(pattern, forced, options):
            same = _file_key(uri)
            if same in seen:
                if seen[same] != uri:
                    log.warning("input %s is the file %s names too: read once", redact(uri), redact(seen[same]))
                continue
            seen[same] = uri
            out.append(uri)
    return out


def _file_key(uri: str) -> str:
    """What makes two inputs one file: a local path's real path (``a/./b``, ``a//b``, ``a/../a/b``
    and a symlink to it are one file, read once), a remote URI as given."""
    return uri if is_remote(uri) else os.path.realpath(uri)


def _expand_one(pattern: str, forced: bool, options: dict[str, Any] | None) -> list[str]:
    if protocol_of(pattern) in ("http", "https"):
        return [pattern]
    if is_remote(pattern):
        magic = has_magic(pattern.split("://", 1)[1])
        if not forced and (not magic or exists(pattern, options)):
            return [pattern]
        fs, path = get_fs(pattern, options)
        return [spelled_as(pattern, fs.unstrip_protocol(p)) for p in _glob_remote(fs, path, pattern)
                if not p.endswith("/")]
    path = local_path(pattern)
    if not forced and os.path.exists(path):
        return [path]
    return sorted(_glob.glob(path)) if forced or has_magic(path) else []
