"""RunContext: what the client resolved once for a whole run and every worker reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunContext:
    """Settings the client resolved once for the whole run (model file after quantization, ...)."""

    #: the output's URI (local folder or object-store prefix) and its storage options
    outdir: str
    model_path: str
    backend: str
    precision: str
    batch_size: int
    threads: int | None
    model_sha256: str
    spec_hash: str
    version: str
    #: per-item confidence fallback (``model.fallback``): the fp32 model low-confidence items are
    #: re-run on, and the top-probability threshold below which an item counts as low-confidence
    fallback_model_path: str | None = None
    fallback_max_prob: float | None = None
    #: the profile's ``storage`` (fsspec options) and ``stage_cache`` settings, applied per worker
    storage_profile: dict[str, Any] | None = None
    output_options: dict[str, Any] | None = None
    #: the run that writes the commit records, and the hash of the result-changing spec fields
    run_id: str = ""
    result_hash: str = ""
