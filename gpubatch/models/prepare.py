"""Resolve the model a run will use: precision (quantize + validation gate) and batch size.

Runs once on the client before shards are submitted, so every worker loads the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpubatch.sources.base import Shard, Source
from gpubatch.spec import JobSpec


@dataclass
class PreparedModel:
    path: str
    precision: str
    batch_size: int
    report: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)


def prepare_model(job: JobSpec, source: Source, shards: list[Shard], outdir: Path) -> PreparedModel:
    batch = job.model.batch_size if isinstance(job.model.batch_size, int) else 64
    return PreparedModel(job.model.path, job.model.precision, batch)
