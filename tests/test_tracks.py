"""Track models (N, bins, tracks): reductions, strand averaging and per-track variant scores.

Every expected value comes from the sequence alone: the FASTA read with pysam or pyfaidx, bases
counted per bin with a hand-written table, alt windows spliced as strings, the reverse strand
spelled out base by base. The model is an oracle exported to ONNX (per bin, the fraction of each
base, mixed into tracks by a fixed integer matrix), so with power-of-two bins every value the job
writes is exact in float32, and any slip of bins, strands, windows or ref/alt shows.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import shared_file

import gpubatch
from gpubatch.core.errors import SpecError
from gpubatch.spec import parse_job

pysam = pytest.importorskip("pysam")
zarr = pytest.importorskip("zarr")

SARS = "MN908947.3"
#: tracks = fractions (A, C, G, T) @ MIX: six tracks, fixed small integers
MIX = np.array([[1, 0, 0, 0, 2, 1], [0, 1, 0, 0, 0, 1], [0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 3]])
BIN, CROP = 16, 1
COMPLEMENT = {"A": "T", "C": "G", "G": "C", "T": "A"}
COUNTED = "ACGT"


# ------------------------------------------------------------------------------------------------
# the independent reference: strings, counts, numpy sums


def window(fasta: Any, contigs: dict[str, int], chrom: str, start: int, end: int) -> str:
    """Upper-case bases of [start, end), N where the window leaves the contig."""
    lo, hi = max(start, 0), min(end, contigs[chrom])
    body = str(fasta.fetch(chrom, lo, hi)).upper() if hi > lo else ""
    return "N" * (lo - start) + body + "N" * (end - max(hi, start))


def reverse_complement(seq: str) -> str:
    return "".join(COMPLEMENT.get(b, "N") for b in reversed(seq))


def bin_tracks(seq: str) -> np.ndarray:
    """(bins, 6): per bin past the cropped ends, the fraction of each base, times MIX."""
    bins = [seq[i : i + BIN] for i in range(0, len(seq), BIN)][CROP : len(seq) // BIN - CROP]
    fractions = np.array([[b.count(base) / BIN for base in COUNTED] for b in bins])
    return fractions @ MIX


def alt_window(fasta: Any, contigs: dict[str, int], chrom: str, pos: int, ref: str, alt: str,
               length: int) -> str:
    """The variants module's rule, spelled with strings: left flank fixed, right flank refilled."""
    p = pos - 1
    start = p - length // 2
    left = window(fasta, contigs, chrom, start, p)
    right = window(fasta, contigs, chrom, p + len(ref), p + len(ref) + length)
    return (left + alt + right)[:length]


def expected_reduction(tracks: np.ndarray, how: str, k: int | None) -> np.ndarray:
    n = tracks.shape[0]
    k = (1 if how == "center" else n) if k is None else k
    part = tracks[(n - k) // 2 : (n - k) // 2 + k]
    return part.max(axis=0) if how == "max" else part.sum(axis=0) / (k if how in ("mean", "center") else 1)


# ------------------------------------------------------------------------------------------------
# fixtures and runs


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gpubatch.cli.demo_models import make_bin_fraction_model

    d = tmp_path_factory.mktemp("track-models")
    return {"NLT": make_bin_fraction_model(d / "nlt.onnx", 128, BIN, "NLC", MIX, CROP),
            "NTL": make_bin_fraction_model(d / "ntl.onnx", 128, BIN, "NCL", MIX, CROP, tracks_last=False),
            "ACGT": make_bin_fraction_model(d / "acgt.onnx", 128, BIN, "NLC", None, CROP)}


def sars() -> tuple[Any, dict[str, int], Path]:
    path = shared_file("genomics", "sarscov2", "EMN908947.fa")
    fasta = pysam.FastaFile(str(path))
    return fasta, dict(zip(fasta.references, fasta.lengths, strict=True)), path


def run(tmp_path: Path, model: Path, reference: Path, name: str = "out", model_keys: dict[str, Any] | None = None,
        **windows: Any) -> Path:
    job = parse_job({
        "name": "tracks", "kind": "genome",
        "windows": {"reference": str(reference), "length": 128, **windows},
        "model": {"path": str(model), "backend": "onnxruntime", "batch_size": 3, **(model_keys or {})},
        "output": {"uri": str(tmp_path / name)},
        "run": {"profile": "inline", "readers": 2, "prefetch_batches": 2},
    })
    result = gpubatch.run(job, show_progress=False)
    assert result.report["failed"] == []
    return Path(result.output_uri)


def zarr_group(out: Path, shard: str) -> Any:
    """A committed shard's zarr group, found the way readers must: through the root's ``groups``."""
    root = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    return zarr.open_group(str(out / "predictions.zarr" / root.attrs["groups"][shard]), mode="r")


def zarr_array(out: Path, name: str) -> np.ndarray:
    """One output across the shards' zarr groups, in plan order."""
    shards = zarr.open_group(str(out / "predictions.zarr"), mode="r").attrs["shards"]
    return np.concatenate([zarr_group(out, s)[name][:] for s in shards])


def columns(table: Any, prefix: str) -> np.ndarray:
    names = [c for c in table.column_names if c.startswith(prefix + "_") and c[len(prefix) + 1 :].isdigit()]
    names.sort(key=lambda c: int(c[len(prefix) + 1 :]))
    return np.stack([table.column(c).to_numpy() for c in names], axis=1)


# ------------------------------------------------------------------------------------------------
# windows


@pytest.mark.parametrize(("how", "k"), [("sum", None), ("mean", None), ("max", None), ("center", None),
                                         ("center", 2), ("sum", 3)])
def test_window_reductions_are_exact(tmp_path: Path, models: dict[str, Path], how: str, k: int | None) -> None:
    fasta, contigs, path = sars()
    rule = {"how": how, **({"bins": k} if k else {})}
    out = run(tmp_path, models["NLT"], path, regions=[f"{SARS}:29000-29903"], stride=100,
              model_keys={"reduce": {"tracks": rule}})
    table = pq.read_table(out / "predictions.parquet")
    starts = table.column("start").to_numpy()
    assert len(starts) == 9 and table.column("end").to_numpy()[-1] > contigs[SARS]  # the last is N-padded
    truth = np.stack([bin_tracks(window(fasta, contigs, SARS, s, s + 128)) for s in starts])
    expected = np.stack([expected_reduction(t, how, k) for t in truth]).astype(np.float32)
    np.testing.assert_allclose(columns(table, "tracks"), expected, rtol=1e-6, atol=0)
    np.testing.assert_allclose(zarr_array(out, "tracks"), expected, rtol=1e-6, atol=0)
    assert "tracks_bins" not in zarr_group(out, "windows-000000")


def test_track_output_is_whole_in_zarr_never_in_parquet(tmp_path: Path, models: dict[str, Path]) -> None:
    """Before: a (N, 6, 4) output became 24 parquet columns of a flattened array (tracks_0 ...
    tracks_23); now it is zarr only, whole, and a reduction with ``keep`` writes both."""
    fasta, contigs, path = sars()
    out = run(tmp_path, models["ACGT"], path, regions=[f"{SARS}:100-1000"])
    table = pq.read_table(out / "predictions.parquet")
    assert table.column_names == ["chrom", "start", "end", "strand", "region"]
    starts = table.column("start").to_numpy()
    seqs = [window(fasta, contigs, SARS, s, s + 128) for s in starts]
    fractions = np.stack([[[b.count(base) / BIN for base in COUNTED] for b in
                           [s[i : i + BIN] for i in range(BIN, 128 - BIN, BIN)]] for s in seqs])
    np.testing.assert_array_equal(zarr_array(out, "tracks"), fractions.astype(np.float32))

    kept = run(tmp_path, models["NLT"], path, "kept", {"reduce": {"tracks": {"how": "max", "keep": True}}},
               regions=[f"{SARS}:100-1000"])
    truth = np.stack([bin_tracks(s) for s in seqs])
    np.testing.assert_array_equal(zarr_array(kept, "tracks_bins"), truth.astype(np.float32))
    np.testing.assert_array_equal(columns(pq.read_table(kept / "predictions.parquet"), "tracks"), truth.max(axis=1))


def test_reverse_complement_average_flips_the_bins(tmp_path: Path, models: dict[str, Path]) -> None:
    """The reverse strand's bin j covers the forward window's bin (bins - 1 - j). Before this fix
    the two strands were averaged bin j with bin j: this test failed on that code."""
    fasta, contigs, path = sars()
    out = run(tmp_path, models["NLT"], path, regions=[f"{SARS}:5000-5640"], reverse_complement="average")
    starts = pq.read_table(out / "predictions.parquet").column("start").to_numpy()
    seqs = [window(fasta, contigs, SARS, s, s + 128) for s in starts]
    forward = np.stack([bin_tracks(s) for s in seqs])
    reverse = np.stack([bin_tracks(reverse_complement(s))[::-1] for s in seqs])  # back on forward bins
    np.testing.assert_array_equal(zarr_array(out, "tracks"), ((forward + reverse) / 2).astype(np.float32))


def test_tracks_by_bins_layout(tmp_path: Path, models: dict[str, Path]) -> None:
    """A model that answers (N, tracks, bins), gReLU's and Borzoi's torch layout, with NCL input."""
    fasta, contigs, path = sars()
    out = run(tmp_path, models["NTL"], path, regions=[f"{SARS}:200-700"], encoding={"layout": "NCL"},
              model_keys={"track_layout": "NTL", "reduce": {"tracks": {"how": "center", "keep": True}}})
    starts = pq.read_table(out / "predictions.parquet").column("start").to_numpy()
    truth = np.stack([bin_tracks(window(fasta, contigs, SARS, s, s + 128)) for s in starts])
    np.testing.assert_array_equal(zarr_array(out, "tracks_bins"), truth.astype(np.float32))
    np.testing.assert_array_equal(zarr_array(out, "tracks"), truth[:, 2].astype(np.float32))  # 6 bins: (6-1)//2


def test_tangermeme_bed_windows(tmp_path: Path, models: dict[str, Path]) -> None:
    pyfaidx = pytest.importorskip("pyfaidx")
    path = shared_file("genomics", "tangermeme", "test.fa")
    bed = shared_file("genomics", "tangermeme", "test.bed")
    fasta = pyfaidx.Fasta(str(path), as_raw=True)
    contigs = {k: len(v) for k, v in fasta.items()}
    out = run(tmp_path, models["NLT"], path, regions=str(bed), length=64, stride=8,
              model_keys={"reduce": {"tracks": {"how": "sum"}}})
    table = pq.read_table(out / "predictions.parquet")
    rows = zip(table.column("chrom").to_pylist(), table.column("start").to_pylist(), strict=True)

    class Fetch:
        def fetch(self, chrom: str, lo: int, hi: int) -> str:
            return str(fasta[chrom][lo:hi])

    truth = np.stack([bin_tracks(window(Fetch(), contigs, c, s, s + 64)).sum(axis=0) for c, s in rows])
    assert len(truth) == table.num_rows == 5  # one window per BED line: each is shorter than 64
    np.testing.assert_array_equal(columns(table, "tracks"), truth.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# variants


def write_vcf(path: Path, records: list[tuple[int, str, str]]) -> Path:
    lines = ["##fileformat=VCFv4.2", f"##contig=<ID={SARS},length=29903>",
             "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]
    lines += [f"{SARS}\t{pos}\tv{i}\t{ref}\t{alt}\t.\t.\t." for i, (pos, ref, alt) in enumerate(records)]
    path.write_text("\n".join(lines) + "\n")
    return path


def variant_records(fasta: Any) -> list[tuple[int, str, str]]:
    """SNVs, insertions and deletions (REF from the FASTA), one REF mismatch, one at the contig end."""
    seq = str(fasta.fetch(SARS)).upper()
    records = []
    for i, pos in enumerate(range(200, 29903, 2311)):
        ref = seq[pos - 1 : pos - 1 + (1 + i % 3)]
        alt = {0: "G" if ref[0] != "G" else "T", 1: ref[0], 2: ref[0] + "ACGTTG"[: 1 + i % 5]}[i % 3]
        records.append((pos, ref, alt))
    records.append((13468, "C", "G"))  # the vendored simple.vcf's SNV
    records.append((1000, "T" if seq[999] != "T" else "A", "C"))  # REF disagrees with the FASTA
    records.append((29900, seq[29899], "A" if seq[29899] != "A" else "C"))
    return records


def expected_scores(fasta: Any, contigs: dict[str, int], records: list[tuple[int, str, str]],
                    average: bool, c: float) -> dict[str, np.ndarray]:
    def tracks(seq: str) -> np.ndarray:
        t = bin_tracks(seq)
        return (t + bin_tracks(reverse_complement(seq))[::-1]) / 2 if average else t

    out: dict[str, list[np.ndarray]] = {k: [] for k in ("sad", "log2fc", "maxabs", "ref", "alt")}
    for pos, ref, alt in records:
        start = pos - 1 - 64
        r = tracks(window(fasta, contigs, SARS, start, start + 128))
        a = tracks(alt_window(fasta, contigs, SARS, pos, ref, alt, 128))
        out["sad"].append(a.sum(axis=0) - r.sum(axis=0))
        out["log2fc"].append(np.array([math.log2((x + c) / (y + c)) for x, y in zip(a.sum(0), r.sum(0), strict=True)]))
        out["maxabs"].append(np.abs(a - r).max(axis=0))
        out["ref"].append(r[2:4].mean(axis=0))  # center, bins: 2 of 6
        out["alt"].append(a[2:4].mean(axis=0))
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()}


@pytest.mark.parametrize("average", ["none", "average"])
def test_variant_scores_are_exact(tmp_path: Path, models: dict[str, Path], average: str) -> None:
    fasta, contigs, path = sars()
    records = variant_records(fasta)
    vcf = write_vcf(tmp_path / "v.vcf", records)
    out = run(tmp_path, models["NLT"], path, variants=str(vcf), reverse_complement=average,
              variant_scores=["sad", "log2fc", "maxabs"], pseudocount=0.5, windows_per_shard=5,
              max_ref_mismatch=0.1,  # one deliberate REF mismatch among 16: scored and flagged
              model_keys={"reduce": {"tracks": {"how": "center", "bins": 2}}})
    table = pq.read_table(out / "predictions.parquet")
    assert table.column("variant_id").to_pylist() == [f"v{i}" for i in range(len(records))]
    assert table.column("ref_match").to_pylist().count(False) == 1
    want = expected_scores(fasta, contigs, records, average == "average", 0.5)
    for score in ("sad", "maxabs"):
        np.testing.assert_array_equal(columns(table, f"{score}_tracks"), want[score])
        np.testing.assert_array_equal(zarr_array(out, f"{score}_tracks"), want[score])
    np.testing.assert_allclose(columns(table, "log2fc_tracks"), want["log2fc"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gpubatch.open_results(str(out)).array("log2fc_tracks"), want["log2fc"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(columns(table, "ref_tracks"), want["ref"])
    np.testing.assert_array_equal(columns(table, "delta_tracks"), want["alt"] - want["ref"])
    assert np.abs(want["sad"]).sum() > 0 and np.abs(want["maxabs"]).sum() > np.abs(want["sad"]).sum() / 100
    group = zarr_group(out, "variants-000000")
    assert "ref_tracks_bins" not in group and group["sad_tracks"].shape == (5, 6)


def test_sarscov2_vendored_variant(tmp_path: Path, models: dict[str, Path]) -> None:
    fasta, contigs, path = sars()
    vcf = shared_file("genomics", "sarscov2", "simple.vcf")
    out = run(tmp_path, models["NLT"], path, variants=str(vcf), variant_scores=["sad", "maxabs"])
    want = expected_scores(fasta, contigs, [(13468, "C", "G")], False, 1.0)
    np.testing.assert_array_equal(zarr_array(out, "sad_tracks"), want["sad"])
    np.testing.assert_array_equal(zarr_array(out, "maxabs_tracks"), want["maxabs"])
    # C>G in one bin: C's fraction falls 1/16 and G's rises 1/16 there; track 4 = 2A + G
    np.testing.assert_array_equal(want["sad"][0], np.array([0, -1, 1, 0, 1, 0]) / 16)


def test_score_columns_stop_at_the_width_limit(tmp_path: Path, models: dict[str, Path]) -> None:
    fasta, contigs, path = sars()
    vcf = write_vcf(tmp_path / "v.vcf", variant_records(fasta)[:4])
    out = run(tmp_path, models["NLT"], path, variants=str(vcf), variant_scores=["sad"], track_columns=5)
    table = pq.read_table(out / "predictions.parquet")
    assert table.column_names == ["variant_id", "chrom", "pos", "ref", "alt", "ref_match"]
    assert zarr_array(out, "sad_tracks").shape == (4, 6)  # zarr has them always
    group = zarr_group(out, "variants-000000")
    assert "ref_tracks" not in group  # scored, not reduced, not kept: no whole arrays


def test_scores_with_kept_whole_arrays(tmp_path: Path, models: dict[str, Path]) -> None:
    fasta, contigs, path = sars()
    records = variant_records(fasta)[:3]
    vcf = write_vcf(tmp_path / "v.vcf", records)
    out = run(tmp_path, models["NLT"], path, variants=str(vcf), variant_scores=["maxabs"],
              model_keys={"reduce": {"tracks": {"keep": True}}})
    ref = np.stack([bin_tracks(window(fasta, contigs, SARS, p - 65, p + 63)) for p, _, _ in records])
    np.testing.assert_array_equal(zarr_array(out, "ref_tracks"), ref.astype(np.float32))
    np.testing.assert_array_equal(zarr_array(out, "delta_tracks"),
                                  zarr_array(out, "alt_tracks") - zarr_array(out, "ref_tracks"))
    assert zarr_array(out, "maxabs_tracks").shape == (3, 6)


def test_resume_refuses_other_reductions_and_scores(tmp_path: Path, models: dict[str, Path]) -> None:
    """Shards reduced or scored one way never mix with shards made another way in one output."""
    fasta, _, path = sars()
    vcf = write_vcf(tmp_path / "v.vcf", variant_records(fasta)[:2])
    run(tmp_path, models["NLT"], path, variants=str(vcf), variant_scores=["sad"],
        model_keys={"reduce": {"tracks": {"how": "sum"}}})
    base = {"name": "tracks", "kind": "genome", "output": {"uri": str(tmp_path / "out")},
            "windows": {"reference": str(path), "length": 128, "variants": str(vcf), "variant_scores": ["sad"]},
            "model": {"path": str(models["NLT"]), "reduce": {"tracks": {"how": "sum"}}},
            "run": {"profile": "inline"}}
    for field, change in [("model.reduce.tracks.how", {"model": {"reduce": {"tracks": {"how": "max"}}}}),
                          ("windows.variant_scores", {"windows": {"variant_scores": ["sad", "maxabs"]}})]:
        spec = {k: {**v, **change.get(k, {})} if isinstance(v, dict) else v for k, v in base.items()}
        with pytest.raises(SpecError) as err:
            gpubatch.run(parse_job(spec), resume=True, show_progress=False)
        assert field in [f for f, _ in err.value.problems]


# ------------------------------------------------------------------------------------------------
# spec and preflight


def genome_spec(model: Path, **windows: Any) -> dict[str, Any]:
    _, _, path = sars()
    return {"name": "t", "kind": "genome", "windows": {"reference": str(path), "length": 128, **windows},
            "model": {"path": str(model)}, "output": {"uri": "out"}}


def test_spec_refuses_what_cannot_run(models: dict[str, Path]) -> None:
    spec = genome_spec(models["NLT"], variant_scores=["sad"])
    with pytest.raises(SpecError, match="variant_scores needs windows.variants"):
        parse_job(spec)
    with pytest.raises(SpecError, match="model.reduce.tracks") as err:
        parse_job({**genome_spec(models["NLT"]), "model": {"path": "m.onnx", "reduce": {"tracks": {"bins": 3}}}})
    assert "keep: true" in str(err.value)
    with pytest.raises(SpecError, match="variant_scores"):
        parse_job(genome_spec(models["NLT"], variants="v.vcf", variant_scores=["sad", "sed"]))
    slides = {"name": "t", "kind": "slides", "input": {"uris": ["a.svs"]},
              "model": {"path": "m.onnx", "reduce": {"x": {"how": "sum"}}}, "output": {"uri": "o"}}
    with pytest.raises(SpecError, match="needs kind: genome"):
        parse_job(slides)


@pytest.mark.parametrize(("keys", "formats", "field", "message"), [
    ({"reduce": {"signal": {"how": "sum"}}}, None, "model.reduce.signal", "no output 'signal' (it has tracks)"),
    ({"reduce": {"tracks": {"how": "sum", "bins": 9}}}, None, "model.reduce.tracks.bins", "9 central bins"),
    ({}, ["parquet"], "output.formats", "only zarr holds"),
])
def test_preflight_checks_the_outputs(tmp_path: Path, models: dict[str, Path], keys: dict[str, Any],
                                      formats: list[str] | None, field: str, message: str) -> None:
    from gpubatch.cli.demo_models import make_bin_fraction_model
    from gpubatch.runtime.preflight import preflight

    model = make_bin_fraction_model(tmp_path / "fixed.onnx", 128, BIN, "NLC", MIX, CROP)
    _fix_bins(model, 6)
    spec = genome_spec(model)
    spec["model"].update(keys)
    if formats:
        spec["output"]["formats"] = formats
    with pytest.raises(SpecError) as err:
        preflight(parse_job(spec))
    assert err.value.problems[0][0] == field and message in err.value.problems[0][1]


def _fix_bins(path: Path, bins: int) -> None:
    """Give the ONNX output a fixed bins dimension, as an exported Enformer has."""
    import onnx

    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = bins
    onnx.save(model, str(path))


def test_validate_refuses_scores_without_track_output(tmp_path: Path) -> None:
    from conftest import write_job

    from gpubatch.cli.demo_models import make_identity_onehot_model

    model = make_identity_onehot_model(tmp_path / "counts.onnx", 128)
    vcf = shared_file("genomics", "sarscov2", "simple.vcf")
    job = write_job(tmp_path / "job.yaml", genome_spec(model, variants=str(vcf), variant_scores=["sad"]))
    done = subprocess.run([sys.executable, "-m", "gpubatch", "validate", str(job)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "windows.variant_scores" in done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------
# zarr layout of track outputs


def test_zarr_layout_for_thousands_of_tracks() -> None:
    from gpubatch.outputs.writer import zarr_layout

    # Enformer's human head: a window's (896, 5313) is 19 MB: one row per shard file, chunks of 64 tracks
    assert zarr_layout((10, 896, 5313), 4) == ((1, 896, 64), (1, 896, 5376))
    # a short window with 5,000 tracks: shards of whole rows near 8 MiB, chunks of 64 tracks
    assert zarr_layout((10, 16, 5000), 4) == ((26, 16, 64), (26, 16, 5056))
    # per-track scores (variants x tracks): chunks of 256 tracks
    assert zarr_layout((10, 5000), 4) == ((419, 256), (419, 5120))
    # scalars and narrow outputs: whole rows, no shards, as before
    assert zarr_layout((10,), 8) == ((16384,), None)
    assert zarr_layout((10, 4), 4) == ((16384, 4), None)


def test_writer_appends_whole_shards_and_never_rewrites_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows arrive in batches of 3 while a shard holds 26: a shard file, once written, is final
    (no read-modify-write), and what is read back equals what was written, the tail included."""
    from gpubatch.outputs import writer as writer_module
    from gpubatch.outputs.store import OutputStore

    monkeypatch.setattr(writer_module, "FLUSH_BYTES", 1)  # every batch flushes
    store = OutputStore(tmp_path)
    w = writer_module.ShardWriter(store, "s", "a0", {}, {}, ["zarr", "parquet"])
    rng = np.random.default_rng(0)
    data = rng.random((125, 16, 5000), dtype=np.float32)
    shard_dir = tmp_path / "predictions.zarr" / str(w.group) / "tracks" / "c"
    seen: dict[Path, bytes] = {}
    for i in range(0, len(data), 3):
        w.write({"start": np.arange(i, min(i + 3, len(data)))}, {"tracks": data[i : i + 3]})
        files = {p: p.read_bytes() for p in shard_dir.rglob("*") if p.is_file()} if shard_dir.exists() else {}
        assert all(files[p] == b for p, b in seen.items())
        seen = files
    assert len(seen) == 4  # four whole shards of 26 rows; the last 21 rows wait for the commit
    done = w.commit()
    group = store.zarr_group(f"predictions.zarr/{done['group']}")
    np.testing.assert_array_equal(group["tracks"][:], data)
    np.testing.assert_array_equal(group["start"][:], np.arange(125))
    assert pq.read_table(tmp_path / "_parts" / done["part"]).column_names == ["start"]


def test_reduction_of_a_missing_or_flat_output_fails_on_any_backend() -> None:
    """Preflight reads ONNX files; for other backends the worker refuses the same, by name."""
    from gpubatch.core.errors import GpubatchError
    from gpubatch.sources.genome.tracks import TrackOutputs
    from gpubatch.spec import ReduceSpec

    tracks = TrackOutputs({"signal": ReduceSpec(how="sum")})
    with pytest.raises(GpubatchError, match=r"model.reduce.signal: the model has no output 'signal' \(it has tracks\)"):
        tracks.windows({"tracks": np.zeros((2, 6, 4), np.float32)})
    with pytest.raises(GpubatchError, match=r"output 'signal' has shape \(6,\) per item"):
        tracks.variants({"signal": np.zeros((4, 6), np.float32)}, 2)
