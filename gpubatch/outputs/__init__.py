"""Result writers (parquet, zarr) on a local folder or object storage, committed per shard; the
manifest that makes resume exact; the audit ledger; the output's guard and lease."""

from gpubatch.outputs.manifest import Manifest
from gpubatch.outputs.merge import merge_parquet
from gpubatch.outputs.store import OutputStore
from gpubatch.outputs.writer import ShardWriter

__all__ = ["Manifest", "OutputStore", "ShardWriter", "merge_parquet"]
