"""A genome reference opened in whichever form it is stored: a FASTA (plain or bgzip, with its
indexes) or a genome zarr from ``gpubatch ingest``. Apart from both readers' modules, which the
zarr one's importing the FASTA one's base would otherwise make a cycle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpubatch.core.errors import InputError
from gpubatch.sources.genome.reference import FastaReference, Reference, reference_format
from gpubatch.sources.genome.zarr_reference import ZarrReference

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks


#: the forms a reference is read in (what :func:`reference_format` answers)
FORMATS = ("zarr", "bgzip", "fasta")


def open_reference(uri: str, storage_options: dict[str, Any] | None = None,
                   clocks: StageClocks | None = None, fmt: str | None = None,
                   planned_index: str | None = None, planned: dict[str, Any] | None = None) -> Reference:
    """Open a reference in whichever form it is stored; raises InputError naming what is missing.

    ``fmt``: the form the plan found (a shard's ``reference_format``), taken without a request;
    None asks the reference (3 requests, a HEAD of ``zarr.json`` among them). ``planned_index``:
    the shard's ``index_version``, under which an index already read may be reused. ``planned``:
    the reference's identity as planned (a shard's ``reference_identity``: the FASTA's, or a
    genome zarr's ``zarr.json``'s), held to."""
    if fmt is None:
        fmt = reference_format(uri, storage_options)
    elif fmt not in FORMATS:
        raise InputError(uri, f"the shard says the reference is '{fmt}', not one of {', '.join(FORMATS)}: "
                              "the run's plan is from another gpubatch; run the job again (--overwrite)")
    if fmt == "zarr":
        return ZarrReference(uri, storage_options, clocks, planned)
    return FastaReference(uri, storage_options, fmt, clocks, planned_index, planned)
