"""The audit trail: what produced each result (input identity, model, versions, where, when)."""

from __future__ import annotations

from typing import Any

from gpubatch.core.results import ShardResult
from gpubatch.io.storage import input_identity


def audit_line(result: ShardResult, run: dict[str, Any], extra: dict[str, Any],
               storage: dict[str, Any] | None = None) -> dict[str, Any]:
    """One audit.jsonl line for a finished shard: its input's identity, the model, where, when."""
    return {
        "shard_id": result.shard_id, "input": result.input, "status": result.status,
        **input_identity(result.input, storage), "items": result.items, "error": result.error,
        **run, "host": result.host, "pid": result.pid, "start": result.start, "end": result.end,
        "attempt": result.attempt, **extra,
    }
