"""`gpubatch inspect`: what a slide, genome store or results folder holds (allowlisted metadata only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpubatch.core.clocks import StageClocks


def inspect_path(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir() and (p / "report.json").exists():
        from gpubatch.report.summary import load_report

        report = load_report(str(p))
        return {k: report.get(k) for k in ("name", "items", "items_per_s", "wall_s", "starvation", "verdict", "failed")}
    if p.is_dir() and (p / "zarr.json").exists():
        import zarr

        return {"genome_store": str(p), **dict(zarr.open_group(str(p), mode="r").attrs)}
    from gpubatch.sources.slides.open import open_slide_input

    backend = open_slide_input(path, StageClocks())
    try:
        return {"slide": path, **backend.info.as_dict()}
    finally:
        backend.close()
