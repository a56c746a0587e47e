"""Storage through fsspec: URI expansion, opening slides for streaming or local reads.

Local paths are read with pread on the file's own descriptor; remote URIs go through fsspec.
"""

from __future__ import annotations

import glob as _glob
import os
from typing import TYPE_CHECKING, Any

from gpubatch.errors import InputError
from gpubatch.spec import is_remote

if TYPE_CHECKING:
    from gpubatch.engine.clocks import StageClocks
    from gpubatch.sources.wsi import SlideBackend
    from gpubatch.spec import JobSpec


def _local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def expand_uris(patterns: list[str], options: dict[str, Any] | None = None) -> list[str]:
    """Expand globs (local or remote) into a sorted, de-duplicated list of URIs."""
    out: list[str] = []
    for pattern in patterns:
        if is_remote(pattern):
            import fsspec

            fs, _, paths = fsspec.get_fs_token_paths(pattern, storage_options=options or {})
            protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
            found = sorted(fs.unstrip_protocol(p) if "://" not in p else p for p in paths) \
                if any(c in pattern for c in "*?[") else [pattern]
            _ = protocol
        else:
            path = _local_path(pattern)
            found = sorted(_glob.glob(path)) if any(c in path for c in "*?[") else (
                [path] if os.path.exists(path) else [])
        out.extend(u for u in found if u not in out)
    return out


def open_slide_input(uri: str, job: JobSpec, clocks: StageClocks) -> SlideBackend:
    """Open a slide for reading on a worker: local files directly, remote ones through fsspec."""
    from gpubatch.sources.wsi import open_slide

    if not is_remote(uri):
        path = _local_path(uri)
        if not os.path.exists(path):
            raise InputError(uri, "file not found")
        return open_slide(path, clocks)
    raise InputError(uri, "remote slides are not supported yet")
