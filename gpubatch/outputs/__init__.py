"""Result writers (parquet, zarr), the shard manifest that makes resume exact, and the audit log."""

from gpubatch.outputs.manifest import Manifest
from gpubatch.outputs.writer import ShardWriter, merge_parquet

__all__ = ["Manifest", "ShardWriter", "merge_parquet"]
