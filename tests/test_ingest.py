"""``ingest_genome``: FASTA -> genome zarr, and windows from the zarr equal windows from the FASTA."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import dna_codes, shared_file, wait_for

import gpubatch.sources.genome.ingest as ingest_mod
from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError, OutputRefused
from gpubatch.sources.genome.ingest import ingest_genome
from gpubatch.sources.genome.opening import open_reference
from gpubatch.sources.genome.reference import GENOME_ATTR, PACKED_ARRAY, load_contigs
from gpubatch.sources.genome.source import GenomeSource
from gpubatch.spec import JobSpec, parse_job

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pysam = pytest.importorskip("pysam")
pytest_plugins = ["s3_fixtures"]


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


@pytest.mark.parametrize("name", ["ref.fa.bgz", "ref.fa", "ref.fasta.gz"])
def test_compression_is_told_by_the_bytes_not_the_name(tmp_path: Path, name: str) -> None:
    """A bgzip FASTA named ``.bgz`` (read as ``windows.reference`` as it is) or a gzip one without
    a suffix was read as text, by its name: "sequence before the first '>' header: not a FASTA";
    and a plain FASTA named ``.gz`` was "truncated or corrupt"."""
    fa = shared_file("genomics", "tangermeme", "test.fa")
    src = tmp_path / name
    if name.endswith(".gz"):
        src.write_bytes(fa.read_bytes())  # plain text under a gzip name
    else:
        pysam.tabix_compress(str(fa), str(src))  # BGZF, whatever the name says
    summary = ingest_genome(str(src), str(tmp_path / "g.zarr"))
    ref = pysam.FastaFile(str(fa))
    assert summary["contigs"] == list(ref.references) and summary["lengths"] == list(ref.lengths)
    zarr_ref = open_reference(str(tmp_path / "g.zarr"))
    name0 = ref.references[0]
    assert np.array_equal(zarr_ref.fetch(name0, 0, ref.lengths[0]), dna_codes(ref.fetch(name0)))


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
    with pytest.raises(OutputRefused, match="already exists"):
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


# ------------------------------------------------------------------------------------------------
# the output: leased while written, replaced only by a complete genome

#: the CLI in a real process, stopped (by a gate file) after every contig is written and before the
#: genome's attribute and its swap into place: a deterministic "ingest still running"
GATED_CLI = """
import os, sys, time
from pathlib import Path
import gpubatch.sources.genome.ingest as ingest
real = ingest._write_contigs
def gated(*args, **kwargs):
    got = real(*args, **kwargs)
    Path(os.environ["GATE"] + ".reached").touch()
    while not Path(os.environ["GATE"]).exists():
        time.sleep(0.02)
    return got
ingest._write_contigs = gated
from gpubatch.cli.main import main
raise SystemExit(main(sys.argv[1:]))
"""


def gated_cli(gate: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", GATED_CLI, *args], text=True,
                            env={**os.environ, "GATE": str(gate), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def write_fasta(path: Path, seed: int, contigs: int = 3, length: int = 3000) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("".join(f">chr{i} seed {seed}\n" + "".join(rng.choice(list("ACGTN"), length)) + "\n"
                            for i in range(contigs)))
    return path


def genome_of(uri: str | Path, options: dict | None = None) -> dict[str, bytes]:
    """Every contig's codes as read back through the reference reader."""
    contigs = load_contigs(str(uri), options)
    reference = open_reference(str(uri), options)
    return {name: bytes(reference.fetch(name, 0, length))
            for name, length in zip(contigs.names, contigs.lengths, strict=True)}


def folder_of(out: Path) -> list[str]:
    """What is beside the genome: only the genome itself once an ingest ended (no staging
    folder, no old genome set aside, no lease)."""
    return sorted(p.name for p in out.parent.iterdir())


def overwrite_held_at_the_gate(tmp_path: Path) -> tuple[Path, dict[str, bytes], subprocess.Popen[str]]:
    """A genome at ``genomes/g.zarr`` (its contents returned) and a CLI ``--overwrite`` ingest of
    another, held at the gate with every contig written: (OUT, the old contents, the process)."""
    out, gate = tmp_path / "genomes" / "g.zarr", tmp_path / "gate"
    ingest_genome(str(write_fasta(tmp_path / "old.fa", seed=1)), str(out))
    before = genome_of(out)
    proc = gated_cli(gate, "ingest", "genome", str(write_fasta(tmp_path / "new.fa", seed=2)), str(out),
                     "--overwrite")
    try:
        wait_for(Path(f"{gate}.reached").exists, what="the overwriting ingest's contigs written")
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return out, before, proc


def test_two_ingests_into_one_output_one_is_refused_naming_the_holder(tmp_path: Path) -> None:
    fasta = write_fasta(tmp_path / "g.fa", seed=1)
    out, gate = tmp_path / "genomes" / "g.zarr", tmp_path / "gate"
    procs = [gated_cli(gate, "ingest", "genome", str(fasta), str(out)) for _ in range(2)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs), what="one ingest refused")
        wait_for(Path(f"{gate}.reached").exists, what="the other's contigs written")
        gate.touch()
        said = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], said
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    refusal = said[loser]
    assert "is being written by another `gpubatch ingest genome`" in refusal, refusal
    assert f"host {socket.gethostname()}, pid {procs[winner].pid}, started 20" in refusal, refusal
    assert "Traceback" not in refusal and "g.zarr.ingest-lease.json" in refusal
    solo = tmp_path / "solo.zarr"
    ingest_genome(str(fasta), str(solo))
    assert genome_of(out) == genome_of(solo)
    assert folder_of(out) == ["g.zarr"]


@pytest.mark.parametrize("bad", ["malformed", "missing", "truncated"])
def test_overwrite_with_a_bad_fasta_keeps_the_old_genome(tmp_path: Path, bad: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from gpubatch.cli.main import main

    out = tmp_path / "genomes" / "g.zarr"
    ingest_genome(str(write_fasta(tmp_path / "old.fa", seed=1)), str(out))
    before = genome_of(out)
    new = {"malformed": tmp_path / "new.fa", "missing": tmp_path / "none.fa",
           "truncated": tmp_path / "new.fa.gz"}[bad]
    if bad == "malformed":
        new.write_text(">chr0\nACGT\n>chr0\nGG\n")  # a name twice: found only after chr0 is written
    if bad == "truncated":
        whole = gzip.compress(write_fasta(tmp_path / "new.fa", seed=2).read_bytes())
        new.write_bytes(whole[: len(whole) // 2])
    assert main(["ingest", "genome", str(new), str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert {"malformed": "appears twice", "missing": "not found",
            "truncated": "truncated or corrupt"}[bad] in err, err
    assert genome_of(out) == before
    assert folder_of(out) == ["g.zarr"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_an_overwrite_stopped_mid_write_keeps_the_old_genome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             failure: type[BaseException]) -> None:
    out = tmp_path / "genomes" / "g.zarr"
    ingest_genome(str(write_fasta(tmp_path / "old.fa", seed=1)), str(out))
    before = genome_of(out)
    real = ingest_mod._write_contigs

    def stopped(*args: object, **kwargs: object) -> object:
        real(*args, **kwargs)  # type: ignore[arg-type]
        raise failure("stopped after every contig was written")

    monkeypatch.setattr(ingest_mod, "_write_contigs", stopped)
    with pytest.raises(failure):
        ingest_genome(str(write_fasta(tmp_path / "new.fa", seed=2)), str(out), overwrite=True)
    assert genome_of(out) == before
    assert folder_of(out) == ["g.zarr"]


def test_an_ingest_taken_over_while_suspended_never_marks_its_genome_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ingest suspended past its lease (a laptop asleep) is taken over by the next ingest of
    OUT, which sweeps the first one's staging folder as a killed ingest's leftover. Woken, the
    first wrote on, marked its genome complete, chunks written before the sleep gone (read as
    fill), and swapped it in over the other's. It now confirms its lease before marking the
    genome complete: it stops naming the taker, and what is at OUT is left to that ingest."""
    from gpubatch.outputs.lease import LeaseLost

    out = tmp_path / "genomes" / "g.zarr"
    ingest_genome(str(write_fasta(tmp_path / "old.fa", seed=1)), str(out))
    before = genome_of(out)
    lease = out.parent / "g.zarr.ingest-lease.json"
    real = ingest_mod._write_contigs

    def then_taken_over(*args: object, **kwargs: object) -> object:
        written = real(*args, **kwargs)  # type: ignore[arg-type]
        lease.write_text(json.dumps({"run_id": "other", "host": "elsewhere", "pid": 7,
                                     "heartbeat": time.time(), "stale_after_s": 120.0}))
        return written

    monkeypatch.setattr(ingest_mod, "_write_contigs", then_taken_over)
    with pytest.raises(LeaseLost, match="was taken over: another `gpubatch ingest genome` holds its lease "
                                        r"\(host elsewhere, pid 7\)"):
        ingest_genome(str(write_fasta(tmp_path / "new.fa", seed=2)), str(out), overwrite=True)
    assert genome_of(out) == before
    assert json.loads(lease.read_text())["run_id"] == "other"  # the taker's lease is left to it
    assert folder_of(out) == ["g.zarr", "g.zarr.ingest-lease.json"]


def test_overwrite_with_a_good_fasta_replaces_the_genome(tmp_path: Path) -> None:
    out = tmp_path / "genomes" / "g.zarr"
    ingest_genome(str(write_fasta(tmp_path / "old.fa", seed=1)), str(out))
    new = write_fasta(tmp_path / "new.fa", seed=2, contigs=2, length=500)
    summary = ingest_genome(str(new), str(out), overwrite=True)
    assert summary == {"uri": str(out), "contigs": ["chr0", "chr1"], "lengths": [500, 500],
                       "bases": 1000, "chunk_bases": ingest_mod.CHUNK_BASES}
    solo = tmp_path / "solo.zarr"
    ingest_genome(str(new), str(solo))
    assert genome_of(out) == genome_of(solo)
    assert folder_of(out) == ["g.zarr"]


def test_a_killed_ingest_is_taken_over_at_once_and_its_leftover_refused(tmp_path: Path) -> None:
    from gpubatch.cli.main import main

    out, before, proc = overwrite_held_at_the_gate(tmp_path)
    proc.kill()
    proc.communicate()
    lease = out.parent / "g.zarr.ingest-lease.json"
    assert json.loads(lease.read_text())["pid"] == proc.pid  # a dead holder's lease is left
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / PACKED_ARRAY).is_dir()  # its small contigs, written
    with pytest.raises(InputError, match="not a complete genome store"):
        load_contigs(str(leftovers[0]))
    assert genome_of(out) == before  # the old genome was never touched
    third = write_fasta(tmp_path / "third.fa", seed=3)
    started = time.monotonic()
    assert main(["ingest", "genome", str(third), str(out), "--overwrite"]) == 0
    assert time.monotonic() - started < 30  # not the 120 s a holder on another host is given
    solo = tmp_path / "solo.zarr"
    ingest_genome(str(third), str(solo))
    assert genome_of(out) == genome_of(solo)
    assert folder_of(out) == ["g.zarr"]  # the killed one's staging folder swept


@pytest.fixture
def s3_or_skip(request: pytest.FixtureRequest) -> S3Stack:
    """The session's moto S3 stack (s3_fixtures), or a skip where moto is not installed."""
    pytest.importorskip("moto")
    return request.getfixturevalue("s3")  # type: ignore[no-any-return]


def test_s3_ingest_holds_a_lease_beside_the_store(s3_or_skip: S3Stack, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """On object storage (no rename) the genome is written in place under a lease: a second
    ingest is refused while the first writes, and a bad FASTA says that the store was replaced."""
    s3 = s3_or_skip
    options, prefix = s3.options(via_proxy=False), f"{s3.bucket}/genomes-{uuid.uuid4().hex[:6]}"
    out, lease = f"s3://{prefix}/g.zarr", f"{prefix}/g.zarr.ingest-lease.json"
    reached, gate, real = threading.Event(), threading.Event(), ingest_mod._write_contigs

    def gated(*args: object, **kwargs: object) -> object:
        got = real(*args, **kwargs)  # type: ignore[arg-type]
        reached.set()
        gate.wait(60)
        return got

    monkeypatch.setattr(ingest_mod, "_write_contigs", gated)
    good = write_fasta(tmp_path / "good.fa", seed=1)
    first = threading.Thread(target=ingest_genome, args=(str(good), out, options))
    first.start()
    try:
        assert reached.wait(60) and s3.fs().exists(lease)
        with pytest.raises(OutputRefused, match=f"pid {os.getpid()}, started 20"):
            ingest_genome(str(write_fasta(tmp_path / "other.fa", seed=2)), out, options, overwrite=True)
    finally:
        gate.set()
        first.join(60)
    assert genome_of(out, options) == genome_of(ingest_genome(str(good), str(tmp_path / "solo.zarr"))["uri"])
    assert not s3.fs().exists(lease)
    with pytest.raises(InputError, match="not found"):  # checked before the old store is touched
        ingest_genome(str(tmp_path / "none.fa"), out, options, overwrite=True)
    assert load_contigs(out, options).names == ("chr0", "chr1", "chr2")
    (tmp_path / "bad.fa").write_text(">chr0\nACGT\n>chr0\nGG\n")
    with pytest.raises(InputError, match="has already been replaced .* is now incomplete: readers refuse it"):
        ingest_genome(str(tmp_path / "bad.fa"), out, options, overwrite=True)
    with pytest.raises(InputError, match="not a complete genome store"):
        load_contigs(out, options)
    assert not s3.fs().exists(lease)


def test_an_old_genome_left_aside_by_a_killed_swap_is_put_back(tmp_path: Path) -> None:
    """Killed between its two renames, an ingest leaves OUT missing and the old genome aside: the
    next ingest of OUT puts it back (and clears the unfinished one); another output's are kept."""
    genomes = tmp_path / "genomes"
    ingest_genome(str(write_fasta(tmp_path / "old.fa", seed=1)), str(genomes / ".tmp-old-0123abcd-g.zarr"))
    ingest_genome(str(write_fasta(tmp_path / "new.fa", seed=2)), str(genomes / ".tmp-new-4567abcd-g.zarr"))
    (genomes / ".tmp-new-89abcdef-other-g.zarr").mkdir()
    before = genome_of(genomes / ".tmp-old-0123abcd-g.zarr")
    with pytest.raises(OutputRefused, match="already exists"):
        ingest_genome(str(tmp_path / "new.fa"), str(genomes / "g.zarr"))
    assert genome_of(genomes / "g.zarr") == before
    assert folder_of(genomes / "g.zarr") == [".tmp-new-89abcdef-other-g.zarr", "g.zarr"]


@pytest.mark.parametrize("there", ["results folder", "file"])
def test_overwrite_refuses_what_is_not_a_genome_store_and_leaves_it(tmp_path: Path, there: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from gpubatch.cli.main import main

    out = tmp_path / "results"
    if there == "file":
        out.write_text("not a genome")
    else:
        (out / "run1").mkdir(parents=True)
        (out / "run1" / "predictions.parquet").write_bytes(b"PAR1")
    fasta = write_fasta(tmp_path / "g.fa", seed=1)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert main(["ingest", "genome", str(fasta), str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is not a genome store (no zarr.json in it)" in err and str(out) in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert not list(tmp_path.glob("*.ingest-lease.json"))


def test_overwrite_takes_an_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "g.zarr"
    out.mkdir()
    fasta = write_fasta(tmp_path / "g.fa", seed=1)
    ingest_genome(str(fasta), str(out), overwrite=True)
    assert list(genome_of(out)) == ["chr0", "chr1", "chr2"]


def test_ctrl_c_of_an_ingest_says_what_it_left_not_resume(tmp_path: Path) -> None:
    out, before, proc = overwrite_held_at_the_gate(tmp_path)
    try:
        proc.send_signal(signal.SIGINT)
        said = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, said
    assert "interrupted; a genome already at the output is as it was" in said and "--resume" not in said, said
    assert genome_of(out) == before
    assert folder_of(out) == ["g.zarr"]


def test_an_object_store_output_at_a_bucket_s_root_is_refused(s3_or_skip: S3Stack, tmp_path: Path) -> None:
    """The lease sits beside OUT, so OUT must be a folder in the bucket: a bucket's root is refused
    (exit 2) before anything is written, naming the fix."""
    s3 = s3_or_skip
    options = s3.options(via_proxy=False)
    before = sorted(s3.fs().ls(s3.bucket))
    with pytest.raises(OutputRefused, match="give the genome a folder of its own .* not a bucket's root"):
        ingest_genome(str(write_fasta(tmp_path / "g.fa", seed=1)), f"s3://{s3.bucket}", options)
    assert sorted(s3.fs().ls(s3.bucket)) == before
