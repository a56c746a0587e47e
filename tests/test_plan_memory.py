"""The client's plan holds what configuration bounds, not what the input's size makes it hold.

Measured with tracemalloc (Python and numpy allocations; Arrow's own pool is not traced, and the
variant table's strings live there, about 20 bytes a variant in these files)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gpubatch.cli.demo import write_synthetic_genome
from gpubatch.sources.genome import variant_table
from gpubatch.sources.genome.opening import open_reference
from gpubatch.sources.genome.reference import load_contigs
from gpubatch.sources.genome.source import GenomeSource
from gpubatch.sources.genome.variants import check_refs, read_variants
from gpubatch.spec import parse_job

pysam = pytest.importorskip("pysam")

LENGTH = 200_000


def _inputs(tmp_path: Path, n: int) -> tuple[Path, Path]:
    fasta = write_synthetic_genome(tmp_path / "g.fa", {"chr1": LENGTH}, seed=4)
    seq = "".join(line.strip() for line in fasta.read_text().splitlines()[1:])
    pos = np.sort(np.random.default_rng(1).choice(np.arange(1, LENGTH // 3, dtype=np.int64), n, replace=False))
    vcf = tmp_path / f"v{n}.vcf"
    with vcf.open("w") as f:
        f.write(f"##fileformat=VCFv4.2\n##contig=<ID=chr1,length={LENGTH}>\n"
                "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n")
        for i, p in enumerate(pos.tolist()):
            ref = seq[p - 1]
            f.write(f"chr1\t{p}\trs{i}\t{ref}\t{'A' if ref != 'A' else 'G'}\t.\t.\t.\n")
    return fasta, vcf


def _plan_peak(fasta: Path, vcf: Path) -> int:
    """Peak traced bytes of reading the variants and checking their REFs (imports done first)."""
    contigs = load_contigs(str(fasta))
    reference = open_reference(str(fasta), fmt=contigs.format)
    check_refs(read_variants(str(vcf), contigs), reference, 1 << 12)  # warm: imports, pysam
    tracemalloc.start()
    try:
        table = read_variants(str(vcf), contigs)
        check_refs(table, reference, 1 << 12)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        reference.close()


def test_planning_variants_holds_tens_of_bytes_a_variant_not_objects(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Python lists of str and int held about 270 bytes a variant, twice that while IDs were told
    apart, and the REF check's sort another 150: 600 MB of client for a million variants."""
    monkeypatch.setattr(variant_table, "CHUNK_ROWS", 2048)
    fasta, vcf = _inputs(tmp_path, 40_000)
    peak = _plan_peak(fasta, vcf)
    # arrays of positions, lines, contig codes, the REF check's order and spans: < 100 B a variant
    assert peak < 40_000 * 100, f"{peak / 40_000:.0f} traced bytes a variant"


def test_the_repeat_check_holds_one_sorted_key_at_a_time(tmp_path: Path) -> None:
    """The check for variants that repeat an earlier one stacked its four sort keys and sorted
    them at once, 72 traced bytes a variant over the table's own: the plan's peak (RSS 290 MB
    for a million SNVs, 224 MB after it). It still finds the repeats (the first three again)."""
    from gpubatch.sources.genome.variants import _repeat_notes

    fasta, vcf = _inputs(tmp_path, 40_000)
    lines = vcf.read_text().splitlines(keepends=True)
    first_records = [line for line in lines if not line.startswith("#")][:3]
    vcf.write_text("".join(lines + first_records))
    table = read_variants(str(vcf), load_contigs(str(fasta)))
    _repeat_notes(table, vcf.name)  # warm: imports, pyarrow's kernels
    tracemalloc.start()
    try:
        notes = _repeat_notes(table, vcf.name)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(notes) == 1 and notes[0].startswith("3 variant(s) repeat an earlier one"), notes
    assert peak < len(table) * 40, f"{peak / len(table):.0f} traced bytes a variant"


def test_the_ref_check_makes_its_starts_and_ends_a_block_at_a_time(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The REF check made every variant's start, end and REF length as whole columns beside its
    sort's order, 33 traced bytes a variant: now the order and one block's (about 12)."""
    monkeypatch.setattr(variant_table, "CHUNK_ROWS", 2048)
    fasta, vcf = _inputs(tmp_path, 40_000)
    contigs = load_contigs(str(fasta))
    table = read_variants(str(vcf), contigs)
    reference = open_reference(str(fasta), fmt=contigs.format)
    try:
        check_refs(table, reference, 1 << 12)  # warm: imports, pysam
        tracemalloc.start()
        try:
            match = check_refs(table, reference, 1 << 12)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        reference.close()
    assert match.all()
    assert peak < len(table) * 20, f"{peak / len(table):.0f} traced bytes a variant"


def test_variant_shards_are_cut_from_the_table_when_asked(tmp_path: Path) -> None:
    """Every shard's payload lists were built at plan time and held beside the table for the run."""
    fasta, vcf = _inputs(tmp_path, 10)
    job = parse_job({"kind": "genome", "windows": {"reference": str(fasta), "variants": str(vcf), "length": 16,
                                                   "windows_per_shard": 4},
                     "model": {"path": str(tmp_path / "m.onnx")}, "output": {"uri": str(tmp_path / "out")}})
    shards, failed = GenomeSource().plan(job)
    assert not failed and not isinstance(shards, list) and len(shards) == 3
    table = read_variants(str(vcf), load_contigs(str(fasta)))
    last = shards[-1]
    assert last.shard_id == "variants-000002" and last.n_items_hint == 2 and shards[2].payload == last.payload
    assert last.payload["pos"] == table.pos[8:] and last.payload["variant_id"] == ["rs8", "rs9"]
    assert [s.shard_id for s in shards] == ["variants-000000", "variants-000001", "variants-000002"]
    with pytest.raises(IndexError):
        shards[3]


def test_checking_a_fasta_of_many_contigs_holds_a_few_of_their_bytes(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The .fai check read 4 kB around each of up to 20,000 sampled contigs and held them all: 49 MB
    of plan for 10,000 contigs, 90 MB past 20,000."""
    from gpubatch.sources.genome import indexes

    monkeypatch.setattr(indexes, "PICKS_FETCHED", 64, raising=False)
    fasta = write_synthetic_genome(tmp_path / "c.fa", {f"ctg{i}": 600 for i in range(3000)}, seed=2)
    load_contigs(str(fasta))  # warm: imports
    indexes.forget_indexes()
    tracemalloc.start()
    try:
        contigs = load_contigs(str(fasta))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(contigs.names) == 3000
    assert peak < 3000 * 1500, f"{peak / 3000:.0f} traced bytes a contig"


def _unwrapped_fasta(path: Path, lengths: dict[str, int], packed: str) -> Path:
    """A FASTA whose contigs are one line each (``seqkit seq -w 0``), indexed by samtools (and
    bgzip-compressed, with its .gzi, where ``packed``)."""
    rng = np.random.default_rng(3)
    with path.open("wb") as f:
        for name, length in lengths.items():
            f.write(f">{name} unwrapped\n".encode())
            f.write(np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, length)].tobytes() + b"\n")
    if packed == "bgzip":
        pysam.tabix_compress(str(path), str(path) + ".gz", force=True)
        path = Path(str(path) + ".gz")
    pysam.faidx(str(path))
    return path


def _fai_check_and_first_read_peaks(fasta: Path) -> tuple[int, int]:
    """Peak traced bytes of the plan's .fai check, and of a worker's first read of chr1 (10
    bases at its end, past which its start is checked)."""
    from gpubatch.sources.genome import indexes

    peaks = []
    for step in ("plan", "read"):
        indexes.forget_indexes()
        tracemalloc.start()
        try:
            if step == "plan":
                load_contigs(str(fasta))
            else:
                reference = open_reference(str(fasta))
                n = reference.contigs.length("chr1")
                assert len(reference.fetch("chr1", n - 5, n + 5)) == 10
                reference.close()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    return peaks[0], peaks[1]


@pytest.mark.parametrize("packed", ["plain", "bgzip"])
def test_an_unwrapped_fasta_is_checked_and_read_in_bounded_memory(tmp_path: Path, packed: str) -> None:
    """The .fai checks read a contig's first line whole, and a line's width before its last base:
    of an unwrapped FASTA (one line a contig), the contig twice at plan time, and again at each
    worker's first read of it. 324 MB of plan (RSS) for a 100 Mb contig against 67 MB for 10 Mb;
    a 3 Gb genome's 24 contigs were all fetched at once."""
    peaks = {}
    for size in (1 << 20, 8 << 20):
        fasta = _unwrapped_fasta(tmp_path / f"u{size}.fa", {"chr1": size, "chr2": 1000}, packed)
        _fai_check_and_first_read_peaks(fasta)  # warm: imports
        peaks[size] = _fai_check_and_first_read_peaks(fasta)
    for step, small, big in zip(("plan", "first read"), peaks[1 << 20], peaks[8 << 20], strict=True):
        assert big < 1 << 20 and big < small + (256 << 10), f"{step}: {small} then {big} traced bytes"


@pytest.mark.parametrize("case", ["offset + 1", "length - 1", "line broken past what is read of it"])
def test_an_unwrapped_fasta_whose_fai_disagrees_is_still_refused(tmp_path: Path, case: str) -> None:
    """Its checks read kB of a one-line contig, not the line: a wrong .fai is refused all the same."""
    from gpubatch.core.errors import InputError
    from gpubatch.sources.genome import indexes

    fasta = _unwrapped_fasta(tmp_path / "u.fa", {"chr1": 4 * indexes.LINE_CHECKED, "chr2": 1000}, "plain")
    fai = Path(f"{fasta}.fai")
    first, *rest = fai.read_text().splitlines()
    name, length, offset, bases, width = (int(f) if f.isdigit() else f for f in first.split("\t"))
    if case == "line broken past what is read of it":  # the .fai still says one line
        data, cut = fasta.read_bytes(), offset + 2 * indexes.LINE_CHECKED
        fasta.write_bytes(data[:cut] + b"\n" + data[cut:])
    length, offset = {"offset + 1": (length, offset + 1), "length - 1": (length - 1, offset)}.get(case, (length, offset))
    fai.write_text("\n".join([f"{name}\t{length}\t{offset}\t{bases}\t{width}", *rest]) + "\n")
    indexes.forget_indexes()
    with pytest.raises(InputError, match="contig 'chr1'"):
        load_contigs(str(fasta))


def _run_job(tmp_path: Path, fasta: Path, vcf: Path, model: Path) -> Path:
    import yaml

    out = tmp_path / f"out-{vcf.stem}"
    job = {"name": "huge-ref", "kind": "genome",
           "windows": {"reference": str(fasta), "variants": str(vcf), "length": 32, "windows_per_shard": 16},
           "model": {"path": str(model), "backend": "onnxruntime", "batch_size": 8},
           "output": {"uri": str(out), "formats": ["parquet"]}, "run": {"profile": "inline"}}
    path = tmp_path / f"{vcf.stem}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_one_record_of_a_20_mb_ref_costs_no_memory_and_is_quarantined_by_line(tmp_path: Path) -> None:
    """One record whose REF is 20 MB long (and agrees with the reference) held about five copies of it while the plan read it
    (htslib's line and record, pysam's bytes and str), then more (upper case, its ID, the REF
    check's codes, the workers' read through it): a run's peak RSS went from 188 MB to 452 MB.
    Longer than one read of the reference holds (windows.chunk_bases), it is left out unread,
    named by its line; the other variants are scored, and the run's peak is the run's without it."""
    import pandas as pd
    from test_hostile import cli_peak

    from gpubatch.cli.demo_models import make_genome_model

    size = 20_000_000
    fasta = write_synthetic_genome(tmp_path / "g.fa", {"chr1": size + LENGTH}, seed=4)
    seq = "".join(line.strip() for line in fasta.read_text().splitlines()[1:])
    model = make_genome_model(tmp_path / "m.onnx", 32)
    header = (f"##fileformat=VCFv4.2\n##contig=<ID=chr1,length={size + LENGTH}>\n"
              "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n")
    snvs = [f"chr1\t{p}\trs{p}\t{seq[p - 1]}\t{'A' if seq[p - 1] != 'A' else 'G'}\t.\t.\t.\n"
            for p in range(1000, 41_000, 1000)]
    huge = f"chr1\t50001\t.\t{seq[50_000 : 50_000 + size]}\t{seq[50_000]}\t.\t.\t.\n"  # a deletion, REF as the reference
    plain, big = tmp_path / "plain.vcf", tmp_path / "big.vcf"
    plain.write_text(header + "".join(snvs))
    big.write_text(header + "".join(snvs[:20]) + huge + "".join(snvs[20:]))
    without, base_kib = cli_peak("run", str(_run_job(tmp_path, fasta, plain, model)))
    done, big_kib = cli_peak("run", str(_run_job(tmp_path, fasta, big, model)))
    assert big_kib < 1.1 * base_kib, f"{big_kib / 1024:.0f} MiB against {base_kib / 1024:.0f} MiB without it"
    assert without.returncode == 0, without.stdout + without.stderr
    assert done.returncode == 3, done.stdout + done.stderr  # partial: one record left out
    report = json.loads((tmp_path / "out-big" / "report.json").read_text())
    assert [f["input"] for f in report["failed"]] == ["big.vcf line 24"]
    assert report["failed"][0]["error"].startswith(
        "REF of 20,000,000 bases is longer than the 1,048,576 bases one read of the reference holds")
    assert "windows.chunk_bases to at least 20,000,000" in report["failed"][0]["error"]
    scored = pd.read_parquet(tmp_path / "out-big" / "predictions.parquet")
    assert sorted(scored["pos"]) == list(range(1000, 41_000, 1000))
