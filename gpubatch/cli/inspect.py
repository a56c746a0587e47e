"""`gpubatch inspect`: what a slide, genome store or results folder holds (allowlisted metadata only).

A slide is anything a job reads: a TIFF-family or openslide file, an OME-Zarr image or a DICOM-WSI
series (a folder or any of its files), local or remote. Storage options come from the standard
environment (``AWS_*``, including ``AWS_ENDPOINT_URL``) or the ``options`` argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpubatch.core.clocks import StageClocks


def inspect_path(path: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir() and (p / "report.json").exists():
        from gpubatch.report.summary import load_report

        report = load_report(str(p))
        return {k: report.get(k) for k in ("name", "items", "items_per_s", "wall_s", "starvation", "verdict", "failed")}
    if p.is_dir() and (p / "zarr.json").exists() and not _is_image(p):
        import zarr

        return {"genome_store": str(p), **dict(zarr.open_group(str(p), mode="r").attrs)}
    from gpubatch.sources.slides.open import open_slide_input

    backend = open_slide_input(path, StageClocks(), options=options)
    try:
        return {"slide": path, **backend.info.as_dict()}
    finally:
        backend.close()


def _is_image(folder: Path) -> bool:
    """A zarr group that is an OME-Zarr image (NGFF metadata), not a genome store."""
    import zarr

    attrs: dict[str, Any] = dict(zarr.open_group(str(folder), mode="r").attrs)
    ome = attrs.get("ome")
    nested = ome if isinstance(ome, dict) else {}
    return any(k in attrs or k in nested for k in ("multiscales", "bioformats2raw.layout"))
