"""`gpubatch inspect`: what a slide, ONNX model, genome store or results folder holds.

A slide is anything a job reads: a TIFF-family or openslide file, an OME-Zarr image or a DICOM-WSI
series (a folder or any of its files), local or remote; slides show allowlisted metadata only.
Storage options come from the standard environment (``AWS_*``, including ``AWS_ENDPOINT_URL``) or
the ``options`` argument. Models show what a job must match (each input's shape and element type),
their outputs, opsets and the sha256 the audit trail records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import GpubatchError


def _tensor(value: Any) -> dict[str, Any]:
    from gpubatch.runtime.model_facts import onnx_dtype_name

    t = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": value.name, "shape": shape, "dtype": onnx_dtype_name(t.elem_type)}


def inspect_model(path: str) -> dict[str, Any]:
    """An ONNX model's inputs (shape: ints fixed, names dynamic), outputs, opsets, sha256, size."""
    import onnx

    from gpubatch.core.files import file_sha256

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and onnx's own: one line, no traceback
        raise GpubatchError(f"{path}: not an ONNX model onnx can read ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from None
    initializers = {i.name for i in model.graph.initializer}
    return {
        "model": path, "format": "onnx", "bytes": Path(path).stat().st_size, "sha256": file_sha256(path),
        "inputs": [_tensor(i) for i in model.graph.input if i.name not in initializers],
        "outputs": [_tensor(o) for o in model.graph.output],
        "opset": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "ir_version": model.ir_version, "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }


def inspect_path(path: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".onnx":
        return inspect_model(path)
    if p.is_dir() and (p / "report.json").exists():
        from gpubatch.report.summary import load_report

        report = load_report(str(p))
        keys = ("name", "run_id", "state", "complete", "items", "items_per_s", "wall_s", "starvation", "verdict", "failed")
        return {k: report.get(k) for k in keys}  # complete: None in reports older than the key
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
