"""The run summary, the bottleneck verdict, and their renderings (frames, terminal text, HTML).

Floors inside: ``verdict`` (rules over figures) <- ``summary`` (report.json) <- ``frames``,
``text``, ``html`` (renderings). The names below are the package's public surface.
"""

from gpubatch.report.frames import (
    bucket_width,
    latency_frame,
    parts_frame,
    shard_frame,
    stage_frame,
    throughput_frame,
    timeline_frame,
)
from gpubatch.report.gap import gap
from gpubatch.report.summary import load_report, summarize, write_report
from gpubatch.report.text import format_summary
from gpubatch.report.verdict import (
    LAYER_BATCHING,
    LAYER_COMPUTE,
    LAYER_STORAGE,
    LAYER_TRANSFER,
    LAYERS,
    PART_LAYERS,
    verdict,
)
from gpubatch.report.words import band

__all__ = [
    "LAYERS", "LAYER_BATCHING", "LAYER_COMPUTE", "LAYER_STORAGE", "LAYER_TRANSFER", "PART_LAYERS",
    "band", "bucket_width", "format_summary", "gap", "latency_frame", "load_report", "parts_frame",
    "shard_frame", "stage_frame", "summarize", "throughput_frame", "timeline_frame", "verdict",
    "write_report",
]
