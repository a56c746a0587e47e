"""``ingest_genome``: FASTA -> genome zarr, and windows from the zarr equal windows from the FASTA."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from conftest import dna_codes, shared_file

import gpubatch.sources.genome.ingest as ingest_mod
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.sources.genome.ingest import ingest_genome
from gpubatch.sources.genome.reference import GENOME_ATTR, load_contigs, open_reference
from gpubatch.sources.genome.source import GenomeSource
from gpubatch.spec import JobSpec, parse_job

pysam = pytest.importorskip("pysam")


def job(reference: str | Path, **windows: object) -> JobSpec:
    return parse_job({"kind": "genome", "windows": {"reference": str(reference), **windows},
                      "model": {"path": "m.onnx"}, "output": {"uri": "out"}})


def windows_of(j: JobSpec) -> tuple[np.ndarray, list[tuple[str, int]]]:
    source = GenomeSource()
    shards, _ = source.plan(j)
    items, keys = [], []
    for shard in shards:
        with source.open(shard, j, StageClocks()) as reader:
            for unit in reader.read_units():
                block = unit()
                items.append(block.items)
                keys += list(zip(block.index["chrom"], block.index["start"].tolist(), strict=True))
    return np.concatenate(items), keys


def test_ingest_tangermeme_matches_pysam(tmp_path: Path) -> None:
    fa = shared_file("genomics", "tangermeme", "test.fa")
    out = tmp_path / "test.zarr"
    summary = ingest_genome(str(fa), str(out), chunk_bases=100)
    ref = pysam.FastaFile(str(fa))
    assert summary["contigs"] == list(ref.references)
    assert summary["lengths"] == list(ref.lengths)
    assert summary["bases"] == sum(ref.lengths)
    zarr_ref = open_reference(str(out))
    assert zarr_ref.format == "zarr"
    for name in ref.references:
        assert np.array_equal(zarr_ref.fetch(name, 0, ref.get_reference_length(name)),
                              dna_codes(ref.fetch(name)))
    import zarr

    attrs: dict = zarr.open_group(str(out), mode="r").attrs.asdict()[GENOME_ATTR]  # type: ignore[assignment]
    assert attrs["complete"] is True and attrs["chunk"] == 100


def test_windows_from_zarr_equal_windows_from_fasta(tmp_path: Path) -> None:
    fa = shared_file("genomics", "tangermeme", "test.fa")
    bed = shared_file("genomics", "tangermeme", "test.bed")
    out = tmp_path / "g.zarr"
    ingest_genome(str(fa), str(out), chunk_bases=64)
    for regions in ("genome", str(bed)):
        spec = {"regions": regions, "length": 100, "stride": 37, "windows_per_shard": 9}
        from_fasta, keys_fasta = windows_of(job(fa, **spec))
        from_zarr, keys_zarr = windows_of(job(out, **spec))
        assert keys_fasta == keys_zarr
        assert np.array_equal(from_fasta, from_zarr)
        if regions == "genome":
            assert (from_fasta == 4).any()  # some windows ran past a contig end


def test_gzip_input_and_unwrapped_long_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    seqs = {"one": "".join(rng.choice(list("ACGTN"), 5000)), "two": "acgt" * 10, "three": "G"}
    text = "".join(f">{n} some words\n{s}\n" for n, s in seqs.items())  # one line per contig
    src = tmp_path / "u.fa.gz"
    src.write_bytes(gzip.compress(text.encode()))
    monkeypatch.setattr(ingest_mod, "READ_BLOCK", 333)  # lines and headers straddle blocks
    summary = ingest_genome(str(src), str(tmp_path / "u.zarr"), chunk_bases=1024)
    assert summary["contigs"] == ["one", "two", "three"]
    assert summary["lengths"] == [5000, 40, 1]
    ref = open_reference(str(tmp_path / "u.zarr"))
    for name, seq in seqs.items():
        assert np.array_equal(ref.fetch(name, -2, len(seq) + 3),
                              dna_codes("NN" + seq + "NNN"))


def test_zarr_through_an_fsspec_memory_filesystem(tmp_path: Path) -> None:
    fa = shared_file("genomics", "sarscov2", "EMN908947.fa")
    uri = "memory://genomes/sarscov2.zarr"
    ingest_genome(str(fa), uri, chunk_bases=4096)
    contigs = load_contigs(uri)
    assert contigs.names == ("MN908947.3",) and contigs.lengths == (29903,)
    from_zarr, keys = windows_of(job(uri, regions=["MN908947.3:29000-29903"], length=500))
    from_fasta, _ = windows_of(job(fa, regions=["MN908947.3:29000-29903"], length=500))
    assert keys == [("MN908947.3", 29000), ("MN908947.3", 29500)]
    assert np.array_equal(from_zarr, from_fasta)
    assert (from_zarr[1, 403:] == 4).all()


def test_ingest_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.fa"
    bad.write_text("ACGT\n>c\nAC\n")
    with pytest.raises(InputError, match="sequence before the first '>' header"):
        ingest_genome(str(bad), str(tmp_path / "a.zarr"))
    dup = tmp_path / "dup.fa"
    dup.write_text(">c\nAC\n>c x\nGG\n")
    with pytest.raises(InputError, match="'c' appears twice"):
        ingest_genome(str(dup), str(tmp_path / "b.zarr"))
    good = tmp_path / "ok.fa"
    good.write_text(">c\nAC\n")
    ingest_genome(str(good), str(tmp_path / "c.zarr"))
    with pytest.raises(InputError, match="already exists"):
        ingest_genome(str(good), str(tmp_path / "c.zarr"))
    ingest_genome(str(good), str(tmp_path / "c.zarr"), overwrite=True)
    with pytest.raises(InputError, match="not found"):
        ingest_genome(str(tmp_path / "missing.fa"), str(tmp_path / "d.zarr"))


def test_incomplete_store_is_rejected(tmp_path: Path) -> None:
    import zarr

    zarr.open_group(str(tmp_path / "x.zarr"), mode="w")
    with pytest.raises(InputError, match="not a complete genome store"):
        load_contigs(str(tmp_path / "x.zarr"))


def test_contig_keys_never_collide(tmp_path: Path) -> None:
    """An unsafe name is stored as c<index>: a later contig named c0 asked for the same array
    (a traceback), and one named zarr.json for the group's metadata file (lost, exit 0)."""
    names = ["seq|2", "c0", "zarr.json", "C1", "weird:name*1", "chr1"]
    seqs = {n: "ACGT"[i % 4] * (30 + i) + "TTGCA"[: i + 1] for i, n in enumerate(names)}
    fasta = tmp_path / "names.fa"
    fasta.write_text("".join(f">{n}\n{s}\n" for n, s in seqs.items()))
    out = tmp_path / "names.zarr"
    ingest_genome(str(fasta), str(out))
    reference = open_reference(str(out))
    assert list(reference.contigs.names) == names
    for name, seq in seqs.items():
        assert bytes(reference.fetch(name, 0, len(seq))) == bytes(dna_codes(seq)), name
