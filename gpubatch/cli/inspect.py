"""`gpubatch inspect`: what a slide, ONNX model, genome store, FASTA or results folder holds.

A slide is anything a job reads: a TIFF-family or openslide file, an OME-Zarr image or a DICOM-WSI
series (a folder or any of its files), local or remote; slides show allowlisted metadata only.
Genome stores, FASTA files and results folders are told apart by their contents, on disk or on
object storage alike (a genome store or a FASTA on S3 was opened as a slide and refused as one).
Storage options come from the standard environment (``AWS_*``, including ``AWS_ENDPOINT_URL``) or
the ``options`` argument. Models show what a job must match (each input's shape and element type),
their outputs, opsets and the sha256 the audit trail records.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import GpubatchError, InputError
from gpubatch.io.redact import safe_text
from gpubatch.io.uris import is_remote

#: bytes read from a file's start to tell a FASTA or a VCF (plain, gzip or bgzip) from a slide
SNIFF_BYTES = 4096
#: what a variant file ``_sniff`` tells is called, by its kind
VARIANT_KINDS = {"vcf": "a VCF", "bcf": "a BCF", "table": "a table of variants",
                 "vcf-without-header": "a VCF body without its header"}
SHOWN_CONTIGS = 20


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
    """What ``path`` holds, by its contents: a model, a results folder, a genome store, a FASTA,
    else a slide. The answer quotes ``path`` as given: print it through ``redact``."""
    p = Path(path)
    if not is_remote(path) and p.is_file() and p.suffix.lower() == ".onnx":
        return inspect_model(path)
    found = _results(path, options) or _genome_store(path, options)
    if found is not None:
        return found
    sniffed = _sniff(path, options)
    if sniffed == "fasta":
        return inspect_fasta(path, options)
    if sniffed in VARIANT_KINDS:
        raise GpubatchError(f"{safe_text(path)}: {VARIANT_KINDS[sniffed]}, which `inspect` does not describe (it "
                            "describes slides, ONNX models, genome stores, FASTA files and results folders); a job "
                            "reads it as windows.variants, and `gpubatch validate JOB` checks it")
    from gpubatch.sources.slides.open import open_slide_input

    backend = open_slide_input(path, StageClocks(), options=options)
    try:  # a NaN or infinite mpp shown as text: json.dumps writes bare NaN, which is no JSON
        return {"slide": path, **{k: _json_number(v) for k, v in backend.info.as_dict().items()}}
    finally:
        backend.close()


def _json_number(value: Any) -> Any:
    """``value``, or its text where it is a float JSON cannot hold (nan, inf)."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _results(path: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """A results folder's headline, None where ``path`` is none (no report.json in it)."""
    from gpubatch.outputs.layout import REPORT_JSON
    from gpubatch.outputs.store import OutputStore
    from gpubatch.report.summary import load_report

    if not is_remote(path) and not Path(path).is_dir():
        return None
    store = OutputStore(path, options)
    if not store.exists(REPORT_JSON):
        return None
    report = load_report(store)
    keys = ("name", "run_id", "state", "complete", "items", "items_per_s", "wall_s", "starvation", "verdict", "failed")
    return {k: report.get(k) for k in keys}  # complete: None in reports older than the key


def _genome_store(path: str, options: dict[str, Any] | None) -> dict[str, Any] | None:
    """A genome store's attributes, None where ``path`` is no zarr or an OME-Zarr image. A zarr
    with neither is refused: an ingest that did not finish (or is still writing) was shown as a
    genome store with no contigs, exit 0."""
    from gpubatch.io.storage import exists
    from gpubatch.sources.genome.reference import GENOME_ATTR, open_genome_group, zarr_marker

    if not is_remote(path) and not Path(path).is_dir():
        return None
    if not exists(zarr_marker(path), options):
        return None
    attrs: dict[str, Any] = dict(open_genome_group(path, options).attrs)
    if _is_image(attrs):
        return None
    genome = attrs.get(GENOME_ATTR)
    if not isinstance(genome, dict) or not genome.get("complete"):
        raise InputError(path, "a zarr store that is neither an OME-Zarr image nor a complete genome store "
                               f"(no complete '{GENOME_ATTR}' attribute): a `gpubatch ingest genome` into it "
                               "did not finish, or is still writing; runs refuse it. Ingest again with --overwrite")
    return {"genome_store": path, **attrs, GENOME_ATTR: genome_summary(genome)}


def _is_image(attrs: dict[str, Any]) -> bool:
    """A zarr group's attributes are an OME-Zarr image's (NGFF metadata), not a genome store's."""
    ome = attrs.get("ome")
    nested = ome if isinstance(ome, dict) else {}
    return any(k in attrs or k in nested for k in ("multiscales", "bioformats2raw.layout"))


def _sniff(path: str, options: dict[str, Any] | None) -> str | None:
    """'fasta', or a variant file's kind (``VARIANT_KINDS``), from a file's first bytes (inflated
    where gzip or bgzip; a table or VCF body told by ``variant_files``' rules), else None
    (a folder, a missing file, anything else: the slide opening says what it is)."""
    from gpubatch.io.storage import open_file

    if not is_remote(path) and not Path(path).is_file():
        return None
    try:  # a stream, not a range read: a server that sends no length is read too
        with open_file(path, options) as f:
            head = f.read(SNIFF_BYTES)
    except (InputError, OSError):
        return None  # a prefix, a missing object: said by the slide opening
    if head[:2] == b"\x1f\x8b":
        head = zlib.decompressobj(31).decompress(head)
    text = head.lstrip()
    if text.startswith(b"##fileformat=VCF"):
        return "vcf"
    if text.startswith(b"BCF"):
        return "bcf"
    if text.startswith(b">"):
        return "fasta"
    from gpubatch.sources.genome.variant_files import text_layout_kind

    return text_layout_kind(text.decode("utf-8", "replace").rsplit("\n", 1)[0])


def inspect_fasta(path: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A FASTA's form and contig table as a job reads it (its .fai, checked against it); one
    without the indexes a job needs is refused by their absence, naming how to make them."""
    from gpubatch.sources.genome.reference import load_contigs

    contigs = load_contigs(path, options)
    return {"fasta": path, "format": contigs.format, **contig_summary(contigs.names, contigs.lengths),
            "index_version": contigs.index_version}


def contig_summary(names: Sequence[str], lengths: Sequence[int]) -> dict[str, Any]:
    """A contig table told in a screenful: a draft assembly's 500,000 scaffolds printed one per
    line buried the answer (and took minutes to scroll past)."""
    summary: dict[str, Any] = {"contigs": len(names), "bases": int(sum(lengths)),
                               "lengths": dict(zip(names[:SHOWN_CONTIGS], lengths[:SHOWN_CONTIGS], strict=True))}
    if len(names) > SHOWN_CONTIGS:
        summary["lengths_shown"] = f"the first {SHOWN_CONTIGS} of {len(names):,} contigs"
    return summary


def genome_summary(genome: dict[str, Any]) -> dict[str, Any]:
    """A genome store's attribute with its per-contig lists (names, lengths, packed offsets)
    told as a contig summary and counts."""
    told = {k: v for k, v in genome.items() if k not in ("contigs", "lengths", "layout")}
    told.update(contig_summary(list(genome.get("contigs") or []), list(genome.get("lengths") or [])))
    layout = genome.get("layout")
    if isinstance(layout, dict):
        offsets = layout.get("offsets") or []
        told["layout"] = {**{k: v for k, v in layout.items() if k not in ("offsets", "arrays")},
                          "packed_contigs": sum(o is not None for o in offsets),
                          "own_arrays": len(offsets) - sum(o is not None for o in offsets)}
    return told
