"""Genome ingest of a draft assembly: many small contigs, an array each against packed into one.

    python bench/bench_ingest_contigs.py [--contigs 20000] [--min 200] [--max 2000] [--repeats 1] [--out F]

A draft assembly of a non-model organism has hundreds of thousands of scaffolds. Layout version 1
gave each contig its own zarr array (``pack_below=0`` writes that way today): metadata writes and
store round trips per contig, 8-16 ms each on a local disk, so ingest time followed the contig
count. Layout version 2 packs contigs under 1 Mb into one array with an offset each. Both
contestants ingest the same FASTA in alternating order; each is then read back whole, contig by
contig, by a fresh reader (a worker's first pass over them), and the two genomes compared.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK, alternate, publish  # noqa: E402

from gpubatch.sources.genome.ingest import PACK_BELOW, ingest_genome  # noqa: E402
from gpubatch.sources.genome.opening import open_reference  # noqa: E402
from gpubatch.sources.genome.reference import load_contigs

LAYOUTS = {"array per contig (layout 1)": 0, "packed (layout 2)": PACK_BELOW}


def make_assembly(contigs: int, shortest: int, longest: int, seed: int = 1) -> Path:
    """A FASTA of ``contigs`` scaffolds of uniform random length, soft-masked stretches and N gaps
    among the bases, 60 bases a line."""
    path = WORK / f"assembly-{contigs}-{shortest}-{longest}.fa"
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"ACGTACGTACGTacgtN", np.uint8)
    with path.open("w") as f:
        for i in range(contigs):
            seq = alphabet[rng.integers(0, len(alphabet), int(rng.integers(shortest, longest + 1)))].tobytes().decode()
            f.write(f">scaffold_{i} len={len(seq)}\n" + "\n".join(seq[j:j + 60] for j in range(0, len(seq), 60)) + "\n")
    return path


def ingest(fasta: Path, out: Path, pack_below: int) -> int:
    shutil.rmtree(out, ignore_errors=True)
    return len(ingest_genome(str(fasta), str(out), pack_below=pack_below)["contigs"])


def read_all(out: Path) -> tuple[float, list[bytes]]:
    """Seconds to read every contig whole through a fresh reader, and the codes read."""
    t0 = time.perf_counter()
    contigs = load_contigs(str(out))
    reference = open_reference(str(out))
    codes = [bytes(reference.fetch(name, 0, length)) for name, length in zip(contigs.names, contigs.lengths, strict=True)]
    return time.perf_counter() - t0, codes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contigs", type=int, default=20000)
    ap.add_argument("--min", type=int, default=200)
    ap.add_argument("--max", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    fasta = make_assembly(args.contigs, args.min, args.max)
    outs = {name: WORK / f"ingest-{i}.zarr" for i, name in enumerate(LAYOUTS)}
    results = alternate({name: lambda n=name: ingest(fasta, outs[n], LAYOUTS[n]) for name in LAYOUTS},
                        args.repeats)
    reads = {name: read_all(outs[name]) for name in LAYOUTS}
    first, *rest = (codes for _, codes in reads.values())
    assert all(codes == first for codes in rest), "the layouts read different bases"
    bases = sum(len(c) for c in first)
    base_s = results[next(iter(LAYOUTS))].median_s
    rows = [{"layout": name, "contigs": m.items, "bases": bases, "ingest s (median)": m.median_s,
             "ms per contig": 1000 * m.median_s / m.items, "ingest x": base_s / m.median_s,
             "read all contigs s": reads[name][0]} for name, m in results.items()]
    publish("bench_ingest_contigs.py", rows, list(rows[0]), args.out, argv,
            rounds={name: m.seconds for name, m in results.items()},
            spread={name: statistics.pstdev(m.seconds) for name, m in results.items()})


if __name__ == "__main__":
    main()
