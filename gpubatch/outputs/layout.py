"""Every file name in an output, in one place.

Readers and writers of an output (the writer, the manifest, the runner's cleanup, ``status``,
``report``, ``open_results``) name files only through this module, so a new output is added here
once and every cleanup and listing sees it.

A shard's results are written under a unique *attempt* name (its parquet part and zarr group) and
are never renamed (object stores cannot); the shard's commit record, written last, names the
attempt that is the shard's result. Files of attempts no record names are left by killed or
superseded attempts, and are swept.
"""

from __future__ import annotations

import uuid

PREDICTIONS = "predictions.parquet"
ZARR = "predictions.zarr"
#: slides with a slide_model: one row per slide (slide, tiles, then the head's slide-level outputs)
SLIDE_PREDICTIONS = "slide_predictions.parquet"
#: one QuPath-importable FeatureCollection per slide, named by the slide's key (``geojson`` format)
GEOJSON_DIR = "geojson"
#: one PNG per slide: its tile grid coloured by an output, named by the slide's key
HEATMAPS_DIR = "heatmaps"
#: the single GeoJSON of all slides that runs before per-slide files wrote (removed by a new run)
LEGACY_GEOJSON = "predictions.geojson"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
AUDIT = "audit.jsonl"
STATUS = "status.json"
#: committed per-shard parquet parts, merged into PREDICTIONS at the end of a run
PARTS_DIR = "_parts"
#: one commit record per committed shard (what ``--resume`` trusts)
MANIFEST_DIR = "_manifest"
#: reduced-precision models made for this output (quantized once, reused by resumes)
MODELS_DIR = "_models"
#: worker job logs of batch clusters (SLURM), one folder per run
LOGS_DIR = "_logs"
#: the audit ledger's records (run events, failures, superseded commits); audit.jsonl is their view
AUDIT_DIR = "_audit"
#: written on first use: a folder without it that holds files is not gpubatch's to write into
MARKER = ".gpubatch-output"
#: who is writing this output now (host, pid, heartbeat); see outputs.lease
LEASE = "_lease.json"
#: the result-changing spec fields and model sha256 the committed shards were made with
SPEC_RECORD = "_spec.json"
#: the prefix of every temporary name; a finished output holds none
TMP_PREFIX = ".tmp-"

#: files a run writes at the top of the folder (recreated by every run)
RUN_FILES = (PREDICTIONS, SLIDE_PREDICTIONS, LEGACY_GEOJSON, REPORT_JSON, REPORT_HTML, AUDIT, STATUS)
#: folders a run writes (shards' results and their records, per-slide pictures and GeoJSON)
RUN_DIRS = (PARTS_DIR, ZARR, MANIFEST_DIR, AUDIT_DIR, GEOJSON_DIR, HEATMAPS_DIR)
#: what ``--overwrite`` removes: everything a run writes except the marker, the lease and cached models
RUN_STATE = (*RUN_FILES, *RUN_DIRS, SPEC_RECORD)


def new_attempt() -> str:
    """A unique name for one attempt at a shard: its files are written under it, never renamed."""
    return "a" + uuid.uuid4().hex[:10]


def part_name(shard_id: str, attempt: str) -> str:
    """The parquet part of one attempt, under PARTS_DIR."""
    return f"{shard_id}-{attempt}.parquet"


def group_name(shard_id: str, attempt: str) -> str:
    """The zarr group of one attempt, under ZARR."""
    return f"{shard_id}-{attempt}"


def geojson_name(key: str) -> str:
    """A slide's GeoJSON under GEOJSON_DIR; ``key`` is the slide's safe key, never its URI."""
    return f"{key}.geojson"


def heatmap_name(key: str) -> str:
    """A slide's heatmap under HEATMAPS_DIR; ``key`` is the slide's safe key, never its URI."""
    return f"{key}.png"


def record_name(shard_id: str) -> str:
    """The commit record of a shard, under MANIFEST_DIR: written last, it makes an attempt the result."""
    return f"{shard_id}.json"
