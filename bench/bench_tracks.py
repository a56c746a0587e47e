"""Track models (N, bins, tracks): variant scoring against the loop users write, and memory.

    python bench/bench_tracks.py --part loop   [--variants 400] [--length 196608] [--tracks 1000] [--repeats 3]
    python bench/bench_tracks.py --part memory [--counts 10000 100000] [--tracks 5000] [--length 2048]
    python bench/bench_tracks.py --part long   [--lengths 196608 524288] [--batches 1 2 4] [--counts 8 32]

``loop``: variants/s of gpubatch (``windows.variant_scores: [sad, log2fc, maxabs]``) beside the
script users write today: for each variant, pysam fetches the reference window, the alt window is
spliced, both are one-hot encoded in numpy, ONNX Runtime runs the pair and numpy reduces the two
(896, tracks) outputs to the three scores. Same model (an Enformer-shaped track model with a small
conv trunk, bench/models.py), same variants, alternating order; the scores of the two are compared.

``memory``: peak RSS of the client (the ``gpubatch run`` process) and of the worker for two cohort
sizes of a 5,000-track model: flat means bounded by the batch, not by the cohort. Also the
client's growth per variant (the variant table it plans from and the shards' task descriptions:
a few hundred bytes per variant; no output reaches the client).

``long``: 196,608 and 524,288 bp windows at batch sizes 1, 2 and 4, each at two cohort sizes: the
worker's peak follows the batch size, not the number of variants.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_genome import make_genome  # noqa: E402
from bench_memory import peak_rss  # noqa: E402
from common import WORK, alternate, machine, save, shards_only_row, steady_seconds, table  # noqa: E402
from models import make_track_model  # noqa: E402

SCORES = ["sad", "log2fc", "maxabs"]
BIN_SIZE = 128


def bins_for(length: int) -> int:
    """Enformer's crop: 896 of 1536 bins at 196,608 bp; the same share of longer windows."""
    return length // BIN_SIZE * 7 // 12


def model_for(length: int, tracks: int) -> Path:
    return make_track_model(WORK / f"tracks-{length}-{tracks}.onnx", length, tracks, bins_for(length), BIN_SIZE)


def make_vcf(fasta: Path, n: int, seed: int = 7) -> Path:
    """``n`` sorted variants, REF from the FASTA: four SNVs for each 1-base deletion and insertion."""
    import pysam

    path = WORK / f"variants-{fasta.stem}-{n}.vcf"
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    ref = pysam.FastaFile(str(fasta))
    lines = ["##fileformat=VCFv4.2", *(f"##contig=<ID={c},length={n_}>" for c, n_ in zip(ref.references, ref.lengths, strict=True)),
             "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    per = np.bincount(rng.integers(0, len(ref.references), n), minlength=len(ref.references))
    for chrom, length, k in zip(ref.references, ref.lengths, per, strict=True):
        seq = ref.fetch(chrom).upper()
        for i, pos in enumerate(np.sort(rng.integers(2, length - 2, k))):
            base = seq[pos - 1]
            other = "ACGT"[("ACGT".index(base) + 1) % 4] if base in "ACGT" else "A"
            r, a = {4: (base + seq[pos], base), 5: (base, base + other)}.get(i % 6, (base, other))
            lines.append(f"{chrom}\t{pos}\t.\t{r}\t{a}\t.\t.\t.")
    path.write_text("\n".join(lines) + "\n")
    return path


def job_dict(fasta: Path, vcf: Path, model: Path, length: int, batch: int, out: Path) -> dict[str, Any]:
    return {
        "name": "bench-tracks", "kind": "genome",
        "windows": {"reference": str(fasta), "variants": str(vcf), "length": length,
                    "variant_scores": SCORES, "windows_per_shard": 1024},
        "model": {"path": str(model), "backend": "onnxruntime", "batch_size": batch},
        "output": {"uri": str(out), "formats": ["zarr", "parquet"]},
        "run": {"profile": "local", "workers": 1, "readers": 2},
    }


# ------------------------------------------------------------------------------------------------
# the loop users write


class VariantLoop:
    """pysam fetch, splice, one-hot, the model on the (ref, alt) pair, numpy scores: per variant."""

    ONE_HOT = np.zeros((256, 4), np.float32)
    for i, b in enumerate(b"ACGT"):
        ONE_HOT[b, i] = ONE_HOT[ord(chr(b).lower()), i] = 1.0

    def __init__(self, fasta: Path, model: Path, length: int):
        import onnxruntime as ort
        import pysam

        self.fasta, self.length = pysam.FastaFile(str(fasta)), length
        self.sizes = dict(zip(self.fasta.references, self.fasta.lengths, strict=True))
        self.sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        self.name = self.sess.get_inputs()[0].name

    def fetch(self, chrom: str, start: int, end: int) -> str:
        lo, hi = max(start, 0), min(end, self.sizes[chrom])
        return "N" * (lo - start) + self.fasta.fetch(chrom, lo, hi) + "N" * (end - max(hi, start))

    def score(self, chrom: str, pos: int, ref: str, alt: str) -> dict[str, np.ndarray]:
        p, length = pos - 1, self.length
        start = p - length // 2
        ref_seq = self.fetch(chrom, start, start + length)
        alt_seq = (ref_seq[: p - start] + alt + self.fetch(chrom, p + len(ref), p + len(ref) + length))[:length]
        x = self.ONE_HOT[np.frombuffer((ref_seq + alt_seq).encode(), np.uint8)].reshape(2, length, 4)
        r, a = self.sess.run(None, {self.name: x})[0]
        s_ref, s_alt = r.sum(0, dtype=np.float64), a.sum(0, dtype=np.float64)
        return {"sad": s_alt - s_ref, "log2fc": np.log2((s_alt + 1) / (s_ref + 1)), "maxabs": np.abs(a - r).max(0)}

    def run(self, vcf: Path, out: Path) -> int:
        import pysam

        scores: dict[str, list[np.ndarray]] = {s: [] for s in SCORES}
        with pysam.VariantFile(str(vcf)) as records:
            for rec in records:
                for alt in rec.alts or ():
                    for k, v in self.score(rec.chrom, rec.pos, rec.ref, alt).items():
                        scores[k].append(v.astype(np.float32))
        for k, v in scores.items():
            np.save(out / f"loop-{k}.npy", np.stack(v))
        return len(scores["sad"])


def part_loop(args: argparse.Namespace) -> dict[str, Any]:
    import gpubatch
    from gpubatch.spec import parse_job

    fasta, model = make_genome(args.bases), model_for(args.length, args.tracks)
    vcf = make_vcf(fasta, args.variants)
    out = WORK / "out-tracks"
    out.mkdir(parents=True, exist_ok=True)
    loop = VariantLoop(fasta, model, args.length)
    last: dict[str, Any] = {}

    def run_gpubatch() -> int:
        job = parse_job(job_dict(fasta, vcf, model, args.length, args.batch, out / "gpubatch"))
        result = gpubatch.run(job, show_progress=False, overwrite=True)
        last["report"] = result.report
        last.setdefault("steady_s", []).append(steady_seconds(Path(result.output_uri)))
        return int(result.report["items"])

    results = alternate({"gpubatch": run_gpubatch, "per-variant loop": lambda: loop.run(vcf, out)}, args.repeats)
    g = results["gpubatch"]
    rows = [{"contestant": m.name, "variants": m.items, "median s": m.median_s, "variants/s": m.items_per_s,
             "gpubatch x": g.items_per_s / m.items_per_s} for m in results.values()]
    rows.insert(1, shards_only_row(g, last["steady_s"], "variants", "variants/s"))
    print(table(rows, ["contestant", "variants", "median s", "variants/s", "gpubatch x"]))
    scored = gpubatch.open_results(out / "gpubatch")
    agreement = {k: float(np.abs(scored.array(f"{k}_tracks") - np.load(out / f"loop-{k}.npy")).max()) for k in SCORES}
    print(f"largest |gpubatch - loop| per score: {agreement}")
    return {"rows": rows, "agreement_max_abs": agreement, "starvation": last["report"]["starvation"],
            "verdict": last["report"]["verdict"]["text"], "tracks": args.tracks, "length": args.length,
            "bins": bins_for(args.length), "batch": args.batch}


# ------------------------------------------------------------------------------------------------
# memory against cohort size


def measure(fasta: Path, n: int, model: Path, length: int, batch: int, tag: str) -> dict[str, float]:
    vcf = make_vcf(fasta, n)
    out = WORK / "out-tracks-memory" / tag
    path = WORK / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(job_dict(fasta, vcf, model, length, batch, out)))
    peak = peak_rss([sys.executable, "-m", "gpubatch", "run", str(path), "--overwrite"])
    print(f"  {tag}: client {peak['client_mb']:.0f} MB, worker {peak['worker_mb']:.0f} MB "
          f"({peak['worker_anon_mb']:.0f} MB anonymous), {peak['seconds']:.0f} s", flush=True)
    return peak


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    fasta, model = make_genome(args.bases), model_for(args.length, args.tracks)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.counts}
    for r in range(args.repeats):
        for n in (args.counts if r % 2 == 0 else list(reversed(args.counts))):
            runs[n].append(measure(fasta, n, model, args.length, args.batch, f"mem-{n}"))
    rows = [{"variants": n, **_medians(runs[n])} for n in args.counts]
    small, big = rows[0], rows[-1]
    for row in rows:
        row["client growth"] = f"{row['client_mb'] / small['client_mb'] - 1:+.1%}"
        row["worker growth"] = f"{row['worker_mb'] / small['worker_mb'] - 1:+.1%}"
    per_variant = (big["client_mb"] - small["client_mb"]) * 2**20 / max(1, big["variants"] - small["variants"])
    print(table(rows, ["variants", "client_mb", "worker_mb", "worker_anon_mb", "seconds", "client growth", "worker growth"]))
    print(f"client growth per variant: {per_variant:.0f} bytes")
    return {"rows": rows, "runs": {str(n): v for n, v in runs.items()}, "client_bytes_per_variant": per_variant,
            "tracks": args.tracks, "length": args.length, "bins": bins_for(args.length), "batch": args.batch}


def part_long(args: argparse.Namespace) -> dict[str, Any]:
    fasta = make_genome(args.bases)
    rows = []
    for length in args.lengths:
        model = model_for(length, args.tracks)
        for batch in args.batches:
            peaks = {n: measure(fasta, n, model, length, batch, f"long-{length}-{batch}-{n}") for n in args.counts}
            small, big = peaks[args.counts[0]], peaks[args.counts[-1]]
            rows.append({"length": length, "bins": bins_for(length), "batch": batch,
                         **{f"worker_mb at {n}": p["worker_mb"] for n, p in peaks.items()},
                         **{f"client_mb at {n}": p["client_mb"] for n, p in peaks.items()},
                         "worker growth": f"{big['worker_mb'] / small['worker_mb'] - 1:+.1%}"})
    print(table(rows, list(rows[0])))
    return {"rows": rows, "tracks": args.tracks, "counts": args.counts}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["loop", "memory", "long"], default="loop")
    ap.add_argument("--bases", type=int, default=20_000_000, help="synthetic genome size")
    ap.add_argument("--variants", type=int, default=400, help="loop: variants scored")
    ap.add_argument("--length", type=int, default=0, help="window (default: loop 196608, memory 2048)")
    ap.add_argument("--tracks", type=int, default=0, help="default: loop 1000, memory 5000, long 1000")
    ap.add_argument("--batch", type=int, default=0, help="variants per batch (default: loop 4, memory 32)")
    ap.add_argument("--counts", type=int, nargs="+", default=None, help="cohort sizes, smallest first")
    ap.add_argument("--lengths", type=int, nargs="+", default=[196_608, 524_288])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    memory = args.part == "memory"
    args.length = args.length or (2048 if memory else 196_608)
    args.tracks = args.tracks or (5000 if memory else 1000)
    args.batch = args.batch or (32 if memory else 4)
    args.counts = args.counts or ([10_000, 100_000] if memory else [8, 32])
    WORK.mkdir(parents=True, exist_ok=True)
    data = {"loop": part_loop, "memory": part_memory, "long": part_long}[args.part](args)
    data |= {"machine": machine(), "command": "python bench/bench_tracks.py " + " ".join(argv or sys.argv[1:])}
    save(args.out, data)
    return data


if __name__ == "__main__":
    main()
