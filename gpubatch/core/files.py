"""File helpers every floor uses: content hashes, atomic writes, safe file names.

One of each, so that a checksum written by the outputs is the checksum the manifest verifies and
a name made safe for a staged file is made safe the same way for an output part.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

_SHA_CACHE: dict[tuple[str, float, int], str] = {}


def file_sha256(path: str | Path, *, cached: bool = True) -> str:
    """sha256 of a file's bytes; cached by (path, mtime, size) so hot paths never rehash.

    ``cached=False`` always reads the file: for checks that must see a file changed in place
    with its mtime and size kept.
    """
    st = os.stat(path)
    key = (str(path), st.st_mtime, st.st_size)
    if cached and key in _SHA_CACHE:
        return _SHA_CACHE[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=1, default=str).encode())


def safe_filename(name: str, limit: int = 80) -> str:
    """``name`` with everything but letters, digits, '-', '_' and '.' replaced by '_', cut to ``limit``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:limit]


def cache_root() -> Path:
    """gpubatch's per-user cache (tuning choices, TensorRT engines, localized remote files):
    $GPUBATCH_CACHE, else ~/.cache/gpubatch."""
    root = os.environ.get("GPUBATCH_CACHE") or str(Path.home() / ".cache" / "gpubatch")
    return Path(root)


def scratch_dir() -> Path:
    """Where the client spills what it should not hold in memory (the run's commit index, the
    audit's sorted runs): a folder of the cache, made on first use."""
    folder = cache_root() / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
