"""Sources: how each kind of input becomes shards and item blocks. Found by name, lazily."""

from __future__ import annotations

import importlib

from gpubatch.sources.base import ItemBlock, ReadUnit, Shard, ShardReader, Source

_SOURCES = {
    "slides": ("gpubatch.sources.slides.source", "SlideSource"),
    "genome": ("gpubatch.sources.genome.source", "GenomeSource"),
}


def get_source(kind: str) -> Source:
    try:
        module, cls = _SOURCES[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}; known: {sorted(_SOURCES)}") from None
    return getattr(importlib.import_module(module), cls)()


__all__ = ["ItemBlock", "ReadUnit", "Shard", "ShardReader", "Source", "get_source"]
