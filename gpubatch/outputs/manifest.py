"""The manifest: which shards are committed, with checksums, so ``--resume`` skips exactly those.

Dask keeps no state across a failure, so gpubatch keeps its own. One small JSON file per committed
shard (its :class:`ShardResult`), written atomically after the shard's outputs are in place: a
crash at any instant leaves a shard either fully recorded or absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpubatch.core.files import file_sha256, write_json_atomic
from gpubatch.core.results import ShardResult
from gpubatch.outputs.layout import TMP_PREFIX, OutputLayout, part_name


class Manifest:
    def __init__(self, outdir: str | Path):
        self.layout = OutputLayout(outdir)
        self.dir = self.layout.manifest

    def record(self, result: ShardResult) -> None:
        write_json_atomic(self.dir / f"{result.shard_id}.json", result.to_dict())

    def entries(self) -> dict[str, ShardResult]:
        if not self.dir.is_dir():
            return {}
        out = {}
        for p in sorted(self.dir.glob("*.json")):
            if not p.name.startswith(TMP_PREFIX):
                entry = ShardResult.from_dict(json.loads(p.read_text()))
                out[entry.shard_id] = entry
        return out

    def committed(self) -> dict[str, ShardResult]:
        """Entries whose parquet part still exists with the recorded checksum."""
        good = {}
        for sid, entry in self.entries().items():
            part = self.layout.parts / (entry.part or part_name(sid))
            if part.exists() and file_sha256(part, cached=False) == entry.sha256:
                good[sid] = entry
        return good

    def clear(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.glob("*.json"):
                p.unlink()
