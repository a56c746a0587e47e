"""Genome jobs at overnight sizes: the peak RSS of `gpubatch run` (inline profile: client and
worker in one process) against the number of windows, variants, BED regions or contigs.

    python bench/bench_genome_scale.py windows [--sizes 100000 1000000 5000000]
    python bench/bench_genome_scale.py variants [--sizes 100000 1000000]
    python bench/bench_genome_scale.py regions [--sizes 10000 100000]
    python bench/bench_genome_scale.py contigs [--sizes 5000 50000]
    add --validate to measure `gpubatch validate` (the plan alone) instead of `run`

Windows are 1 kb over one 10 Mb synthetic chromosome, their number set by the stride (10 Mb at
stride 100 is 100,000 windows, at stride 2 five million): reading is one long read sliced into
windows, so the stride costs no reference bytes, and what grows is what the client plans, tracks,
merges and reports. Variants are a VCF of SNVs (every 50th symbolic ``<DEL>``, every 70th with an
IUPAC ``R`` ALT: both quarantined by the variant guard) over a 20 Mb chromosome. Regions are BED
intervals of 2 kb over 200 Mb; contigs are that many 2 kb contigs (one window each). The model
sums the one-hot input (``make_identity_onehot_model``): the cheapest model there is, so the run is
the framework's own work.

The peak is the child's ru_maxrss (os.wait4), i.e. VmHWM: one number per process, so each size
runs in its own process. "flat" means the largest size's peak within ~15% of the smallest's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIR = WORK / "scale"
LENGTH = 1000
WINDOWS_BASES = 10_000_000
VARIANT_BASES = 20_000_000


def _genome(name: str, contigs: dict[str, int]) -> Path:
    from gpubatch.cli.demo import write_synthetic_genome

    path = DIR / name
    if not path.exists():
        write_synthetic_genome(path, contigs, seed=7)
    return path


def _model(length: int) -> Path:
    from gpubatch.cli.demo_models import make_identity_onehot_model

    path = DIR / f"counts-{length}.onnx"
    if not path.exists():
        make_identity_onehot_model(path, length)
    return path


def _vcf(n: int, fasta: Path) -> Path:
    """n records on chr1, REF from the reference; symbolic and IUPAC ALTs sprinkled in."""
    path = DIR / f"variants-{n}.vcf"
    if path.exists():
        return path
    body = b"".join(line.strip() for line in fasta.read_bytes().split(b"\n")[1:] if not line.startswith(b">"))
    pos = np.linspace(LENGTH, VARIANT_BASES - LENGTH, n).astype(np.int64)
    with path.open("w") as f:
        f.write(f"##fileformat=VCFv4.2\n##contig=<ID=chr1,length={VARIANT_BASES}>\n"
                "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n")
        for i, p in enumerate(pos.tolist()):
            ref = chr(body[p - 1])
            alt = "<DEL>" if i % 50 == 0 else "R" if i % 70 == 0 else ("A" if ref != "A" else "G")
            f.write(f"chr1\t{p}\tv{i}\t{ref}\t{alt}\t.\t.\t.\n")
    return path


def _bed(n: int) -> Path:
    path = DIR / f"regions-{n}.bed"
    if not path.exists():
        step = 200_000_000 // n
        path.write_text("".join(f"chr1\t{i * step}\t{i * step + 2 * LENGTH}\n" for i in range(n)))
    return path


def job(workload: str, n: int) -> Path:
    """The job spec of one size (inputs written on first use, under bench/_work/scale)."""
    DIR.mkdir(parents=True, exist_ok=True)
    windows: dict[str, object] = {"length": LENGTH}
    if workload == "windows":
        windows |= {"reference": str(_genome("windows.fa", {"chr1": WINDOWS_BASES})), "regions": "genome",
                    "stride": WINDOWS_BASES // n}
    elif workload == "variants":
        fasta = _genome("variants.fa", {"chr1": VARIANT_BASES})
        windows |= {"reference": str(fasta), "variants": str(_vcf(n, fasta)), "max_bad_records": 1.0}
    elif workload == "regions":
        windows |= {"reference": str(_genome("regions.fa", {"chr1": 200_000_000})), "regions": str(_bed(n))}
    else:
        fasta = _genome(f"contigs-{n}.fa", {f"c{i}": 2 * LENGTH for i in range(n)})
        windows |= {"reference": str(fasta), "regions": "genome", "stride": 2 * LENGTH}
    spec = {"name": f"scale-{workload}-{n}", "kind": "genome", "windows": windows,
            "model": {"path": str(_model(LENGTH)), "backend": "onnxruntime", "batch_size": 256},
            "output": {"uri": str(DIR / f"out-{workload}-{n}"), "formats": ["zarr", "parquet"]}}
    path = DIR / f"job-{workload}-{n}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


#: runs the command and prints its peak RSS in kB: started from this small process, the command's
#: ru_maxrss is its own (a process started from this one, after it wrote a 200 Mb genome, would
#: report this one's peak: exec keeps the old memory's high-water mark)
_LAUNCH = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def measure(spec: Path, validate: bool) -> tuple[float, float, int]:
    """Peak RSS (MB) and seconds of one `gpubatch run` (or validate) in a child process."""
    out = Path(yaml.safe_load(spec.read_text())["output"]["uri"])
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "gpubatch", "validate" if validate else "run", str(spec), "--profile", "inline"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _LAUNCH, *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
    return int(done.stdout.split()[-1]) / 1024, seconds, done.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=["windows", "variants", "regions", "contigs"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--validate", action="store_true", help="the plan alone (gpubatch validate)")
    args = ap.parse_args()
    print(f"| {args.workload} | command | peak RSS (MB) | seconds | exit |\n|---|---|---|---|---|", flush=True)
    for n in args.sizes:
        spec = job(args.workload, n)
        rss, seconds, rc = measure(spec, args.validate)
        print(f"| {n:,} | {'validate' if args.validate else 'run'} | {rss:.0f} | {seconds:.1f} | {rc} |", flush=True)


if __name__ == "__main__":
    main()
