"""Every source passes SourceTests: slides, genome windows and variant pairs, on real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import shared_file

from gpubatch.spec import JobSpec
from gpubatch.testing.sources import SourceTests


def _job(**sections: Any) -> JobSpec:
    return JobSpec.model_validate({"model": {"path": "model.onnx"}, "output": {"uri": "out"}, **sections})


class TestSlides(SourceTests):
    @pytest.fixture()
    def job(self, slide_path: Path) -> JobSpec:
        return _job(kind="slides", input={"uris": [str(slide_path), str(shared_file("slides", "CMU-1-Small-Region.svs"))]},
                    tiles={"size": 64, "mpp": 0.5, "read_block": 256, "tissue": {"method": "none"}})

    @pytest.fixture()
    def bad_job(self) -> JobSpec:  # opens, but its tile data is corrupt
        return _job(kind="slides", input={"uris": [str(shared_file("slides", "unreadable.svs"))]},
                    tiles={"size": 16, "level": 0, "tissue": {"method": "none"}})


class TestGenomeWindows(SourceTests):
    @pytest.fixture()
    def job(self) -> JobSpec:
        windows = {"reference": str(shared_file("genomics", "tangermeme", "test.fa")),
                   "regions": str(shared_file("genomics", "tangermeme", "test.bed")),
                   "length": 40, "stride": 17, "windows_per_shard": 7, "chunk_bases": 1024}
        return _job(kind="genome", windows=windows)

    @pytest.fixture()
    def bad_job(self, tmp_path: Path) -> JobSpec:
        """A FASTA cut short after its index was made: sequence past the cut cannot be read."""
        fa = shared_file("genomics", "tangermeme", "test.fa")
        cut = tmp_path / "cut.fa"
        cut.write_bytes(fa.read_bytes()[:200])
        (tmp_path / "cut.fa.fai").write_bytes(fa.with_suffix(".fa.fai").read_bytes())
        return _job(kind="genome", windows={"reference": str(cut), "regions": "genome", "length": 100})


VCF_HEAD = "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"


class TestVariantPairs(SourceTests):
    @pytest.fixture()
    def job(self, tmp_path: Path) -> JobSpec:
        """SNVs, an insertion, a deletion, a multi-allelic record, one at a contig's first base;
        REF alleles are the reference's (read with pysam), except one N: a flagged mismatch."""
        pysam = pytest.importorskip("pysam")
        fa = shared_file("genomics", "tangermeme", "test.fa")
        with pysam.FastaFile(str(fa)) as ref:
            def at(chrom: str, pos: int, n: int = 1) -> str:
                return ref.fetch(chrom, pos - 1, pos - 1 + n).upper()

            records = [f"chr1\t1\ts1\t{at('chr1', 1)}\tG", f"chr1\t40\ts2\t{at('chr1', 40)}\tCAT",
                       f"chr2\t20\ts3\t{at('chr2', 20, 3)}\tG", f"chr3\t55\ts4\t{at('chr3', 55)}\tA,C",
                       "chr7\t90\ts5\tN\tT"]
        vcf = tmp_path / "v.vcf"
        vcf.write_text(VCF_HEAD + "".join(f"{r}\t.\t.\t.\n" for r in records))
        windows = {"reference": str(fa), "variants": str(vcf), "max_ref_mismatch": 0.2,
                   "length": 30, "windows_per_shard": 3, "reverse_complement": "average"}
        return _job(kind="genome", windows=windows)

    @pytest.fixture()
    def bad_job(self, tmp_path: Path) -> JobSpec:
        vcf = tmp_path / "bad.vcf"
        vcf.write_text(VCF_HEAD + "chrZ\t5\t.\tA\tG\t.\t.\t.\n")
        windows = {"reference": str(shared_file("genomics", "tangermeme", "test.fa")), "variants": str(vcf),
                   "length": 30}
        return _job(kind="genome", windows=windows)
