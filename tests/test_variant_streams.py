"""Variant files are read as streams: a plain-gzip VCF, or a remote one, is never copied to disk.

A plain-gzip ``.vcf.gz`` (``gzip``, not ``bgzip``) was decompressed whole into a copy under the
temp dir before htslib read it, and a remote file downloaded whole (into memory, then a copy):
a 10 GB cohort VCF filled /tmp. The same records in every form (plain, bgzip, plain gzip, local
or on S3 through moto) must give the same table, the same quarantined lines and the same scores.
"""

from __future__ import annotations

import contextlib
import gzip
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from test_genome import genome_job, run_job, write_fasta

from gpubatch.core.errors import SpecError
from gpubatch.sources.genome import variant_files
from gpubatch.sources.genome.reference import ContigTable
from gpubatch.sources.genome.variants import read_variants

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]
pysam = pytest.importorskip("pysam")

#: audit events seen while ``_watching`` is set (hooks cannot be removed: it is off otherwise)
_seen: list[tuple[str, tuple[Any, ...]]] = []
_watching: list[str] = []  # the temp dir watched, when watching


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _watching:
        return
    if event.startswith("tempfile.") or (event == "open" and str(args[0]).startswith(_watching[0])):
        _seen.append((event, args))


sys.addaudithook(_audit)


@contextlib.contextmanager
def temp_dir_watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any]]]:
    """Every temporary file or folder made (``tempfile``'s audit events) and every file opened
    under the temp dir (``tmp_path/tmp``, made the process's) while the block runs."""
    temp = tmp_path / "tmp"
    temp.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    _seen.clear()
    _watching.append(str(temp))
    try:
        yield _seen
    finally:
        _watching.clear()
    assert list(temp.iterdir()) == []


CONTIG = "".join(np.random.default_rng(7).choice(list("ACGT"), 5000))
CONTIGS = ContigTable(("chrA",), (len(CONTIG),))
SAMPLES = [f"S{i}" for i in range(16)]
HEADER = ("##fileformat=VCFv4.2\n##contig=<ID=chrA,length=5000>\n"
          "##FORMAT=<ID=GT,Number=1,Type=String,Description=\"Genotype\">\n"
          "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(SAMPLES) + "\n")


def _records() -> list[str]:
    """Over 64 KiB of records (more than a pipe holds): SNVs, a multi-allelic one, an indel,
    genotypes for every sample, and two malformed lines to be quarantined by number."""
    genotypes = "\tGT\t" + "\t".join("0/1" for _ in SAMPLES)
    rows = [f"chrA\t{p}\tid{p}\t{CONTIG[p - 1]}\t{'ACGT'[p % 4]}\t.\t.\t.{genotypes}" for p in range(20, 4900, 2)]
    rows[10] = f"chrA\t61\tmulti\t{CONTIG[60]}\tA,T\t.\t.\t.{genotypes}"
    rows[20] = f"chrA\t101\tdel\t{CONTIG[100:104]}\t{CONTIG[100]}\t.\t.\t.{genotypes}"
    rows[30] = "chrA\tx\t.\tA\tG\t.\t.\t."
    rows[900] = "chrA 3621 . A G . . ."
    return rows


@pytest.fixture(scope="module")
def forms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same records as a plain VCF, a bgzip VCF and a plain-gzip VCF."""
    folder = tmp_path_factory.mktemp("forms")
    plain = folder / "v.vcf"
    plain.write_text(HEADER + "".join(r + "\n" for r in _records()))
    assert plain.stat().st_size > 1 << 17
    bgzip = folder / "v.bgz.vcf.gz"
    pysam.tabix_compress(str(plain), str(bgzip))
    plain_gzip = folder / "v.gz.vcf.gz"
    plain_gzip.write_bytes(gzip.compress(plain.read_bytes()))
    return {"plain": plain, "bgzip": bgzip, "gzip": plain_gzip}


def _summary(table: Any) -> tuple[Any, ...]:
    """What a table holds, its quarantined lines named by number alone (the files' names differ)."""
    failed = [(f["input"].rsplit(" line ", 1)[-1], f["error"]) for f in table.failed]
    return table.variant_id, table.pos, table.ref, table.alt, table.counts, failed, table.layout


def test_a_plain_gzip_vcf_is_read_without_a_temporary_copy(forms: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """It was decompressed whole under the temp dir first: disk grew with the input."""
    want = _summary(read_variants(str(forms["plain"]), CONTIGS, max_bad=0.01))
    with temp_dir_watched(tmp_path, monkeypatch) as seen:
        got = read_variants(str(forms["gzip"]), CONTIGS, max_bad=0.01)
    assert seen == []
    assert _summary(got) == want
    assert [f["input"] for f in got.failed] == ["v.gz.vcf.gz line 35", "v.gz.vcf.gz line 905"]


@pytest.mark.parametrize("form", ["plain", "bgzip", "gzip"])
def test_a_remote_vcf_is_streamed_not_downloaded_to_disk(forms: dict[str, Path], form: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, s3: S3Stack) -> None:
    """A remote VCF was read whole into memory and written under the temp dir for htslib; it is
    fed to htslib as a stream, the same records and quarantined lines as the local file."""
    uri = s3.upload(forms[form])
    want = _summary(read_variants(str(forms[form]), CONTIGS, max_bad=0.01))
    with temp_dir_watched(tmp_path, monkeypatch) as seen:
        got = read_variants(uri, CONTIGS, s3.options(), max_bad=0.01)
    assert seen == []
    assert _summary(got) == want


def test_a_remote_plain_gzip_vcf_cut_short_is_refused_naming_its_last_line(forms: dict[str, Path],
                                                                           s3: S3Stack) -> None:
    data = forms["gzip"].read_bytes()
    uri = s3.upload_bytes(data[: len(data) // 2], "cut/v.vcf.gz")
    with pytest.raises(SpecError, match=r"v.vcf.gz is cut short: the gzip stream breaks off after line [1-9]\d+; "):
        read_variants(uri, CONTIGS, s3.options(), max_bad=0.01)


def test_a_read_stopped_early_stops_the_thread_feeding_htslib(forms: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain-gzip VCF refused part way (too many unreadable lines in a row) leaves no thread
    blocked on a pipe nobody reads: the pipe is closed and the thread stops at its next write."""
    rows = ["chrA\tx\t.\tA\tG\t.\t.\t."] * 5 + _records()
    path = tmp_path / "bad.vcf.gz"
    path.write_bytes(gzip.compress((HEADER + "".join(r + "\n" for r in rows)).encode()))
    monkeypatch.setattr(variant_files, "MAX_FAILING_IN_A_ROW", 3)
    with pytest.raises(SpecError, match="bad.vcf.gz line 5: 3 records in a row"):
        read_variants(str(path), CONTIGS, max_bad=1.0)
    assert [t for t in threading.enumerate() if t.name == "gpubatch-variants-feed"] == []


def test_plain_bgzip_and_plain_gzip_vcfs_score_the_same(forms: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Planned and run, the three forms give the same rows and scores; the plain-gzip one's
    plan and run make no temporary file."""
    from gpubatch.cli.demo_models import make_genome_model

    fasta = write_fasta(tmp_path / "ref.fa", {"chrA": CONTIG})
    model = make_genome_model(tmp_path / "g.onnx", 32, "NLC", n_outputs=2)
    outputs = {}
    for form, vcf in forms.items():
        job = genome_job(fasta, model, variants=str(vcf), length=32, max_bad_records=0.01)
        with temp_dir_watched(tmp_path / form, monkeypatch) if form == "gzip" else contextlib.nullcontext() as seen:
            sink = run_job(job, batch_size=64)
        assert not seen
        outputs[form] = {k: np.asarray(sink.column(k)) for k in ("variant_id", "pos", "ref_scores", "alt_scores")}
    assert len(outputs["plain"]["pos"]) > 1000
    for form in ("bgzip", "gzip"):
        for key, want in outputs["plain"].items():
            np.testing.assert_array_equal(outputs[form][key], want, err_msg=f"{form} {key}")



def _sniff_peak(path: Path) -> tuple[int, str]:
    """Peak traced bytes of reading ``path`` as the variants (refused), and the refusal."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(SpecError) as refused:
            read_variants(str(path), ContigTable(("chr1",), (10_000,)))
        return tracemalloc.get_traced_memory()[1], str(refused.value)
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("packed", ["plain", "gzip"])
def test_a_file_of_long_lines_is_told_apart_in_bounded_memory(tmp_path: Path, packed: str) -> None:
    """The layout check held the file's first 20 lines whole, bytes and text: an unwrapped FASTA
    given as the variants (a line a contig) took 360 MB of RSS for a 100 Mb contig against 102 MB
    for 10 Mb, before it was refused; a genome's first 20 contigs, gigabytes. Each line's first
    64 kB tells the layout: a VCF body whose first line is long still reads as one."""
    rng = np.random.default_rng(0)
    peaks = []
    for size in (1 << 20, 8 << 20):
        text = b">chr1\n" + np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, size)].tobytes() + b"\n>chr2\nAC\n"
        path = tmp_path / f"g{size}.fa"
        path.write_bytes(gzip.compress(text, 1) if packed == "gzip" else text)
        _sniff_peak(path)  # warm: imports
        peak, refusal = _sniff_peak(path)
        assert f"g{size}.fa: not a VCF/BCF" in refusal and "its first data line is '>chr1\\n'" in refusal
        peaks.append(peak)
    assert peaks[1] < 1 << 20 and peaks[1] < peaks[0] + (256 << 10), f"peaks {peaks}"
    body = tmp_path / "body.vcf"
    body.write_text(f"chr1\t2\t.\t{'A' * 100_000}\tA\nchr1\t5\trs5\tC\tT\n")
    table = read_variants(str(body), ContigTable(("chr1",), (200_000,)), max_bad=0.9)
    assert table.layout == variant_files.LAYOUT_BODY and table.variant_id == ["chr1:2:" + "A" * 100_000 + ":A", "rs5"]
