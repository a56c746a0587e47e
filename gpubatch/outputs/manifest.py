"""The manifest: which shards are committed, with checksums, so ``--resume`` skips exactly those.

Dask keeps no state across a failure, so gpubatch keeps its own. One small JSON file per committed
shard, written atomically after the shard's outputs are in place: a crash at any instant leaves a
shard either fully recorded or absent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gpubatch.core.files import file_sha256, write_json_atomic
from gpubatch.outputs.writer import PARTS_DIR

MANIFEST_DIR = "_manifest"


class Manifest:
    def __init__(self, outdir: str | Path):
        self.outdir = Path(outdir)
        self.dir = self.outdir / MANIFEST_DIR

    def record(self, entry: dict[str, Any]) -> None:
        write_json_atomic(self.dir / f"{entry['shard_id']}.json", entry)

    def entries(self) -> dict[str, dict[str, Any]]:
        if not self.dir.is_dir():
            return {}
        out = {}
        for p in sorted(self.dir.glob("*.json")):
            if not p.name.startswith(".tmp-"):
                entry = json.loads(p.read_text())
                out[entry["shard_id"]] = entry
        return out

    def committed(self) -> dict[str, dict[str, Any]]:
        """Entries whose parquet part still exists with the recorded checksum."""
        good = {}
        for sid, entry in self.entries().items():
            part = self.outdir / PARTS_DIR / entry.get("part", f"{sid}.parquet")
            if part.exists() and file_sha256(part, cached=False) == entry.get("sha256"):
                good[sid] = entry
        return good

    def clear(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.glob("*.json"):
                p.unlink()
