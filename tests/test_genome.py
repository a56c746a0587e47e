"""Genome windows and variant pairs: bases against pysam, strands, padding, errors, and full runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import dna_codes, shared_file

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError, SpecError
from gpubatch.engine.pipeline import PipelineConfig, run_pipeline
from gpubatch.sources import get_source
from gpubatch.sources.base import Shard
from gpubatch.sources.genome.opening import open_reference
from gpubatch.sources.genome.reference import FastaReference
from gpubatch.sources.genome.source import GenomeSource, group_reads
from gpubatch.spec import JobSpec, parse_job

pysam = pytest.importorskip("pysam")


def genome_job(reference: str | Path, model: str | Path = "model.onnx", **windows: Any) -> JobSpec:
    data = {"name": "g", "kind": "genome", "windows": {"reference": str(reference), **windows},
            "model": {"path": str(model)}, "output": {"uri": "out"}}
    return parse_job(data)


def write_fasta(path: Path, contigs: dict[str, str], width: int = 60) -> Path:
    with open(path, "w") as f:
        for name, seq in contigs.items():
            f.write(f">{name} description\n")
            f.writelines(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
    pysam.faidx(str(path))
    return path


def random_seq(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    seq = "".join(rng.choice(list("ACGTacgt"), n))
    return seq[: n // 3] + "N" * 17 + seq[n // 3 + 17 :]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    contigs = {"chrA": random_seq(200_003, 1), "chrB": random_seq(777, 2), "chrC": random_seq(61, 3)}
    path = write_fasta(tmp_path_factory.mktemp("ref") / "synth.fa", contigs)
    return path, contigs


COMPLEMENT = str.maketrans("ACGTacgt", "TGCAtgca")
codes = dna_codes  # expected codes from a hand-written table (conftest), not the encoder under test


def revcomp(seq: str) -> str:
    """The reverse complement as a string (N and other letters stay what they are)."""
    return seq.translate(COMPLEMENT)[::-1]


def bases(contigs: dict[str, str], chrom: str, start: int, end: int) -> str:
    """The contig's letters in [start, end), N outside the contig."""
    seq = contigs[chrom]
    return "".join(seq[i] if 0 <= i < len(seq) else "N" for i in range(start, end))


def truth(contigs: dict[str, str], chrom: str, start: int, end: int) -> np.ndarray:
    return codes(bases(contigs, chrom, start, end))


def read_all(job: JobSpec, clocks: StageClocks | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Plan and read every shard the way a worker does; concatenated items and index."""
    source = GenomeSource()
    shards, failed = source.plan(job)
    assert failed == []
    items, index = [], []
    for shard in shards:
        with source.open(shard, job, clocks or StageClocks()) as reader:
            blocks = [unit() for unit in reader.read_units()]
            assert sum(len(b) for b in blocks) == reader.n_items == shard.n_items_hint
            items += [b.items for b in blocks]
            index += [b.index for b in blocks]
    return np.concatenate(items), {k: np.concatenate([ix[k] for ix in index]) for k in index[0]}


def test_bed_windows_equal_pysam_fetch() -> None:
    fa = shared_file("genomics", "tangermeme", "test.fa")
    bed = shared_file("genomics", "tangermeme", "test.bed")
    items, index = read_all(genome_job(fa, regions=str(bed), length=40, stride=7, windows_per_shard=3))
    ref = pysam.FastaFile(str(fa))
    assert len(items) == 5 * 1 + 0  # every test.bed region (20-30 bp) is shorter than 40: one window each
    for window, chrom, start, end in zip(items, index["chrom"], index["start"], index["end"], strict=True):
        assert end - start == 40
        assert np.array_equal(window, codes(ref.fetch(chrom, start, end)))


def test_genome_tiling_and_padding(synth: tuple[Path, dict[str, str]]) -> None:
    path, contigs = synth
    items, index = read_all(genome_job(path, length=500, stride=300, windows_per_shard=64))
    expected = [(c, s) for c, seq in contigs.items()
                for s in range(0, len(seq), 300) if s == 0 or s + 500 - 300 < len(seq)]
    assert list(zip(index["chrom"], index["start"], strict=True)) == expected
    for window, chrom, start in zip(items, index["chrom"], index["start"], strict=True):
        assert np.array_equal(window, truth(contigs, chrom, start, start + 500))
    last_b = items[list(index["chrom"]).index("chrB") + 2]  # chrB [600, 1100): 177 bases then N
    assert (last_b[177:] == 4).all() and (last_b[:177] != 4).any()
    assert set(index["strand"]) == {"+"}


def test_minus_strand_is_reverse_complement(synth: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, contigs = synth
    bed = tmp_path / "s.bed"
    bed.write_text("chrB\t100\t300\tx\t0\t-\nchrB\t100\t300\tx\t0\t+\n")
    items, index = read_all(genome_job(path, regions=str(bed), length=50))
    assert list(index["strand"]) == ["-"] * 4 + ["+"] * 4
    for k, start in enumerate(range(100, 300, 50)):
        assert np.array_equal(items[4 + k], truth(contigs, "chrB", start, start + 50))
        assert np.array_equal(items[k], codes(revcomp(bases(contigs, "chrB", start, start + 50))))


def test_region_strings(synth: tuple[Path, dict[str, str]]) -> None:
    path, contigs = synth
    items, index = read_all(genome_job(path, regions=["chrC:10-61", "chrA:1000-1100:-"], length=30))
    assert list(index["start"]) == [10, 40, 1000, 1030, 1060, 1090]
    assert np.array_equal(items[1], truth(contigs, "chrC", 40, 70))  # 21 bases then 9 N
    assert np.array_equal(items[2], codes(revcomp(bases(contigs, "chrA", 1000, 1030))))


def test_bgzip_reference_equals_plain(synth: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, _ = synth
    gz = tmp_path / "synth.fa.gz"
    pysam.tabix_compress(str(path), str(gz))
    pysam.faidx(str(gz))
    plain, bgz = open_reference(str(path)), open_reference(str(gz))
    assert bgz.format == "bgzip" and plain.format == "fasta"
    rng = np.random.default_rng(0)
    for start in [-5, 0, 65_000, 65_530, *rng.integers(0, 200_000, 10).tolist()]:
        for size in (1, 100, 70_000):
            assert np.array_equal(plain.fetch("chrA", start, start + size), bgz.fetch("chrA", start, start + size))
    ref = pysam.FastaFile(str(gz))
    assert np.array_equal(bgz.fetch("chrB", 0, 777), codes(ref.fetch("chrB")))


def test_fasta_through_an_fsspec_memory_filesystem(synth: tuple[Path, dict[str, str]]) -> None:
    import fsspec

    path, contigs = synth
    mem = fsspec.filesystem("memory")
    mem.pipe("/refs/synth.fa", path.read_bytes())
    mem.pipe("/refs/synth.fa.fai", Path(str(path) + ".fai").read_bytes())
    items, index = read_all(genome_job("memory://refs/synth.fa", regions=["chrB:700-777"], length=100))
    assert np.array_equal(items[0], truth(contigs, "chrB", 700, 800))


def test_missing_fai_says_how_to_make_one(tmp_path: Path) -> None:
    fa = tmp_path / "plain.fa"
    fa.write_text(">c\nACGT\n")
    with pytest.raises(SpecError) as err:
        GenomeSource().plan(genome_job(fa, length=4))
    assert err.value.problems[0][0] == "windows.reference"
    assert "plain.fa.fai not found" in str(err.value)
    assert "samtools faidx" in str(err.value) and "gpubatch ingest genome" in str(err.value)


@pytest.mark.parametrize("given", ["synth.fa.fai", "notes.txt", "folder"])
def test_a_reference_that_is_no_fasta_says_so_not_to_index_it(synth: tuple[Path, dict[str, str]],
                                                             tmp_path: Path, given: str) -> None:
    """windows.reference naming the .fai (or any text that is no FASTA) was told "synth.fa.fai.fai
    not found; make it with `samtools faidx synth.fa.fai`", and a folder got a storage error."""
    path, _ = synth
    target = tmp_path / given
    if given == "folder":
        target.mkdir()
    elif given == "notes.txt":
        target.write_text("my reference is hg38\n")
    else:
        target.write_bytes(Path(str(path) + ".fai").read_bytes())
    with pytest.raises(SpecError) as err:
        GenomeSource().plan(genome_job(target, length=4))
    assert err.value.problems[0][0] == "windows.reference"
    text = str(err.value)
    assert "samtools faidx" not in text and "storage error" not in text
    assert ("not a FASTA: it starts with" in text) if given != "folder" else ("not a genome zarr" in text)


def test_plain_gzip_reference_rejected(tmp_path: Path) -> None:
    import gzip

    fa = tmp_path / "g.fa.gz"
    fa.write_bytes(gzip.compress(b">c\nACGT\n"))
    with pytest.raises(SpecError, match="gzip but not bgzip"):
        GenomeSource().plan(genome_job(fa, length=4))


def test_a_bad_bed_line_is_left_out_and_listed_at_plan(synth: tuple[Path, dict[str, str]],
                                                       tmp_path: Path) -> None:
    """One bad line of seven: the other six are tiled, the seventh is a failed entry by line."""
    path, _ = synth
    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t10\n" * 6 + "chrX\t0\t5\n")
    shards, failed = GenomeSource().plan(genome_job(path, regions=str(bed), length=4))
    assert sum(s.n_items_hint or 0 for s in shards) == 6 * 3
    assert [f["input"] for f in failed] == ["regions.bed line 7"]
    assert failed[0]["error"].startswith("contig 'chrX' is not in the reference")
    assert "chrA, chrB, chrC" in failed[0]["error"]


def test_bed_errors_past_max_bad_records_refuse_the_job(synth: tuple[Path, dict[str, str]],
                                                        tmp_path: Path) -> None:
    """Two bad lines of seven are more than 5%: a wrong file, refused with the lines and the fix."""
    path, _ = synth
    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t10\n" * 5 + "chrX\t0\t5\nchrA\t9\t3\n")
    with pytest.raises(SpecError) as err:
        GenomeSource().plan(genome_job(path, regions=str(bed), length=4))
    messages = [m for f, m in err.value.problems if f == "windows.regions"]
    assert messages[0].startswith("1 of 7 records are on contigs the reference does not have: 'chrX'")
    assert messages[1].startswith("regions.bed line 6: contig 'chrX' is not in the reference")
    assert messages[2].startswith("regions.bed line 7: end (3) must be greater than start (9)")
    assert "2 of 7 records are unusable, more than windows.max_bad_records = 0.05" in messages[3]
    shards, failed = GenomeSource().plan(genome_job(path, regions=str(bed), length=4, max_bad_records=0.3))
    assert len(failed) == 2 and sum(s.n_items_hint or 0 for s in shards) == 5 * 3
    with pytest.raises(SpecError, match="chrX"):  # every line bad: refused at any share
        bed.write_text("chrX\t0\t5\n")
        GenomeSource().plan(genome_job(path, regions=str(bed), length=4, max_bad_records=1))


def test_plan_reads_no_sequence_and_payload_is_small(synth: tuple[Path, dict[str, str]],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = synth

    def forbidden(*_: Any) -> None:
        raise AssertionError("plan read sequence")

    monkeypatch.setattr(FastaReference, "_read", forbidden)
    shards, _ = GenomeSource().plan(genome_job(path, length=10, stride=1, windows_per_shard=100_000))
    assert sum(s.n_items_hint or 0 for s in shards) == 200_003 - 9 + 777 - 9 + 61 - 9
    assert max(len(json.dumps(s.payload)) for s in shards) < 300


def test_big_read_then_slice(synth: tuple[Path, dict[str, str]]) -> None:
    path, contigs = synth
    clocks = StageClocks()
    job = genome_job(path, regions=["chrA:0-200000"], length=100, chunk_bases=65_536, windows_per_shard=5000)
    items, index = read_all(job, clocks)
    assert len(items) == 2000
    assert clocks.counters["storage.requests"] <= 8  # ~4 reads of 64 kb, not 2000 small ones
    assert clocks.parts["storage"] > 0 and clocks.parts["decode"] > 0
    k = 1234
    assert np.array_equal(items[k], truth(contigs, "chrA", k * 100, k * 100 + 100))


def test_group_reads_bounds() -> None:
    starts = np.array([0, 10, 20, 200_000, 200_010, 5], dtype=np.int64)
    runs = list(group_reads(["a", "a", "b", "b", "b", "b"], starts, starts + 10, 1024, 10))
    assert runs == [(0, 2), (2, 3), (3, 5), (5, 6)]


def test_worker_reports_contig_missing_from_reference(synth: tuple[Path, dict[str, str]]) -> None:
    path, _ = synth
    shard = Shard("s", str(path), {"mode": "windows", "segments": [["chrZ", 0, 2, "+"]]}, 2)
    with pytest.raises(InputError, match="contig 'chrZ' is not in the reference"):
        GenomeSource().open(shard, genome_job(path, length=10), StageClocks())


# ------------------------------------------------------------------------------------------------
# variants


def variant_job(reference: Path, vcf: Path, model: str | Path = "m.onnx", **w: Any) -> JobSpec:
    return genome_job(reference, model, variants=str(vcf), **w)


def test_variant_pairs_indels_and_ref_mismatch(synth: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, contigs = synth
    b = contigs["chrB"].upper()
    vcf = tmp_path / "v.vcf"
    rows = [("chrB", 100, b[99], "G" if b[99] != "G" else "A"),       # SNV
            ("chrB", 200, b[199], b[199] + "TTTTT"),                    # insertion
            ("chrB", 300, b[299:306], b[299]),                          # deletion of 6
            ("chrB", 400, "A" if b[399] != "A" else "C", "T"),          # REF disagrees
            ("chrB", 770, b[769:777], b[769])]                          # deletion at contig end
    vcf.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   + "".join(f"{c}\t{p}\t.\t{r}\t{a}\t.\t.\t.\n" for c, p, r, a in rows))
    clocks = StageClocks()
    job = variant_job(path, vcf, length=21, windows_per_shard=2, max_ref_mismatch=0.2)
    items, index = read_all(job, clocks)
    assert items.shape == (5, 2, 21)
    assert list(index["ref_match"]) == [True, True, True, False, True]
    assert clocks.counters["variants.ref_mismatches"] == 1
    for (chrom, pos, ref, alt), pair in zip(rows, items, strict=True):
        p, s = pos - 1, pos - 1 - 10
        assert np.array_equal(pair[0], truth(contigs, chrom, s, s + 21))
        alt_expected = np.concatenate([truth(contigs, chrom, s, p), codes(alt),
                                       truth(contigs, chrom, p + len(ref), p + len(ref) + 21)])[:21]
        assert np.array_equal(pair[1], alt_expected)
    assert list(index["variant_id"])[1] == f"chrB:200:{rows[1][2]}:{rows[1][3]}"
    assert index["pos"].dtype == np.int64


def test_variant_reader_attrs_record_counts(tmp_path: Path, synth: tuple[Path, dict[str, str]]) -> None:
    path, contigs = synth
    vcf = tmp_path / "v.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   f"chrC\t5\t.\t{contigs['chrC'][4].upper()}\t.\t.\t.\t.\n"
                   f"chrC\t6\t.\tA\t<DUP>\t.\t.\t.\nchrC\t7\t.\t{contigs['chrC'][6].upper()}\tK,C\t.\t.\t.\n")
    source = GenomeSource()
    job = variant_job(path, vcf, length=8)
    (shard,), _ = source.plan(job)
    assert source.index_schema(job) == ["variant_id", "chrom", "pos", "ref", "alt", "ref_match"]
    with source.open(shard, job, StageClocks()) as reader:
        [unit() for unit in reader.read_units()]
        attrs = reader.attrs
    assert attrs["plan_counts"] == {
        "records": 3, "variants": 1, "ref_mismatches": 0, "layout": "vcf", "notes": [],
        "skipped": {"alt_missing": 1, "symbolic": 1, "spanning_deletion": 0, "breakend": 0, "iupac": 1,
                    "not_sequence": 0}}
    assert attrs["mode"] == "variants" and attrs["length"] == 8
    json.dumps(attrs)


def _mismatch_vcf(path: Path, contigs: dict[str, str], n: int, bad: int, swap: bool = False) -> Path:
    """``n`` SNVs on chrA, the first ``bad`` with a REF the reference does not have (or, with
    ``swap``, REF and ALT exchanged, as a REF/ALT swap in a pipeline would write them)."""
    a = contigs["chrA"].upper()
    lines = []
    for i in range(n):
        p = 1000 + 7 * i
        ref = a[p - 1] if a[p - 1] in "ACGT" else "A"
        alt = "C" if ref != "C" else "G"
        if i < bad:
            ref, alt = (alt, ref) if swap else ("T" if ref != "T" else "G", alt)
        lines.append(f"chrA\t{p}\tv{i}\t{ref}\t{alt}\t.\t.\t.\n")
    path.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n" + "".join(lines))
    return path


def test_plan_checks_every_ref_against_pysam(synth: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    from gpubatch.sources.genome.variants import check_refs, read_variants

    path, contigs = synth
    vcf = _mismatch_vcf(tmp_path / "v.vcf", contigs, 40, 6)
    ref = open_reference(str(path))
    table = read_variants(str(vcf), ref.contigs)
    match = check_refs(table, ref, chunk_bases=1024)  # several reads: runs are bounded
    fa = pysam.FastaFile(str(path))
    expected = [fa.fetch(c, p - 1, p - 1 + len(r)).upper() == r
                for c, p, r in zip(table.chrom, table.pos, table.ref, strict=True)]
    assert list(match) == expected and sum(expected) == 34


@pytest.mark.parametrize("swap", [False, True])
def test_many_ref_mismatches_refuse_the_job_at_plan(synth: tuple[Path, dict[str, str]], tmp_path: Path,
                                                    swap: bool) -> None:
    path, contigs = synth
    vcf = _mismatch_vcf(tmp_path / "v.vcf", contigs, 20, 20 if swap else 2, swap=swap)
    with pytest.raises(SpecError) as err:
        GenomeSource().plan(variant_job(path, vcf, length=16))
    text = str(err.value)
    assert "wrong genome build or REF/ALT swapped?" in text and "windows.max_ref_mismatch = 0.05" in text
    assert ("20 of 20 variants (100.0%)" if swap else "2 of 20 variants (10.0%)") in text
    assert "line 3 chrA:1000" in text  # the first mismatch, by its line in the file
    # under the limit the job plans, and the mismatches are counted
    shards, _ = GenomeSource().plan(variant_job(path, vcf, length=16, max_ref_mismatch=1.0))
    assert shards[0].payload["plan_counts"]["ref_mismatches"] == (20 if swap else 2)


def _variant_spec(tmp_path: Path, reference: Path, vcf: Path, length: int = 16, **windows: Any) -> Path:
    """A variant job file with a small genome model, run inline, for the CLI's commands."""
    from conftest import write_job

    from gpubatch.cli.demo_models import make_genome_model

    job = {"kind": "genome", "windows": {"reference": str(reference), "variants": str(vcf), "length": length,
                                         **windows},
           "model": {"path": str(make_genome_model(tmp_path / "g.onnx", length))},
           "output": {"uri": str(tmp_path / "out")}, "run": {"profile": "inline"}}
    return write_job(tmp_path / "job.yaml", job)


def test_cli_validate_refuses_what_run_refuses(synth: tuple[Path, dict[str, str]], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from gpubatch.cli.main import main

    path, contigs = synth
    spec = _variant_spec(tmp_path, path, _mismatch_vcf(tmp_path / "v.vcf", contigs, 20, 20, swap=True))
    assert main(["validate", str(spec)]) == 2
    assert "REF/ALT swapped?" in capsys.readouterr().err
    assert main(["run", str(spec)]) == 2
    assert "REF/ALT swapped?" in capsys.readouterr().err
    assert main(["validate", str(spec), "--set", "windows.max_ref_mismatch=1"]) == 0


def test_a_bad_variant_line_is_quarantined_and_the_rest_run(synth: tuple[Path, dict[str, str]], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """validate warns, run scores the other records and exits 3 (partial), the report lists the line."""
    import json

    import pandas as pd

    from gpubatch.cli.main import main

    path, contigs = synth
    vcf = _mismatch_vcf(tmp_path / "v.vcf", contigs, 30, 0)
    with vcf.open("a") as f:
        f.write("chrA\t5000\t.\tA\n" + "chrA\t5010\tlast\tA\tG\t.\t.\t.\n")
    spec = _variant_spec(tmp_path, path, vcf)
    assert main(["validate", str(spec)]) == 0
    assert "warning: v.vcf line 33 would be quarantined: malformed VCF record (4 tab-separated" in capsys.readouterr().out
    assert main(["run", str(spec)]) == 3
    assert "quarantined 1 input(s):\n  v.vcf line 33: malformed VCF record" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [f["input"] for f in report["failed"]] == ["v.vcf line 33"]
    assert main(["status", str(tmp_path / "out")]) == 0
    assert ("finished: 1/1 shards done, 0 failed, 1 input(s) quarantined at plan (listed in report.json), "
            in capsys.readouterr().out)
    assert main(["run", str(spec), "--resume"]) == 3  # nothing left to run: no rate to speak of
    capsys.readouterr()
    assert main(["status", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == ("finished: 1/1 shards done, 0 failed, 1 input(s) quarantined "
                                               "at plan (listed in report.json)")
    rows = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert len(rows) == 31 and "last" in set(rows["variant_id"])


def test_a_mended_bed_is_not_resumed_into_the_old_shards(synth: tuple[Path, dict[str, str]], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A shard is a run of the plan's windows: a BED line mended between a run and --resume moved
    the later shards' windows, and the kept shards lost some windows and doubled others (exit 0).
    The BED's version is a result field now: --resume is refused, --overwrite computes it all."""
    import pandas as pd
    from conftest import write_job

    from gpubatch.cli.demo_models import make_genome_model
    from gpubatch.cli.main import main

    path, _ = synth
    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t1000\nchrA\t1000\tabc\nchrB\t0\t700\n")
    job = {"kind": "genome", "windows": {"reference": str(path), "regions": str(bed), "length": 100,
                                         "windows_per_shard": 10, "max_bad_records": 0.5},
           "model": {"path": str(make_genome_model(tmp_path / "g.onnx", 100))},
           "output": {"uri": str(tmp_path / "out")}, "run": {"profile": "inline"}}
    spec = write_job(tmp_path / "job.yaml", job)
    assert main(["run", str(spec)]) == 3
    bed.write_text("chrA\t0\t1000\nchrA\t1000\t2000\nchrB\t0\t700\n")
    capsys.readouterr()
    assert main(["run", str(spec), "--resume"]) == 2
    assert "windows.regions_version" in capsys.readouterr().err
    assert main(["run", str(spec), "--overwrite"]) == 0
    rows = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert len(rows) == 27 and not rows.duplicated(["chrom", "start", "strand"]).any()


def test_quarantined_records_are_counted_past_those_listed(synth: tuple[Path, dict[str, str]], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """1,500 bad lines: 1,000 listed and one entry for the rest; the counts said 1,001."""
    import json

    from conftest import write_job

    from gpubatch.cli.demo_models import make_genome_model
    from gpubatch.cli.main import main

    path, _ = synth
    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t100\n" + "chrA\t5\tx\n" * 1500)
    job = {"kind": "genome", "windows": {"reference": str(path), "regions": str(bed), "length": 100,
                                         "max_bad_records": 1.0},
           "model": {"path": str(make_genome_model(tmp_path / "g.onnx", 100))},
           "output": {"uri": str(tmp_path / "out")}, "run": {"profile": "inline"}}
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 3
    assert "quarantined 1500 input(s):" in capsys.readouterr().out
    failed = json.loads((tmp_path / "out" / "report.json").read_text())["failed"]
    assert len(failed) == 1001 and failed[-1]["count"] == 500
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "1500 input(s) quarantined at plan" in capsys.readouterr().out


def test_overlapping_regions_are_noted(synth: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, _ = synth
    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t100\nchrB\t0\t100\nchrA\t50\t150\nchrA\t50\t60\t.\t0\t-\n")
    job = genome_job(path, regions=str(bed), length=10)
    source = GenomeSource()
    shards, failed = source.plan(job)
    notes = source.data_quality(job, shards, [])["notes"]
    assert not failed and len(notes) == 1
    assert notes[0].startswith("1 region(s) overlap an earlier one on the same contig and strand "
                               "(first: regions.bed line 3, chrA:50-150)")
    bed.write_text("chrA\t0\t100\nchrA\t100\t150\n")  # touching is not overlapping
    assert source.data_quality(job, source.plan(job)[0], []) == {}


def test_windows_off_a_contig_and_alleles_longer_than_the_window_are_noted(
        synth: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """A variant within half a window of a contig end has windows padded with N, and a REF or ALT
    longer than the window's right half is held only in part (a 41-base deletion in a 16-base
    window); both were scored without a word. The plan notes each kind once, with how many and
    the first by line; a variant in the middle of a contig with a short allele is in neither."""
    path, contigs = synth
    b = contigs["chrB"].upper()
    rows = [("chrB", 400, b[399], "G" if b[399] != "G" else "A"),   # middle: no note
            ("chrB", 3, b[2], "G" if b[2] != "G" else "A"),         # window starts before the contig
            ("chrB", 100, b[99:141], b[99]),                         # REF of 42 in a 16-base window
            ("chrB", 200, b[199], b[199] + "ACGTACGTA"),             # ALT of 10 > 8, the right half
            ("chrB", 772, b[771:774], b[771])]                       # the alt window reads past the end
    vcf = tmp_path / "v.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   + "".join(f"{c}\t{p}\t.\t{r}\t{a}\t.\t.\t.\n" for c, p, r, a in rows))
    job = variant_job(path, vcf, length=16)
    source = GenomeSource()
    shards, failed = source.plan(job)
    notes = source.data_quality(job, shards, [])["notes"]
    assert not failed and len(notes) == 2, notes
    assert notes[0].startswith(f"2 variant(s) are within half a window of a contig end (first: v.vcf line 4, "
                               f"chrB:3 {rows[1][2]}>{rows[1][3]}): their windows run past it and hold N there")
    assert notes[1].startswith(f"2 variant(s) have a REF or ALT longer than the 8 bases a 16-base window holds "
                               f"from the variant on (first: v.vcf line 5, chrB:100 {rows[2][2][:20]}...(42 bases)>"
                               f"{rows[2][3]}): "
                               "their windows hold only its first 8 bases")
    assert "windows.length" in notes[1]


def test_zarr_ref_mismatches_agree_with_the_report(synth: tuple[Path, dict[str, str]], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import pandas as pd
    import zarr

    from gpubatch.cli.demo_models import make_genome_model
    from gpubatch.report.html import render_html
    from gpubatch.report.text import format_summary
    from gpubatch.runtime.runner import run_job

    path, contigs = synth
    model = make_genome_model(tmp_path / "g.onnx", 16)
    vcf = _mismatch_vcf(tmp_path / "v.vcf", contigs, 30, 3)
    with vcf.open("a") as f:
        f.write("chrA\t5000\t.\tA\tK\t.\t.\t.\nchrA\t5001\t.\tA\tY,<DEL>\t.\t.\t.\n")
    job = parse_job({"kind": "genome", "windows": {"reference": str(path), "variants": str(vcf), "length": 16,
                                                   "windows_per_shard": 8, "max_ref_mismatch": 0.2},
                     "model": {"path": str(model), "batch_size": 8}, "output": {"uri": str(tmp_path / "out")},
                     "run": {"profile": "inline"}})
    result = run_job(job, show_progress=False)
    assert result.exit_code == 0
    q = result.report["data_quality"]["variants"]
    rows = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    group = zarr.open_group(str(tmp_path / "out" / "predictions.zarr"), mode="r")
    in_zarr = sum(group[sid].attrs["ref_mismatches"] for sid in group.group_keys())
    assert q["ref_mismatches"] == in_zarr == int((~rows["ref_match"]).sum()) == 3
    assert q["skipped"]["iupac"] == 2 and q["skipped"]["symbolic"] == 1
    assert q["records"] == 32 and q["scored"] == 30
    text = format_summary(result.report)
    assert "REF mismatches: 3 of 30 scored (10.0%" in text
    assert "skipped 3 ALT allele(s) that are not sequence: 1 symbolic (<DEL>, ...), 2 IUPAC ambiguity codes" in text
    page = render_html(result.report)
    assert "REF mismatches: 3 of 30 scored" in page and "2 IUPAC ambiguity codes" in page


# ------------------------------------------------------------------------------------------------
# through the engine with ONNX models


class Sink:
    def __init__(self) -> None:
        self.index: list[dict[str, np.ndarray]] = []
        self.outputs: list[dict[str, np.ndarray]] = []

    def write(self, index: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        self.index.append(index)
        self.outputs.append(outputs)

    def column(self, name: str) -> np.ndarray:
        source = self.outputs if name in self.outputs[0] else self.index
        return np.concatenate([part[name] for part in source])


def run_job(job: JobSpec, batch_size: int = 16, clocks: StageClocks | None = None) -> Sink:
    """Every shard of ``job`` through the engine; ``clocks``, if given, time all of them."""
    from gpubatch.engine.model_stage import make_batch_runner
    from gpubatch.models.onnxruntime import OnnxRuntimeModel

    source = get_source("genome")
    model = OnnxRuntimeModel(job.model.path)
    sink = Sink()
    shards, _ = source.plan(job)
    for shard in shards:
        timed = clocks if clocks is not None else StageClocks()
        with source.open(shard, job, timed) as reader:
            done = run_pipeline(reader, make_batch_runner(reader, model), sink,
                                PipelineConfig(batch_size=batch_size, readers=3, prefetch_batches=2), timed)
            assert done == reader.n_items
    return sink


@pytest.fixture(scope="module")
def count_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gpubatch.cli.demo_models import make_identity_onehot_model

    d = tmp_path_factory.mktemp("models")
    return {layout: make_identity_onehot_model(d / f"counts-{layout}.onnx", 64, layout)
            for layout in ("NLC", "NCL")}


def base_counts(window: np.ndarray) -> np.ndarray:
    return np.stack([(window == b).sum(axis=-1) for b in range(4)], axis=-1).astype(np.float32)


@pytest.mark.parametrize("layout", ["NLC", "NCL"])
def test_count_model_sees_the_true_bases(synth: tuple[Path, dict[str, str]], count_models: dict[str, Path],
                                         layout: str) -> None:
    path, contigs = synth
    job = genome_job(path, count_models[layout], regions=["chrB:0-777", "chrC:0-61:-"], length=64, stride=50,
                     windows_per_shard=7, encoding={"layout": layout})
    sink = run_job(job)
    starts, chroms = sink.column("start"), sink.column("chrom")
    expected = np.stack([base_counts(truth(contigs, c, s, s + 64)) for c, s in zip(chroms, starts, strict=True)])
    minus = sink.column("strand") == "-"
    expected[minus] = expected[minus][:, ::-1]  # reverse complement swaps A<->T, C<->G
    np.testing.assert_allclose(sink.column("counts"), expected)


def test_a_window_read_names_its_parts(synth: tuple[Path, dict[str, str]], count_models: dict[str, Path]) -> None:
    """A read unit's time is the reference read (storage), FASTA text to codes (decode) and the
    windows with their index columns (slice): named parts, not the read stage's ``other``."""
    from gpubatch.core.clocks import stage_breakdown

    path, _ = synth
    job = genome_job(path, count_models["NLC"], regions=["chrB:0-777", "chrC:0-61:-"], length=64, stride=50)
    clocks = StageClocks()
    run_job(job, clocks=clocks)
    read = stage_breakdown({k: v.as_dict() for k, v in clocks.stages.items()}, clocks.stage_parts)["read"]
    assert {"storage", "decode", "slice", "batch"} <= set(read), read
    assert sum(read.values()) == pytest.approx(clocks.stages["read"].busy_s, rel=1e-9)


def test_reverse_complement_average(synth: tuple[Path, dict[str, str]], count_models: dict[str, Path]) -> None:
    path, contigs = synth
    job = genome_job(path, count_models["NLC"], regions=["chrB:0-700"], length=64, reverse_complement="average")
    counts = run_job(job, batch_size=5).column("counts")
    forward = np.stack([base_counts(truth(contigs, "chrB", s, s + 64)) for s in range(0, 700, 64)])
    np.testing.assert_allclose(counts, (forward + forward[:, ::-1]) / 2)


def test_sarscov2_variant_effect(count_models: dict[str, Path]) -> None:
    fa = shared_file("genomics", "sarscov2", "EMN908947.fa")
    vcf = shared_file("genomics", "sarscov2", "simple.vcf")
    for average in ("none", "average"):
        sink = run_job(variant_job(fa, vcf, count_models["NCL"], length=64, reverse_complement=average,
                                   encoding={"layout": "NCL"}))
        assert list(sink.column("ref_match")) == [True]
        assert list(sink.column("variant_id")) == ["MN908947.3:13468:C:G"]
        delta = sink.column("delta_counts")[0]
        expected = [0, -1, 1, 0] if average == "none" else [0, 0, 0, 0]  # C>G is strand-symmetric
        np.testing.assert_allclose(delta, expected)
        ref = pysam.FastaFile(str(fa)).fetch("MN908947.3", 13467 - 32, 13467 + 32)
        if average == "none":
            np.testing.assert_allclose(sink.column("ref_counts")[0], base_counts(codes(ref)))


def test_genome_model_variant_columns(synth: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    from gpubatch.cli.demo_models import make_genome_model

    path, contigs = synth
    model = make_genome_model(tmp_path / "g.onnx", 32, "NLC", n_outputs=3)
    a = contigs["chrA"].upper()
    vcf = tmp_path / "v.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   + "".join(f"chrA\t{p}\tid{p}\t{a[p - 1]}\tACGT\t.\t.\t.\n" for p in range(1000, 1100, 3)))
    sink = run_job(variant_job(path, vcf, model, length=32), batch_size=8)
    ref, alt, delta = (sink.column(f"{k}_scores") for k in ("ref", "alt", "delta"))
    assert ref.shape == alt.shape == (34, 3)
    np.testing.assert_allclose(delta, alt - ref, rtol=1e-6)
    assert np.abs(delta).sum() > 0


def test_vcf_with_nothing_to_score_is_a_failed_input(tmp_path: Path, synth: tuple[Path, dict[str, str]]) -> None:
    path, _ = synth
    vcf = tmp_path / "none.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   "chrC\t5\t.\tA\t.\t.\t.\t.\nchrC\t6\t.\tA\t<DUP>\t.\t.\t.\n")
    shards, failed = GenomeSource().plan(variant_job(path, vcf, length=8))
    assert shards == []
    assert failed == [{"input": str(vcf), "error": "no scorable variants: 2 records, 2 ALT alleles skipped "
                                                   "(1 alt missing, 1 symbolic)"}]


def test_run_refuses_a_plan_with_nothing_to_run_as_validate_does(
        tmp_path: Path, synth: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]) -> None:
    """Both exit 2 (bad input, nothing ran): run exited 1 (every input failed) where validate said 2."""
    from gpubatch.cli.main import main

    path, _ = synth
    vcf = tmp_path / "none.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   "chrC\t5\t.\tA\t.\t.\t.\t.\nchrC\t6\t.\tA\t<DUP>\t.\t.\t.\n")
    spec = _variant_spec(tmp_path, path, vcf, length=8)
    for command in ("validate", "run"):
        assert main([command, str(spec)]) == 2
        err = capsys.readouterr().err
        assert "no scorable variants: 2 records" in err and "nothing would run" in err


# ------------------------------------------------------------------------------------------------
# object storage: a real S3 endpoint (moto server) behind a fault-injecting proxy


@pytest.fixture(scope="module")
def s3_refs(synth: tuple[Path, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("moto")
    from s3_fixtures import start_s3_stack

    from gpubatch.sources.genome.ingest import ingest_genome

    path, _ = synth
    stack = start_s3_stack("genomes")
    gz = tmp_path_factory.mktemp("gz") / "synth.fa.gz"
    pysam.tabix_compress(str(path), str(gz))
    pysam.faidx(str(gz))
    for local in (path, Path(f"{path}.fai"), gz, Path(f"{gz}.fai"), Path(f"{gz}.gzi")):
        stack.upload(local, f"ref/{local.name}")
    ingest_genome(str(path), f"s3://{stack.bucket}/ref/synth.zarr", stack.options(via_proxy=False),
                  chunk_bases=50_000)
    yield stack
    stack.close()


@pytest.mark.parametrize("name", ["synth.fa", "synth.fa.gz", "synth.zarr"])
def test_s3_reference_reads_match_local(s3_refs: Any, synth: tuple[Path, dict[str, str]], name: str) -> None:
    path, _ = synth
    regions = ["chrA:60000-130000", "chrB:0-777:-"]
    local, _ = read_all(genome_job(path, regions=regions, length=1000, chunk_bases=20_000))
    s3_refs.proxy.configure(error_rate=0.1, latency_s=0.002, seed=5)
    try:
        data = genome_job(f"s3://{s3_refs.bucket}/ref/{name}", regions=regions, length=1000,
                          chunk_bases=20_000).model_dump()
        data["input"]["storage"] = s3_refs.options()
        clocks = StageClocks()
        remote, _ = read_all(JobSpec.model_validate(data), clocks)
    finally:
        s3_refs.proxy.reset()
    assert np.array_equal(local, remote)
    # a genome zarr's reader keeps its last chunks: chrA's windows lie in chunks 1 and 2 (50 kb
    # each), chrB's in chunk 0, each fetched once (its 20 kb reads fetched them 5 times)
    assert clocks.counters["storage.requests"] == 3 if name.endswith(".zarr") else clocks.counters["storage.requests"] >= 4


def test_a_remote_bed_changed_since_the_run_is_a_changed_result_field(s3_refs: Any, synth: tuple[Path, dict[str, str]],
                                                                      tmp_path: Path) -> None:
    """The object's ETag stands for a remote BED's content, as a local one's sha256 does, so
    --resume after it changed is refused (the local test runs that through the CLI)."""
    path, _ = synth
    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t1000\n")
    uri = s3_refs.upload(bed, "beds/regions.bed")
    data = genome_job(path, regions=uri, length=100).model_dump()
    data["input"]["storage"] = s3_refs.options(via_proxy=False)
    job = JobSpec.model_validate(data)
    before = job.result_fields()["windows"]["regions_version"]
    assert before.startswith("etag:") and job.result_fields() == job.result_fields()
    bed.write_text("chrA\t0\t1000\nchrA\t1000\t2000\n")
    s3_refs.upload(bed, "beds/regions.bed")
    assert job.result_fields()["windows"]["regions_version"] not in (before, None)


def test_duplicate_regions_rows_name_their_bed_line(synth: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """A duplicated BED line gave the same rows twice, (chrom, start, end, strand) alike: no row
    could be traced to its interval. The ``region`` column holds each window's BED line."""
    path, contigs = synth
    bed = tmp_path / "regions.bed"
    bed.write_text("track name=x\nchrB\t0\t20\nchrB\t0\t20\nchrC\t50\t61\t.\t0\t-\n")
    items, index = read_all(genome_job(path, regions=str(bed), length=10, windows_per_shard=3))
    assert list(index["region"]) == [2, 2, 3, 3, 4, 4]
    assert list(index["start"]) == [0, 10, 0, 10, 50, 60]
    np.testing.assert_array_equal(items[-1], codes(revcomp(bases(contigs, "chrC", 60, 70))))
