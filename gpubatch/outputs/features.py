"""Tile features read back for multiple-instance learning: one slide's (N, D) bag and its coordinates.

Embeddings are too wide for predictions.parquet (past ``MAX_PARQUET_WIDTH`` values an output goes to
zarr only), so MIL code reads them from predictions.zarr: one group per slide (the root's ``groups``
attribute maps each slide's key to it), holding ``x``, ``y``, ``level`` and every model output
as arrays whose first axis is the tile, in the same order as the slide's rows of
predictions.parquet (docs/outputs.md has the layout).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubatch.core.errors import GpubatchError
from gpubatch.outputs.layout import ZARR
from gpubatch.outputs.store import OutputStore

COORDINATES = ("x", "y", "level")


def read_features(store: OutputStore, names: list[str], output: str | None = None) -> tuple[np.ndarray, Any]:
    """(features (N, D) float32, DataFrame of x, y, level) of the first of ``names`` (a slide's
    key, or its URI) that is a committed slide of the output.

    ``output`` names the model output (default: the model's first). A slide with no tiles gives
    (0, D) features and an empty frame.
    """
    import pandas as pd

    groups = committed_groups(store)
    key = next((n for n in names if n in groups), None)
    if key is None:
        known = ", ".join(sorted(groups)) or "none"
        raise GpubatchError(f"no features for {names[0]!r} in {store.url(ZARR)} (quarantined, not "
                            f"computed yet, or not an input of this run); slides there: {known}")
    slide: Any = store.zarr_group(f"{ZARR}/{groups[key]}", mode="r")
    recorded = slide.attrs.get("outputs")
    outputs = list(recorded) if isinstance(recorded, list) else sorted(set(slide.array_keys()) - set(COORDINATES))
    name = output or (outputs[0] if outputs else None)
    if name is None or name not in slide:
        raise GpubatchError(f"slide {key!r} has no output {name!r}; its outputs: {outputs}")
    values = np.asarray(slide[name][:], dtype=np.float32)
    coords = pd.DataFrame({c: np.asarray(slide[c][:]) for c in COORDINATES if c in slide})
    return values.reshape(len(values), int(np.prod(values.shape[1:]))), coords


def committed_groups(store: OutputStore) -> dict[str, str]:
    """Slide key -> the zarr group of its committed attempt: from the zarr root's attributes of a
    finished run, else from the commit records (a run still going, or interrupted)."""
    if not store.exists(ZARR):
        raise GpubatchError(f"{store.url()} holds no {ZARR}: add zarr to output.formats to keep features")
    groups = store.zarr_group(ZARR, mode="r").attrs.get("groups")
    if isinstance(groups, dict) and groups:
        return {str(k): str(v) for k, v in groups.items()}
    from gpubatch.outputs.manifest import Manifest

    return {sid: e.group for sid, e in Manifest(store).entries().items() if e.group}
