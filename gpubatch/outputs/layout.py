"""Every file name in an output folder, in one place.

Readers and writers of an output (the writer, the manifest, the runner's cleanup, ``status``,
``report``, ``open_results``) name files only through this module, so a new output is added here
once and every cleanup and listing sees it.
"""

from __future__ import annotations

from pathlib import Path

PREDICTIONS = "predictions.parquet"
ZARR = "predictions.zarr"
GEOJSON = "predictions.geojson"
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
#: the prefix of every temporary name; a finished output holds none
TMP_PREFIX = ".tmp-"

#: files a run writes at the top of the folder (recreated by every run)
RUN_FILES = (PREDICTIONS, GEOJSON, REPORT_JSON, REPORT_HTML, AUDIT, STATUS)
#: folders a run writes (shards' results and their records)
RUN_DIRS = (PARTS_DIR, ZARR, MANIFEST_DIR)


def part_name(shard_id: str) -> str:
    return f"{shard_id}.parquet"


class OutputLayout:
    """Paths of one output folder's files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    @property
    def predictions(self) -> Path:
        return self.root / PREDICTIONS

    @property
    def zarr(self) -> Path:
        return self.root / ZARR

    @property
    def parts(self) -> Path:
        return self.root / PARTS_DIR

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_DIR

    def part(self, shard_id: str) -> Path:
        return self.parts / part_name(shard_id)
