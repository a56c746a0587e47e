"""``gpubatch ingest genome`` given FASTA files a genome is not: cut short, not nucleotides, a
folder, written while read, behind a URL with credentials; and what the genome keeps of its FASTA."""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from conftest import dna_codes, shared_file
from http_servers import FileServer
from test_ingest import genome_of, job, write_fasta

import gpubatch.sources.genome.ingest as ingest_mod
from gpubatch.cli.main import main
from gpubatch.core.errors import InputError, OutputRefused
from gpubatch.sources.genome.ingest import ingest_genome
from gpubatch.sources.genome.opening import open_reference
from gpubatch.sources.genome.reference import GENOME_ATTR, PACKED_ARRAY, open_genome_group
from gpubatch.sources.genome.source import GenomeSource

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pysam = pytest.importorskip("pysam")
pytest_plugins = ["s3_fixtures"]
#: the empty block that ends a whole bgzip file, as the SAM specification writes it out
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def bgzip(src: Path, dest: Path) -> bytes:
    pysam.tabix_compress(str(src), str(dest), force=True)
    return dest.read_bytes()


def test_a_bgzip_fasta_cut_at_a_block_boundary_is_refused(tmp_path: Path) -> None:
    """A bgzip file cut where a block ends (its EOF block lost) inflates cleanly: it was ingested
    with its last contig short, exit 0. Cut mid-block, it was refused already."""
    fasta = write_fasta(tmp_path / "g.fa", seed=1, contigs=3, length=100_000)
    whole = bgzip(fasta, tmp_path / "g.fa.gz")
    assert whole.endswith(BGZF_EOF)
    blocks = [off for off in range(len(whole)) if whole.startswith(b"\x1f\x8b\x08\x04", off)]
    assert len(blocks) >= 5  # data blocks, then the EOF block
    cuts = {"no EOF block": whole[: -len(BGZF_EOF)], "two blocks": whole[: blocks[2]],
            "mid-block": whole[: blocks[2] + 100]}
    for what, data in cuts.items():
        cut = tmp_path / "cut.fa.gz"
        cut.write_bytes(data)
        with pytest.raises(InputError, match="cut short|truncated or corrupt"):
            ingest_genome(str(cut), str(tmp_path / f"{what}.zarr"))
        assert not (tmp_path / f"{what}.zarr").exists(), what
    summary = ingest_genome(str(tmp_path / "g.fa.gz"), str(tmp_path / "whole.zarr"))
    assert summary["lengths"] == [100_000] * 3


def test_a_plain_gzip_fasta_is_read_and_its_cut_refused(tmp_path: Path) -> None:
    fasta = write_fasta(tmp_path / "g.fa", seed=2)
    packed = gzip.compress(fasta.read_bytes())
    (tmp_path / "g.fa.gz").write_bytes(packed)
    assert genome_of(ingest_genome(str(tmp_path / "g.fa.gz"), str(tmp_path / "a.zarr"))["uri"]) == \
        genome_of(ingest_genome(str(fasta), str(tmp_path / "b.zarr"))["uri"])
    (tmp_path / "cut.fa.gz").write_bytes(packed[:-9])
    with pytest.raises(InputError, match="truncated or corrupt"):
        ingest_genome(str(tmp_path / "cut.fa.gz"), str(tmp_path / "c.zarr"))


@pytest.mark.parametrize(("line", "odd", "base"), [("ACGT12ACGT", "1", 5), ("ACG*", "*", 4), ("AC--GT", "-", 3),
                                                   ("ACGT.", ".", 5), ("ACZG>T", ">", 5)])
def test_characters_that_are_not_letters_are_refused_naming_contig_and_base(
        tmp_path: Path, line: str, odd: str, base: int) -> None:
    """Digits, '*', '-', '.', a '>' inside a line (alignments, GenBank dumps): each was ingested
    as N, exit 0."""
    fasta = tmp_path / "odd.fa"
    fasta.write_text(f">ok\nACGT\n>bad one\nACGTACGTAC\n{line}\n")
    with pytest.raises(InputError) as err:
        ingest_genome(str(fasta), str(tmp_path / "g.zarr"))
    assert f"contig 'bad', base {10 + base}: '{odd}' is not a nucleotide code" in err.value.message
    assert not (tmp_path / "g.zarr").exists()


def test_a_protein_fasta_is_refused_and_a_few_odd_letters_are_read_as_n(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A protein FASTA was ingested as a genome of N with A/C/G/T wherever a residue's letter is
    one, exit 0. A stray letter in a genome (tangermeme's test FASTA has a Z) is read as N, as a
    job reading the FASTA itself reads it, and said."""
    protein = tmp_path / "p.fa"
    protein.write_text(">sp|P69905|HBA_HUMAN Hemoglobin alpha\nMVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF\n")
    with pytest.raises(InputError) as err:
        ingest_genome(str(protein), str(tmp_path / "p.zarr"))
    assert err.value.message == ("13 of 47 bases are letters that are no nucleotide code (first: contig "
                                 "'sp|P69905|HBA_HUMAN', base 3: 'L'): a protein FASTA, not a genome")
    stray = tmp_path / "z.fa"
    stray.write_text(">c\n" + "ACGT" * 10 + "Z" + "ACGT" * 10 + "\n")
    with caplog.at_level(logging.WARNING, logger="gpubatch"):
        ingest_genome(str(stray), str(tmp_path / "z.zarr"))
    assert "1 letter(s) that are no nucleotide code read as N (first: contig 'c', base 41: 'Z')" in caplog.text
    assert genome_of(tmp_path / "z.zarr") == {"c": bytes(dna_codes("ACGT" * 10 + "N" + "ACGT" * 10))}


def test_soft_masking_iupac_crlf_and_spaces_are_read_as_the_fasta_path_reads_them(tmp_path: Path) -> None:
    lines = ["acgtNNRYKMSWBDHVnryu", "ACGT ACGT\t", "gattaca"]
    fasta = tmp_path / "mixed.fa"
    fasta.write_bytes(b">m desc\r\n" + b"\r\n".join(s.encode() for s in lines) + b"\r\n>n\r\nTT\r\n")
    ingest_genome(str(fasta), str(tmp_path / "g.zarr"))
    expected = "".join(lines).replace(" ", "").replace("\t", "")
    got = genome_of(tmp_path / "g.zarr")
    assert got == {"m": bytes(dna_codes(expected)), "n": bytes(dna_codes("TT"))}


@pytest.mark.parametrize("text", [">a\nACGT\n>b\n", ">a\nACGT\n>b", ">a\n", ">a\nAC\n>chr"])
def test_a_fasta_that_ends_in_a_bare_header_is_refused_as_cut_short(tmp_path: Path, text: str) -> None:
    """samtools faidx refuses these as truncated; ingest wrote a last contig of length 0."""
    fasta = tmp_path / "cut.fa"
    fasta.write_text(text)
    with pytest.raises(InputError, match="ends with the header of contig .* no sequence after it: the file "
                                         "looks cut short"):
        ingest_genome(str(fasta), str(tmp_path / "g.zarr"))


def test_an_empty_contig_inside_the_fasta_is_kept_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fasta = tmp_path / "e.fa"
    fasta.write_text(">a\n>b\nACGT\n")
    pysam.faidx(str(fasta))  # which leaves 'a' out: no disagreement with the genome for that
    with caplog.at_level(logging.WARNING, logger="gpubatch"):
        summary = ingest_genome(str(fasta), str(tmp_path / "g.zarr"))
    assert summary["lengths"] == [0, 4]
    assert "1 contig(s) have a header and no sequence, kept with length 0: a" in caplog.text


def test_a_plain_fasta_cut_mid_record_is_refused_by_its_fai(tmp_path: Path) -> None:
    """Cut mid-record, a plain FASTA reads as whole: its .fai was ignored, exit 0."""
    fasta = write_fasta(tmp_path / "g.fa", seed=3, contigs=3, length=5000)
    pysam.faidx(str(fasta))
    ingest_genome(str(fasta), str(tmp_path / "whole.zarr"))  # a FASTA that matches its .fai
    whole = fasta.read_bytes()
    fasta.write_bytes(whole[: len(whole) // 2])  # mid chr1; the .fai is the whole file's
    with pytest.raises(InputError, match="contig 'chr1': the FASTA holds 2,4.. bases, its .fai 5,000: "
                                         "the FASTA is cut short"):
        ingest_genome(str(fasta), str(tmp_path / "cut.zarr"))
    fasta.write_bytes(whole + b">more\nACGT\n")
    with pytest.raises(InputError, match="contig 'more' is in the FASTA but not in its .fai"):
        ingest_genome(str(fasta), str(tmp_path / "more.zarr"))


@pytest.mark.parametrize("what", ["folder", "genome zarr"])
def test_a_folder_given_as_the_fasta_is_refused_naming_it(tmp_path: Path, what: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Was an IsADirectoryError traceback from the command line."""
    given = tmp_path / "given"
    if what == "folder":
        given.mkdir()
    else:
        ingest_genome(str(write_fasta(tmp_path / "g.fa", seed=1)), str(given))
    assert main(["ingest", "genome", str(given), str(tmp_path / "out.zarr")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{given}: not a FASTA file but " in err, err
    assert ("a genome zarr already" in err) == (what == "genome zarr")


def test_a_fasta_written_while_it_is_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fasta = write_fasta(tmp_path / "g.fa", seed=1)
    real = ingest_mod._write_contigs

    def grows(*args: Any, **kwargs: Any) -> Any:
        got = real(*args, **kwargs)
        with fasta.open("a") as f:  # the download goes on
            f.write(">late\nACGT\n")
        return got

    monkeypatch.setattr(ingest_mod, "_write_contigs", grows)
    with pytest.raises(InputError, match="the FASTA changed while it was read"):
        ingest_genome(str(fasta), str(tmp_path / "g.zarr"))
    assert not (tmp_path / "g.zarr").exists()


def test_one_set_of_names_serves_every_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The duplicate-name check rebuilt a set of every name so far at each header: quadratic in
    contigs (20,000 scaffolds took minutes). It must check against one set, kept."""
    sets: list[int] = []
    real = ingest_mod._header_name

    def spy(raw: bytes, fasta_uri: str, seen: set[str]) -> str:
        sets.append(id(seen))
        return real(raw, fasta_uri, seen)

    monkeypatch.setattr(ingest_mod, "_header_name", spy)
    fasta = tmp_path / "many.fa"
    fasta.write_text("".join(f">s{i}\nACGT\n" for i in range(50)))
    assert ingest_genome(str(fasta), str(tmp_path / "g.zarr"))["contigs"] == [f"s{i}" for i in range(50)]
    assert len(sets) == 50 and len(set(sets)) == 1


def test_ingest_into_an_existing_output_is_refused_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing read or written, the command line has to change: exit 2, as `run` into an output
    it may not write (was 1, as if the FASTA had failed)."""
    fasta, out = write_fasta(tmp_path / "g.fa", seed=1), tmp_path / "g.zarr"
    assert main(["ingest", "genome", str(fasta), str(out)]) == 0
    before = genome_of(out)
    assert main(["ingest", "genome", str(fasta), str(out)]) == 2
    assert "output already exists" in capsys.readouterr().err
    with pytest.raises(OutputRefused, match="already exists"):
        ingest_genome(str(fasta), str(out))
    assert genome_of(out) == before


def test_a_credential_in_the_fasta_url_is_not_written_into_the_genome(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``https://user:token@host/g.fa``: the genome's ``source`` attribute kept the token, and
    `inspect` printed it."""
    fasta = write_fasta(tmp_path / "g.fa", seed=1)
    server = FileServer({"/ref/g.fa": fasta.read_bytes()}, etag='"v1"')
    try:
        host = server.url.removeprefix("http://")
        out = tmp_path / "g.zarr"
        assert main(["ingest", "genome", f"http://alice:s3cr3t-pw@{host}/ref/g.fa", str(out)]) == 0
        assert main(["inspect", str(out)]) == 0
    finally:
        server.close()
    meta = open_genome_group(str(out), None).attrs.asdict()[GENOME_ATTR]
    assert meta["source"] == f"http://{host}/ref/g.fa"
    assert "s3cr3t-pw" not in json.dumps(meta) and "alice" not in json.dumps(meta)
    said = capsys.readouterr()
    assert "s3cr3t-pw" not in said.out + said.err
    assert genome_of(out) == genome_of(ingest_genome(str(fasta), str(tmp_path / "local.zarr"))["uri"])


def test_a_plan_notes_that_the_genome_s_fasta_changed_since_its_ingest(tmp_path: Path) -> None:
    """The genome is read as ingested; a FASTA fetched again since (a patch release) went unsaid."""
    fasta, out = write_fasta(tmp_path / "g.fa", seed=1), tmp_path / "g.zarr"
    ingest_genome(str(fasta), str(out))
    spec = {"regions": "genome", "length": 1000}
    shards, _ = GenomeSource().plan(job(out, **spec))
    assert shards.notes == []  # type: ignore[attr-defined]
    fasta.write_text(fasta.read_text() + ">chrUn\nACGT\n")
    os.utime(fasta, (time.time() + 5, time.time() + 5))
    shards, _ = GenomeSource().plan(job(out, **spec))
    notes = shards.notes  # type: ignore[attr-defined]
    assert len(notes) == 1 and f"was ingested from {fasta}, which has changed since" in notes[0], notes
    assert f"gpubatch ingest genome {fasta} {out} --overwrite" in notes[0]
    fasta.unlink()  # gone: nothing to compare with, nothing said
    assert GenomeSource().plan(job(out, **spec))[0].notes == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("pack_below", [0, 1000])
def test_a_reader_opens_only_the_contigs_it_reads(s3: S3Stack, tmp_path: Path, pack_below: int) -> None:
    """A genome zarr reader opened every contig's array at its start: one metadata request per
    contig per shard (an assembly of 100,000 scaffolds: 100,000 requests before a window).
    Packed (layout version 2), the scaffolds' one array is opened once for all of them."""
    fasta = tmp_path / "scaffolds.fa"
    rng = np.random.default_rng(0)
    fasta.write_text("".join(f">scaf{i}\n{''.join(rng.choice(list('ACGT'), 50))}\n" for i in range(40)))
    prefix = f"genomes-{uuid.uuid4().hex[:6]}"
    out = f"s3://{s3.bucket}/{prefix}/g.zarr"
    ingest_genome(str(fasta), out, s3.options(via_proxy=False), pack_below=pack_below)
    s3.proxy.reset()
    reference = open_reference(out, s3.options())
    for index in (7, 30):
        codes = reference.fetch(f"scaf{index}", 0, 50)
        assert bytes(codes) == bytes(dna_codes(fasta.read_text().splitlines()[2 * index + 1]))
    opened = [key for key in s3.proxy.gets if key.endswith("/zarr.json") and "/g.zarr/" in key[:-len("/zarr.json")]]
    arrays = ["scaf7", "scaf30"] if pack_below == 0 else [PACKED_ARRAY]
    assert opened == [f"{s3.bucket}/{prefix}/g.zarr/{key}/zarr.json" for key in arrays], opened
    reference.close()


def test_the_tangermeme_genome_still_ingests_as_pysam_reads_it(tmp_path: Path) -> None:
    """Real FASTA files pass every new check (nucleotide codes, their .fai, the bgzip EOF block)."""
    fa = shared_file("genomics", "tangermeme", "test.fa")
    local = tmp_path / "test.fa"
    local.write_bytes(fa.read_bytes())
    pysam.faidx(str(local))
    bgzip(local, tmp_path / "test.fa.gz")
    reference = pysam.FastaFile(str(local))
    for source in (local, tmp_path / "test.fa.gz"):
        summary = ingest_genome(str(source), str(tmp_path / f"{source.name}.zarr"))
        assert summary["lengths"] == list(reference.lengths)


def test_a_chunk_missing_from_a_genome_store_is_refused_not_read_as_n(tmp_path: Path) -> None:
    """A genome zarr copied in part (a sync that stopped) lacks chunk files: zarr reads a missing
    chunk as the fill value, which was N, so its windows were runs of N, exit 0."""
    fasta = write_fasta(tmp_path / "g.fa", seed=1, contigs=2, length=1000)
    out = tmp_path / "g.zarr"
    ingest_genome(str(fasta), str(out), chunk_bases=256, pack_below=0)  # packed: tests/test_genome_layout.py
    whole = genome_of(out)
    chunk = out / "chr1" / "c" / "2"
    assert chunk.is_file()
    chunk.unlink()
    reference = open_reference(str(out))
    assert bytes(reference.fetch("chr1", 0, 512)) == whole["chr1"][:512]  # chunks 0 and 1 are there
    with pytest.raises(InputError, match=r"chr1:512: the genome store lacks the chunk that holds these bases"):
        reference.fetch("chr1", 500, 600)
    all_n = tmp_path / "n.fa"
    all_n.write_text(">gap\n" + "N" * 600 + "\n")  # all-N chunks are written, so none is expected missing
    ingest_genome(str(all_n), str(tmp_path / "n.zarr"), chunk_bases=256, pack_below=0)
    assert sorted(p.name for p in (tmp_path / "n.zarr" / "gap" / "c").iterdir()) == ["0", "1", "2"]
    assert genome_of(tmp_path / "n.zarr") == {"gap": bytes(dna_codes("N" * 600))}


def test_a_byte_order_mark_before_the_first_header_is_named(tmp_path: Path) -> None:
    """A FASTA saved by a Windows editor was "not a FASTA file"."""
    fasta = tmp_path / "bom.fa"
    fasta.write_bytes(b"\xef\xbb\xbf>chr1\nACGT\n")
    with pytest.raises(InputError, match="starts with a UTF-8 byte-order mark before its first '>' header"):
        ingest_genome(str(fasta), str(tmp_path / "g.zarr"))


def test_memory_is_set_by_the_read_block_not_by_a_long_single_line_contig(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unwrapped 16 Mb contig (one line) is streamed a read block at a time: the ingest's peak
    of traced allocations stays a few blocks and chunks (here 64 kB and 256 kB), far below the
    contig. Measured on the command line: 167 MB peak RSS for a 50 Mb and a 200 Mb contig alike."""
    import tracemalloc

    monkeypatch.setattr(ingest_mod, "READ_BLOCK", 1 << 16)
    rng = np.random.default_rng(0)
    fasta = tmp_path / "one-line.fa"
    fasta.write_bytes(b">one\n" + np.frombuffer(b"ACGTacgtN", np.uint8)[rng.integers(0, 9, 16 << 20)].tobytes() + b"\n")
    ingest_genome(str(write_fasta(tmp_path / "warm.fa", seed=1)), str(tmp_path / "warm.zarr"))  # imports
    tracemalloc.start()
    try:
        summary = ingest_genome(str(fasta), str(tmp_path / "g.zarr"), chunk_bases=1 << 18)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary["lengths"] == [16 << 20]
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB for a 16 MiB contig"


def _ingest_peak(fasta: Path, out: Path) -> tuple[dict[str, Any], int]:
    """The ingest's summary, and its peak of traced allocations."""
    import tracemalloc

    tracemalloc.start()
    try:
        summary = ingest_genome(str(fasta), str(out), chunk_bases=1 << 16)
        return summary, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("packed", ["plain", "gzip"])
def test_a_header_line_longer_than_a_block_is_read_in_bounded_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packed: str) -> None:
    """A header longer than a read block was kept whole, a block added at a time (and copied at
    each): 138 MB of RSS for a 10 MB header, 502 MB for 100 MB. Its name is all that is read, so
    its description is passed over a block at a time; the genome is the same as with a short one."""
    monkeypatch.setattr(ingest_mod, "READ_BLOCK", 1 << 16)
    ingest_genome(str(write_fasta(tmp_path / "warm.fa", seed=1)), str(tmp_path / "warm.zarr"))  # imports
    genomes, peaks = [], []
    for words in (1 << 19, 8 << 20):
        text = b">chr1 " + b"x" * words + b"\nACGTN\n>chr2 " + b"y " * (words // 2) + b"\nGG\n"
        fasta = tmp_path / f"h{words}.fa"
        fasta.write_bytes(gzip.compress(text, 1) if packed == "gzip" else text)
        summary, peak = _ingest_peak(fasta, tmp_path / f"h{words}.zarr")
        assert summary["contigs"] == ["chr1", "chr2"] and summary["lengths"] == [5, 2]
        genomes.append(genome_of(tmp_path / f"h{words}.zarr"))
        peaks.append(peak)
    assert genomes[0] == genomes[1] == {"chr1": bytes(dna_codes("ACGTN")), "chr2": bytes(dna_codes("GG"))}
    assert peaks[1] < 2 << 20 and peaks[1] < peaks[0] + (256 << 10), f"peaks {peaks}"


def test_a_name_longer_than_a_block_and_bare_cr_line_ends_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FASTA whose lines end in a bare CR has no '\\n': it was held whole as one header line, then
    refused as "cut short". A header whose first word runs past a block is no contig name."""
    monkeypatch.setattr(ingest_mod, "READ_BLOCK", 1 << 12)
    for name, text, refusal in (("cr.fa", b">chr1\r" + b"ACGTACGTAC\r" * 2000, "end in a bare CR"),
                                ("small-cr.fa", b">chr1\rACGT\r", "end in a bare CR"),
                                ("name.fa", b">" + b"n" * 10_000 + b" words\nACGT\n", "longer than 4,096 bytes")):
        (tmp_path / name).write_bytes(text)
        with pytest.raises(InputError, match=refusal):
            ingest_genome(str(tmp_path / name), str(tmp_path / f"{name}.zarr"))


@pytest.mark.parametrize("packed", ["bgzip", "gzip", "plain"])
def test_a_fasta_streamed_over_http_without_a_length_is_ingested(tmp_path: Path, packed: str) -> None:
    """A server that sends no Content-Length gives a body fsspec cannot seek in: the seek back
    after the magic bytes were read raised "Cannot seek streaming HTTP file", a traceback."""
    fasta = write_fasta(tmp_path / "g.fa", seed=4)
    body = {"bgzip": lambda: bgzip(fasta, tmp_path / "g.fa.gz"), "gzip": lambda: gzip.compress(fasta.read_bytes()),
            "plain": fasta.read_bytes}[packed]()
    server = FileServer({"/g.fa.gz": body, "/cut.fa.gz": body[: -len(BGZF_EOF)]}, etag='"v1"', lengths=False)
    try:
        got = ingest_genome(f"{server.url}/g.fa.gz", str(tmp_path / "http.zarr"))
        if packed == "bgzip":  # and the EOF block is still asked of a stream
            with pytest.raises(InputError, match="ends without BGZF's end-of-file block"):
                ingest_genome(f"{server.url}/cut.fa.gz", str(tmp_path / "cut.zarr"))
    finally:
        server.close()
    assert genome_of(got["uri"]) == genome_of(ingest_genome(str(fasta), str(tmp_path / "local.zarr"))["uri"])
