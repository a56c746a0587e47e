"""Reading a variant file's records through the guard against pysam reading it without one.

    python bench/bench_variant_guard.py [--records 1000000] [--cohort-records 20000] [--samples 2000]
                                        [--formats vcf,bcf] [--repeats 3] [--out F]

Variant mode reads a VCF's or BCF's records through a guard (``variant_guard`` for text,
``variant_bcf`` for BCF): a thread copies the file into a pipe for htslib, each record's fields
bounded and its samples cut off, so that no record costs memory in proportion to its size. This
times that plain read (``variant_files.iter_records``, to each record's CHROM, POS, ID, REF and
ALT) beside the reader without a guard: pysam opening the file by its path, sample data left
unparsed (``subset_samples([])``), the same five fields asked of each record. Two files of each
format, bgzip-compressed: ``sites``, ``--records`` records without samples (an annotation or
GWAS-hit VCF), and ``cohort``, ``--cohort-records`` records of ``--samples`` genotypes each. The
contestants alternate; their records are compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, alternate, publish  # noqa: E402

from gpubatch.sources.genome.variant_files import RawRecord, iter_records, sniff  # noqa: E402
from gpubatch.sources.genome.variant_stream import VariantInput  # noqa: E402

#: the longest REF or ALT held (the default windows.chunk_bases)
MAX_ALLELE = 1 << 20
Fields = tuple[str, int, str | None, str, tuple[str, ...]]


def make_vcf(records: int, samples: int, fmt: str, seed: int = 3) -> Path:
    """A bgzip VCF (or a BCF converted from it by htslib) of ``records`` sorted records on 22
    contigs, mostly SNVs with some indels, IDs on half, each with ``samples`` GT columns."""
    import pysam

    stem = WORK / f"guard-{records}-{samples}"
    path = Path(f"{stem}.{'vcf.gz' if fmt == 'vcf' else 'bcf'}")
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    text = Path(f"{stem}.vcf")
    rng = np.random.default_rng(seed)
    columns = "\tFORMAT" + "".join(f"\tS{i}" for i in range(samples)) if samples else ""
    genotypes = "\tGT" + "".join(rng.choice(["\t0|0", "\t0|1", "\t1|1"], samples)) if samples else ""
    with text.open("w") as f:
        f.write("##fileformat=VCFv4.2\n" + "".join(f"##contig=<ID=chr{c},length=250000000>\n" for c in range(1, 23))
                + '##INFO=<ID=DP,Number=1,Type=Integer,Description="Depth">\n'
                + '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
                + f"#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO{columns}\n")
        per_contig = -(-records // 22)
        for i in range(records):
            contig, pos = i // per_contig + 1, 100 + 37 * (i % per_contig)
            ref, alt = ("A", "G") if i % 10 else ("AT", "A") if i % 20 else ("C", "CTT")
            f.write(f"chr{contig}\t{pos}\t{f'rs{i}' if i % 2 else '.'}\t{ref}\t{alt}\t50\tPASS\tDP={i % 90}"
                    f"{genotypes}\n")
    partial = Path(f"{path}.partial")  # renamed once whole: a run stopped midway leaves no file taken as made
    if fmt == "vcf":
        pysam.tabix_compress(str(text), str(partial), force=True)
    else:
        with pysam.VariantFile(str(text)) as src, pysam.VariantFile(str(partial), "wb", header=src.header) as out:
            for rec in src:
                out.write(rec)
    text.unlink()
    return partial.rename(path)


def guarded(path: Path) -> Iterator[Fields]:
    """The records as variant mode reads them: through the guard's pipe."""
    source = VariantInput(str(path))
    for rec in iter_records(source, sniff(source), MAX_ALLELE):
        assert isinstance(rec, RawRecord), rec
        yield rec.chrom, rec.pos, rec.record_id, rec.ref, rec.alts


def unguarded(path: Path) -> Iterator[Fields]:
    """The records as pysam reads the file by its path, samples unparsed: the reader before the guard."""
    import pysam

    with pysam.VariantFile(str(path)) as vf:
        if len(vf.header.samples):
            vf.subset_samples([])
        for rec in vf:
            yield rec.chrom, int(rec.pos), rec.id, rec.ref or ".", tuple(rec.alts or ())


CONTESTANTS = {"guarded (variant mode)": guarded, "pysam by path, no guard": unguarded}


def bench_file(path: Path, label: str, fmt: str, samples: int, repeats: int) -> list[dict[str, object]]:
    """One file's rows: each contestant's median seconds and records per second, beside the other's."""
    same = all(a == b for a, b in zip(guarded(path), unguarded(path), strict=True))
    assert same, f"{path.name}: the contestants read different records"
    results = alternate({name: lambda read=read: sum(1 for _ in read(path)) for name, read in CONTESTANTS.items()},
                        repeats, warmup=1)
    counts = {m.items for m in results.values()}
    assert len(counts) == 1, f"{path.name}: the contestants read {counts} records"
    base = results["pysam by path, no guard"].median_s
    return [{"file": label, "format": fmt, "records": m.items, "samples": samples, "reader": name,
             "s (median)": m.median_s, "records/s": m.items_per_s, "x of no guard": m.median_s / base,
             "spread s": statistics.pstdev(m.seconds)} for name, m in results.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--cohort-records", type=int, default=20_000)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--formats", default="vcf,bcf")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = []
    for fmt in args.formats.split(","):
        for label, records, samples in (("sites", args.records, 0), ("cohort", args.cohort_records, args.samples)):
            path = make_vcf(records, samples, fmt)
            print(f"{label} {fmt}: {path.name}, {path.stat().st_size / 1e6:.1f} MB", flush=True)
            rows += bench_file(path, label, fmt, samples, args.repeats)
    publish("bench_variant_guard.py", rows, list(rows[0]), args.out, argv)


if __name__ == "__main__":
    main()
