"""The audit trail: what produced each result (input identity, model, versions, where, when)."""

from __future__ import annotations

from typing import Any

from gpubatch.io.storage import input_identity

__all__ = ["input_identity", "audit_line"]


def audit_line(result: dict[str, Any], run: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One audit.jsonl line for a finished shard: its input's identity, the model, where, when."""
    return {
        "shard_id": result["shard_id"], "input": result["input"], "status": result["status"],
        **input_identity(result["input"]), "items": result.get("items", 0),
        "error": result.get("error"), **run, "host": result.get("host"), "pid": result.get("pid"),
        "start": result.get("start"), "end": result.get("end"), **extra,
    }
