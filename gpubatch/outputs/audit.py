"""The audit trail: what produced each result (input identity, model, versions, where, when)."""

from __future__ import annotations

import os
from typing import Any

from gpubatch.spec import is_remote


def input_identity(uri: str) -> dict[str, Any]:
    """Size and mtime (local) or size and ETag (object storage) of an input, for the audit log."""
    try:
        if not is_remote(uri):
            st = os.stat(uri.removeprefix("file://"))
            return {"size": st.st_size, "mtime": st.st_mtime}
        from gpubatch.io.storage import remote_identity

        return remote_identity(uri)
    except Exception:  # noqa: BLE001 - the audit line must not fail the run
        return {"size": None}
