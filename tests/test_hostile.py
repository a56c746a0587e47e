"""The hostile-input matrix: what an adversarial user tried, and what must hold (issue 16).

Each case runs real components on inputs made by ``hostile_inputs`` from good files and asserts
the exact outcome: the exit code, a message naming the file or field, no secret anywhere, memory
and time bounded. Cases are grouped by what must hold: secrets never leave; indexes are checked;
literal paths before globs; decoder integrity; bounded everything; spec errors are spec errors;
a clean terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import dna_codes, shared_file, slide_job, write_job
from hostile_inputs import (
    CONTROL_NAME,
    AuthRangeServer,
    alias_bomb,
    deep_yaml,
    edit_fai,
    flip_tile_bytes,
    garble_description,
    huge_claim_tiff,
    lying_dimensions,
    output_text,
    oversized_tile,
    random_sequence,
    shorten_tile_offsets,
    svs_with_label_and_macro,
    truncate_tile,
    write_fasta,
)
from s3_fixtures import S3Stack

from gpubatch.cli.demo import write_synthetic_slide
from gpubatch.core.errors import InputError, SpecError
from gpubatch.spec import JobSpec

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["s3_fixtures"]


def cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``gpubatch ARGS`` in a fresh process (this checkout's code), output captured."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "gpubatch", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


#: runs ARGV, then says its peak RSS: a small process of its own, so that the child's account is
#: the child's (a process's peak RSS starts at its parent's when it forks: the test session's)
_PEAK_LAUNCHER = ("import os, subprocess, sys\n"
                  "child = subprocess.Popen(sys.argv[1:])\n"
                  "_, status, usage = os.wait4(child.pid, 0)\n"
                  "sys.stderr.write(f'\\nPEAK_KIB {usage.ru_maxrss}\\n')\n"
                  "sys.exit(os.waitstatus_to_exitcode(status))\n")


def cli_peak(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], int]:
    """``cli`` and the peak RSS (KiB) of that one process and the processes it waited for (its
    workers). Neither ``getrusage(RUSAGE_CHILDREN)`` (the largest child the session ever reaped)
    nor the child's own account (which starts at the RSS of the process it forked from, here
    the test session's, over 1.5 GB in a full run) says that: a small launcher runs it."""
    import signal

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "200"}
    command = [sys.executable, "-c", _PEAK_LAUNCHER, sys.executable, "-m", "gpubatch", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    err, _, peak = err.rpartition("\nPEAK_KIB ")
    return subprocess.CompletedProcess(command, proc.returncode, out, err), int(peak)


# -- 1. secrets never leave --------------------------------------------------------------------


def _presign(s3: S3Stack, key: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.key,
                          aws_secret_access_key=s3.secret, region_name="us-east-1")
    return str(client.generate_presigned_url("get_object", Params={"Bucket": s3.bucket, "Key": key},
                                              ExpiresIn=3600))


def _secret_forms(secret: str) -> list[bytes]:
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
    return [f.encode() for f in forms]


def test_credentials_in_input_urls_never_leave(tmp_path: Path, s3: S3Stack, classifier: Path) -> None:
    """A presigned S3 URL and an http://user:SECRET@ URL are read with their credentials, and no
    byte of a credential reaches any output file (parquet and zarr decoded too), the terminal or
    the log, for the slides that work and for the ones that fail."""
    served = tmp_path / "served"
    served.mkdir()
    write_synthetic_slide(served / "b.tif", 512, 512, seed=4, levels=1)
    local = write_synthetic_slide(tmp_path / "a.tif", 512, 512, seed=3, levels=1)
    s3.upload(local, "signed/a.tif")
    presigned = _presign(s3, "signed/a.tif")
    missing = _presign(s3, "signed/missing.tif")
    password = "pw-SECRET-7c1e9a"
    server = AuthRangeServer(served, "alice", password)
    try:
        uris = [presigned, server.url("b.tif"), missing, server.url("absent.tif")]
        out = tmp_path / "out"
        job = slide_job(uris, classifier, out, output={"formats": ["zarr", "parquet", "geojson"]})
        job_path = write_job(tmp_path / "job.yaml", job)
        run = cli("-v", "run", str(job_path))
        resumed = cli("-v", "run", str(job_path), "--resume")  # the signed inputs are known again
        report = cli("report", str(out), "--html")
        status = cli("status", str(out))
    finally:
        server.close()
    assert server.requests > 0
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(presigned).query)
    secrets = [password, s3.key, s3.secret, query["Signature"][0],
               urllib.parse.parse_qs(urllib.parse.urlsplit(missing).query)["Signature"][0]]
    assert run.returncode == 3, run.stderr[-3000:]
    frame = pd.read_parquet(out / "predictions.parquet")
    assert sorted(frame["slide"].unique()) == sorted([
        presigned.split("?")[0] + "?AWSAccessKeyId=***&Signature=***&Expires=" + query["Expires"][0],
        f"http://***@127.0.0.1:{server.port}/b.tif"])
    assert frame.groupby("slide").size().tolist() == [16, 16]  # 512 px at 0.25 mpp: 4 x 4 tiles of 64 px at 0.5
    assert "2 shard(s) already committed, skipped" in resumed.stderr
    terminal = run.stdout + run.stderr + resumed.stdout + resumed.stderr + report.stdout + report.stderr
    texts = [("terminal", (terminal + status.stdout).encode())]
    texts += [(str(p.relative_to(out)), data) for p, data in output_text(out)]
    assert len(texts) > 20 and any("_parts" in name for name, _ in texts)
    leaks = [(name, s[:6]) for name, data in texts for s in secrets for form in _secret_forms(s) if form in data]
    assert leaks == []
    assert "missing.tif" in run.stdout and "absent.tif" in run.stdout  # failures still named


# -- 2. indexes are checked --------------------------------------------------------------------


@pytest.fixture
def fasta(tmp_path: Path) -> Path:
    """Three contigs of 60-base lines (one ends mid-line, one is a single short line), faidx'd."""
    return write_fasta(tmp_path / "ref.fa", {"chr1": random_sequence(1000, 1), "chr2": random_sequence(617, 2),
                                              "chrM": random_sequence(45, 3)})


def _plan_genome(reference: Path) -> None:
    from gpubatch.sources.genome.source import GenomeSource

    job = JobSpec.model_validate({"kind": "genome", "model": {"path": "m.onnx"}, "output": {"uri": "o"},
                                  "windows": {"reference": str(reference), "length": 100}})
    GenomeSource().plan(job)


FAI_CASES = {  # contig: changes to its .fai line -> the message's fragment
    "offset+1": ("chr2", {"offset": +1}, "chr2': the .fai offset"),
    "offset-1": ("chr2", {"offset": -1}, "chr2': the .fai offset"),
    "offset+61": ("chr1", {"offset": +61}, "contigs 'chr1' and 'chr2' overlap"),
    "offset-61": ("chr2", {"offset": -61}, "chr2'"),
    "negative length": ("chr1", {"length": -1000 - 5}, "chr1': the .fai gives length -5"),
    "zero length": ("chrM", {"length": -45}, "chrM': the .fai gives length 0"),
    "short length": ("chr1", {"length": -7}, "chr1': the .fai length 993 does not end"),
    "short by a line": ("chr1", {"length": -60}, "chr1': the .fai length 940 does not end"),
    "long length": ("chr2", {"length": +3}, "contigs 'chr2' and 'chrM' overlap"),
    "last contig long": ("chrM", {"length": +1}, "chrM'"),
    "line width < bases": ("chr1", {"line_width": -2}, "chr1': the .fai gives line geometry"),
    "line bases - 1": ("chr1", {"line_bases": -1}, "chr1'"),
    "line width + 1": ("chr2", {"line_width": +1}, "chr2'"),
}


@pytest.mark.parametrize("case", list(FAI_CASES))
def test_fai_that_disagrees_with_the_fasta_is_refused_naming_the_contig(fasta: Path, case: str) -> None:
    contig, deltas, fragment = FAI_CASES[case]
    fields = dict(zip(("length", "offset", "line_bases", "line_width"),
                      map(int, next(line.split("\t")[1:5] for line in Path(f"{fasta}.fai").read_text().splitlines()
                                    if line.startswith(contig + "\t"))), strict=True))
    edit_fai(fasta, contig, **{k: fields[k] + d for k, d in deltas.items()})
    with pytest.raises(SpecError, match="windows.reference") as err:
        _plan_genome(fasta)
    assert fragment in str(err.value) and "samtools faidx" in str(err.value)


def test_good_fai_plans_and_empty_fai_is_refused(fasta: Path, tmp_path: Path) -> None:
    from gpubatch.cli.demo_models import make_genome_model

    _plan_genome(fasta)  # the untouched index passes every check
    Path(f"{fasta}.fai").write_text("")
    with pytest.raises(SpecError, match=r"ref.fa.fai: the index lists no contigs"):
        _plan_genome(fasta)
    Path(f"{fasta}.fai").write_text("chr1\t1000\t6\t60\t61\nchr1\t1000\t6\t60\t61\n")
    with pytest.raises(SpecError, match="listed twice"):
        _plan_genome(fasta)
    model = make_genome_model(tmp_path / "g.onnx", 100)
    job = write_job(tmp_path / "g.yaml", {"kind": "genome", "model": {"path": str(model)},
                                          "output": {"uri": str(tmp_path / "o")},
                                          "windows": {"reference": str(fasta), "length": 100}})
    done = cli("validate", str(job))  # validate refuses what run would
    assert done.returncode == 2 and "listed twice" in done.stderr


def faidx(path: Path) -> None:
    import pysam

    pysam.faidx(str(path))


def test_an_offset_off_by_one_far_from_the_sampled_contigs_is_refused(tmp_path: Path) -> None:
    """Among many contigs, a shifted offset on one the spot-check would not have sampled: every
    contig of a local file is checked now (it passed, and its windows came out one base off)."""
    contigs = {f"ctg{i}": random_sequence(40 + i, i) for i in range(150)}
    ref = write_fasta(tmp_path / "many.fa", contigs)
    _plan_genome(ref)
    line = next(x for x in Path(f"{ref}.fai").read_text().splitlines() if x.startswith("ctg4\t"))
    ref.write_text(ref.read_text().replace(">ctg4\n", ">ctg4 a description\n"))  # room before it
    faidx(ref)
    edit_fai(ref, "ctg4", offset=int(line.split("\t")[2]) + len(" a description") + 1)
    with pytest.raises(SpecError, match="ctg4': the .fai offset"):
        _plan_genome(ref)


def test_a_contig_the_index_leaves_out_is_refused_and_an_empty_one_is_not(tmp_path: Path) -> None:
    """samtools keeps the first of two contigs with one name: the second was left out of the run
    without a word. An empty contig (a header alone) is left out of the .fai and loses nothing."""
    for order, where in ((["chr1", "chr2", "chr1", "chr3"], "between contigs 'chr2' and 'chr3'"),
                         (["chr1", "chr2", "chr1"], "goes on after 'chr2'")):
        ref = tmp_path / f"dup{len(order)}.fa"
        ref.write_text("".join(f">{name}\n{random_sequence(30, i)}\n" for i, name in enumerate(order)))
        faidx(ref)
        with pytest.raises(SpecError, match="does not list") as err:
            _plan_genome(ref)
        assert where in str(err.value) and "two contigs with one name" in str(err.value)
    empty = tmp_path / "empty-contig.fa"
    empty.write_text(f">chr1\n{random_sequence(30, 1)}\n>nothing\n>chr2\n{random_sequence(30, 2)}\n")
    faidx(empty)
    _plan_genome(empty)


def test_a_contig_the_plan_did_not_check_is_checked_where_it_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond what the plan checks (object storage, or a file changed after planning), a
    contig's start is checked at its first read: the shard fails naming the contig, instead
    of windows shifted by a byte, and the other contigs' windows are right."""
    from gpubatch.sources.genome.opening import open_reference

    contigs = {f"ctg{i}": random_sequence(50, i) for i in range(6)}
    ref = write_fasta(tmp_path / "six.fa", contigs)
    ref.write_text(ref.read_text().replace(">ctg4\n", ">ctg4 room\n"))
    faidx(ref)
    line = next(x for x in Path(f"{ref}.fai").read_text().splitlines() if x.startswith("ctg4\t"))
    edit_fai(ref, "ctg4", offset=int(line.split("\t")[2]) - 1)
    monkeypatch.setattr("gpubatch.sources.genome.reference.LOCAL_CHECKED", 2)  # ctg0 and ctg5
    _plan_genome(ref)
    reference = open_reference(str(ref))
    assert bytes(reference.fetch("ctg3", 0, 50)) == bytes(dna_codes(contigs["ctg3"]))
    with pytest.raises(InputError, match="ctg4': the .fai offset"):
        reference.fetch("ctg4", 10, 20)


def test_trailing_blanks_and_an_empty_reference_say_what_is_wrong(tmp_path: Path) -> None:
    """Lines ending in a space (samtools indexes them) were refused with 'rebuild the index',
    which changes nothing; an empty FASTA was called truncated."""
    ref = tmp_path / "blank.fa"
    ref.write_text(">chr1\n" + "".join(random_sequence(10, i) + " \n" for i in range(3)))
    faidx(ref)
    with pytest.raises(SpecError, match="its lines end in spaces or tabs after the bases"):
        _plan_genome(ref)
    empty = tmp_path / "empty.fa"
    empty.write_text("")
    Path(f"{empty}.fai").write_text("")
    with pytest.raises(SpecError, match=r"the reference is empty \(0 bytes\)"):
        _plan_genome(empty)


def test_bgzip_indexes_are_checked(tmp_path: Path) -> None:
    import pysam

    plain = write_fasta(tmp_path / "big.fa", {"chr1": random_sequence(150_000, 5), "chr2": random_sequence(617, 6)})
    gz = tmp_path / "big.fa.gz"
    pysam.tabix_compress(str(plain), str(gz))
    pysam.faidx(str(gz))
    _plan_genome(gz)
    fai, gzi = Path(f"{gz}.fai").read_text(), Path(f"{gz}.gzi").read_bytes()
    Path(f"{gz}.fai").write_text(fai.replace("chr2\t617\t", "chr2\t611\t"))
    with pytest.raises(SpecError, match="chr2': the .fai length 611"):
        _plan_genome(gz)
    Path(f"{gz}.fai").write_text(fai)
    Path(f"{gz}.gzi").write_bytes(gzi[:-3])
    with pytest.raises(SpecError, match=r"big.fa.gz.gzi: says \d+ blocks"):
        _plan_genome(gz)
    shifted = bytearray(gzi)
    shifted[8] += 1  # the first listed block's compressed offset, one byte off
    Path(f"{gz}.gzi").write_bytes(bytes(shifted))
    with pytest.raises(SpecError, match="is not the start of a BGZF block"):
        _plan_genome(gz)


# -- 3. literal before glob --------------------------------------------------------------------


def _planned(uris: list[str], storage: dict | None = None) -> list[str]:
    from gpubatch.sources.slides.source import SlideSource

    job = JobSpec.model_validate({"input": {"uris": uris, "storage": storage or {}},
                                  "model": {"path": "m.onnx"}, "output": {"uri": "o"}})
    shards, failed = SlideSource().plan(job)
    assert failed == []
    return [s.input_uri for s in shards]


def test_a_path_that_exists_is_that_file_even_with_glob_characters(tmp_path: Path, classifier: Path) -> None:
    bracket = write_synthetic_slide(tmp_path / "slide[1].tif", 256, 256, seed=1, levels=1)
    other = write_synthetic_slide(tmp_path / "slide1.tif", 256, 256, seed=2, levels=1)
    star = write_synthetic_slide(tmp_path / "x*?.tif", 256, 256, seed=3, levels=1)
    assert _planned([str(bracket)]) == [str(bracket)]
    assert _planned([str(star)]) == [str(star)]
    assert _planned([f"glob:{bracket}"]) == [str(other)]  # the explicit switch: a character class
    assert _planned([str(tmp_path / "slide[12].tif")]) == [str(other)]  # no such file: a glob
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", slide_job(["slide[1].tif", "glob:x*"], classifier, out))
    done = cli("run", str(job))
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(pd.read_parquet(out / "predictions.parquet")["slide"].unique()) == [str(bracket), str(star)]


def test_s3_keys_are_literal_before_glob(tmp_path: Path, s3: S3Stack) -> None:
    local = write_synthetic_slide(tmp_path / "a.tif", 256, 256, seed=1, levels=1)
    literal = s3.upload(local, "lit/a[1].tif")
    other = s3.upload(local, "lit/a1.tif")
    options = s3.options(via_proxy=False)
    assert _planned([literal], options) == [literal]
    assert _planned([f"glob:{literal}"], options) == [other]
    assert _planned(["s3://slides/lit/a[12].tif"], options) == [other]


# -- 4. decoder integrity ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from s3_fixtures import write_pyramid_tiff

    return write_pyramid_tiff(tmp_path_factory.mktemp("pyr") / "good.tif", 1024, 1024, levels=1)


def _slides_job(tmp_path: Path, uris: list[str], model: Path, **tiles: object) -> tuple[Path, Path]:
    out = tmp_path / "out"
    job = slide_job(uris, model, out, tiles={"level": 0, "mpp": None, **tiles})
    del job["tiles"]["mpp"]
    return write_job(tmp_path / "job.yaml", job), out


def _failures(out: Path) -> pd.DataFrame:
    """The audit trail's failed-shard events (one per attempt)."""
    audit = pd.read_json(out / "audit.jsonl", lines=True)
    return audit[audit["event"] == "shard_failed"]


@pytest.mark.parametrize("corruption", ["flipped bytes", "truncated tile"])
def test_corrupt_jpeg_tiles_quarantine_the_slide_not_silently_decoded(
        tmp_path: Path, pyramid: Path, classifier: Path, corruption: str) -> None:
    bad = tmp_path / "bad.tif"
    if corruption == "flipped bytes":  # seed 2 flips bytes whose damage libjpeg detects
        flip_tile_bytes(pyramid, bad, n_bytes=10, seed=2)
        fragment = "Corrupt JPEG data"
    else:
        truncate_tile(pyramid, bad)
        fragment = "Premature end of JPEG file"
    job, out = _slides_job(tmp_path, [str(pyramid), str(bad)], classifier)
    done = cli("run", str(job))
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"{bad}: corrupt tile" in done.stdout and fragment in done.stdout
    failed = _failures(out)
    assert failed["input"].tolist() == [str(bad)] and failed["attempt"].tolist() == [1]  # not retried
    lenient = cli("run", str(job), "--overwrite", "--set", "tiles.integrity=lenient")
    assert lenient.returncode == 0


def test_running_out_of_memory_in_a_decode_is_not_called_a_corrupt_tile(tmp_path: Path) -> None:
    """Under an address-space limit, decoding a 200 MB tile raised MemoryError, reported as
    'corrupt tile ... (tiles.integrity: lenient decodes what it can)': wrong cause, wrong advice,
    and never retried. It stays a MemoryError (retried: the worker's memory may be free then)."""
    import tifffile

    bomb = tmp_path / "big-tile.tif"
    tifffile.imwrite(bomb, np.full((1024, 1024, 3), 200, np.uint8), tile=(8192, 8192), compression="zlib",
                     photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    script = (
        "import resource, sys, numpy as np, psutil\n"
        "from gpubatch.core.clocks import StageClocks\n"
        "from gpubatch.sources.slides.tiff_backend import TiffBackend\n"
        "backend = TiffBackend(sys.argv[1])\n"
        "limit = psutil.Process().memory_info().vms + (120 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
        "try:\n"
        "    backend.read_boxes(0, np.array([[0, 0, 224, 224]]), StageClocks())\n"
        "except BaseException as exc:\n"
        "    print(type(exc).__name__, exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith(f"MemoryError out of memory decoding tile 0 at level 0 of {bomb}"), \
        done.stdout + done.stderr[-2000:]


def test_a_tile_that_decodes_larger_than_the_tile_quarantines_the_slide(
        tmp_path: Path, pyramid: Path, classifier: Path) -> None:
    """A valid JPEG twice the level's tile size in a tile's place decoded cleanly and was
    reshaped into the tile's pixels, scrambled, and the slide reported done."""
    bad = oversized_tile(pyramid, tmp_path / "oversized.tif", index=1)
    job, out = _slides_job(tmp_path, [str(pyramid), str(bad)], classifier)
    done = cli("run", str(job))
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"{bad}: malformed tile 1 at level 0: its data decodes to" in done.stdout
    assert _failures(out)["input"].tolist() == [str(bad)]


@pytest.mark.parametrize("written", ["0.25", "2.5E-01", "25e-2", ".25"])
def test_an_aperio_mpp_is_read_however_the_number_is_written(tmp_path: Path, written: str) -> None:
    """``MPP = 2.5E-01`` was read as 2.5 (the pattern stopped at the 'E'): ten times the scale."""
    from gpubatch.sources.slides.tiff_backend import TiffBackend

    backend = TiffBackend(str(svs_with_label_and_macro(tmp_path / "s.svs", 512, 512, mpp=written)))
    try:
        assert backend.info.mpp == pytest.approx(0.25) and backend.info.vendor == "aperio"
    finally:
        backend.close()


@pytest.mark.parametrize("other_layout", ["same", "smaller"])
def test_a_slide_written_over_while_read_is_read_again_not_mixed(
        tmp_path: Path, classifier: Path, monkeypatch: pytest.MonkeyPatch, other_layout: str) -> None:
    """A slide overwritten in place by a same-layout one during its shard gave a 'done' shard
    whose tiles came from both files; by a smaller one, a 'truncated' failure never retried. Its
    size and mtime are asked again before the commit (and on an input error): the attempt fails
    saying so, the retry reads one file, and the predictions are the new file's."""
    import tifffile

    import gpubatch
    from gpubatch.sources.slides.source import SlideReader

    slide, other = tmp_path / "slide.tif", tmp_path / "other.tif"
    for path, seed, height in ((slide, 1, 768), (other, 2, 768 if other_layout == "same" else 256)):
        pixels = np.random.default_rng(seed).integers(0, 256, (height, 1024, 3), dtype=np.uint8)
        tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", resolution=(20000, 20000),
                         resolutionunit="CENTIMETER")  # uncompressed: a same-layout file, same offsets
    job, out = _slides_job(tmp_path, [str(slide)], classifier)
    read_block = SlideReader._read_block
    swapped: list[bool] = []

    def overwrite_once(self: SlideReader, members: np.ndarray) -> object:
        if not swapped:
            swapped.append(True)
            slide.write_bytes(other.read_bytes())  # another writer, mid-shard
            os.utime(slide, ns=(time.time_ns(), time.time_ns() + 10**9))
        return read_block(self, members)

    monkeypatch.setattr(SlideReader, "_read_block", overwrite_once)
    got = gpubatch.run(job, overwrite=True)
    assert got.exit_code == 0 and swapped
    failed = _failures(out)
    assert failed["attempt"].tolist() == [1] and "changed while it was read" in failed["error"].iloc[0]
    assert ("truncated" in failed["error"].iloc[0]) == (other_layout == "smaller")
    monkeypatch.setattr(SlideReader, "_read_block", read_block)
    (tmp_path / "clean").mkdir()
    clean_job, _ = _slides_job(tmp_path / "clean", [str(other)], classifier)
    want = gpubatch.run(clean_job)
    cols = ["x", "y", "probs_0", "probs_1", "probs_2"]
    pd.testing.assert_frame_equal(got.predictions()[cols].reset_index(drop=True),
                                  want.predictions()[cols].reset_index(drop=True))


def test_a_tiff_whose_size_contradicts_its_tiles_is_not_handed_to_another_reader(
        tmp_path: Path, pyramid: Path, classifier: Path) -> None:
    """A page claiming 500 x 300 pixels over a 1024 x 1024 tile grid: tifffile refuses it, and
    openslide, tried next, opened it at the wrong scale (no tissue, or tiles at half size)."""
    bad = lying_dimensions(pyramid, tmp_path / "lies.tif", 500, 300)
    job, out = _slides_job(tmp_path, [str(pyramid), str(bad)], classifier)
    done = cli("run", str(job))
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"{bad}: malformed IFD at level 0" in done.stdout and "the file is damaged" in done.stdout
    assert _failures(out)["input"].tolist() == [str(bad)]


def test_a_stored_tile_larger_than_the_read_limit_is_refused_before_it_is_decoded(
        tmp_path: Path, pyramid: Path, classifier: Path) -> None:
    """A 1024 px image stored as one 4096 px zlib tile: a few kB on disk, 50 MB decoded (a
    32768 px one took 3.4 GB). Over tiles.max_read_bytes it is refused by name, not decoded."""
    import tifffile

    bomb = tmp_path / "bomb.tif"
    tifffile.imwrite(bomb, np.full((1024, 1024, 3), 200, np.uint8), tile=(4096, 4096), compression="zlib",
                     photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    job, out = _slides_job(tmp_path, [str(pyramid), str(bomb)], classifier, max_read_bytes=16 << 20)
    done = cli("run", str(job))
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"{bomb}: a stored tile decodes to {4096 * 4096 * 3} bytes, over tiles.max_read_bytes" in done.stdout


def test_a_staged_slide_is_held_to_the_read_limit_too(tmp_path: Path) -> None:
    """The staged wrapper's class default (0) hid its slide's stored tile size from the check."""
    import tifffile

    from gpubatch.io.stage_cache import StagedFile
    from gpubatch.sources.slides.open import StagedBackend
    from gpubatch.sources.slides.source import configure_backend
    from gpubatch.sources.slides.tiff_backend import TiffBackend

    bomb = tmp_path / "bomb.tif"
    tifffile.imwrite(bomb, np.full((1024, 1024, 3), 200, np.uint8), tile=(4096, 4096), compression="zlib",
                     photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    staged = StagedBackend(TiffBackend(str(bomb)), StagedFile(str(bomb), None))
    job = JobSpec.model_validate({"input": {"uris": [str(bomb)]}, "tiles": {"max_read_bytes": 16 << 20},
                                  "model": {"path": "m.onnx"}, "output": {"uri": "o"}})
    with pytest.raises(InputError, match=f"a stored tile decodes to {4096 * 4096 * 3} bytes"):
        configure_backend(staged, job)


def test_malformed_ifd_is_an_input_error_naming_the_file_and_not_retried(
        tmp_path: Path, pyramid: Path, classifier: Path) -> None:
    bad = shorten_tile_offsets(pyramid, tmp_path / "ifd.tif")
    job, out = _slides_job(tmp_path, [str(bad)], classifier)
    done = cli("run", str(job))
    assert done.returncode == 1  # its only input failed: exit 1, not partial
    assert f"{bad}:" in done.stdout and "malformed IFD at level 0: 3 tile offsets" in done.stdout
    assert "IndexError" not in done.stdout + done.stderr
    assert _failures(out)["attempt"].tolist() == [1]


def test_garbled_description_is_no_resolution_and_its_bytes_stay_off_the_terminal(
        tmp_path: Path, classifier: Path) -> None:
    bad = garble_description(shared_file("slides", "CMU-1-Small-Region.svs"), tmp_path / "desc.svs")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", slide_job([str(bad)], classifier, out))
    done = cli("run", str(job))
    assert done.returncode == 1  # its only input failed: exit 1, not partial
    assert "25400" not in done.stdout and "\x1b" not in done.stdout + done.stderr
    assert "EVIL" not in done.stdout + done.stderr and "coercing" not in done.stderr
    assert f"{bad}: the file records no microns-per-pixel" in done.stdout
    verbose = cli("-v", "run", str(job), "--overwrite")  # in the log, with -v: escaped and naming the file
    line = next(x for x in verbose.stderr.splitlines() if "tifffile" in x and "coercing" in x)
    assert f"{bad}: tifffile:" in line and "\\x1b" in line and "\x1b" not in verbose.stderr


# -- 5 and 6. bounded everything; spec errors are spec errors ----------------------------------


SPEC_CASES = {  # a change to a valid slides job -> the field and the message's fragment
    "batch_size true": ({"model": {"batch_size": True}}, "model.batch_size: Input should be a valid integer, got True"),
    "batch_size 10^8": ({"model": {"batch_size": 10**8}}, "model.batch_size: must be between 1 and 65536"),
    "tiles.size 16384": ({"tiles": {"size": 16384}}, "model.batch_size: 16 items make a 48.00 GiB model input"),
    "mpp .inf": ({"tiles": {"mpp": float("inf")}}, "tiles.mpp: Input should be a finite number"),
    "mpp 1e9": ({"tiles": {"mpp": 1e9}}, "tiles.mpp: Input should be less than or equal to 1000"),
    # a fallback no scan records (0.0025 for 0.25): slides read as 'empty' (tiles 100x too big), exit 0
    "mpp_fallback 0.0025": ({"tiles": {"mpp_fallback": 0.0025}},
                            "tiles.mpp_fallback: Input should be greater than or equal to 0.01"),
    "mpp_fallback 25": ({"tiles": {"mpp_fallback": 25}}, "tiles.mpp_fallback: Input should be less than or equal to 10"),
    "mean of two": ({"model": {"input": {"mean": [0.5, 0.5]}}}, "model.input.mean: List should have at least 3 items"),
    "std NaN": ({"model": {"input": {"std": [float("nan"), 1.0, 1.0]}}}, "model.input.std[0]: Input should be a finite number"),
    "std zero": ({"model": {"input": {"std": [0.0, 1.0, 1.0]}}}, "model.input.std: every std must be > 0"),
    "readers true": ({"run": {"readers": True}}, "run.readers: Input should be a valid integer, got True"),
    "overlap NaN": ({"tiles": {"overlap": float("nan")}}, "tiles.overlap: Input should be a finite number"),
    "min_fraction inf": ({"tiles": {"tissue": {"min_fraction": float("inf")}}}, "tiles.tissue.min_fraction"),
    "integrity 1": ({"tiles": {"integrity": 1}}, "tiles.integrity: Input should be 'strict' or 'lenient'"),
    "workers 64": ({"run": {"profile": "local", "workers": 64}}, "run.workers: 64 worker processes on a machine with"),
    "prefetch x batch": ({"model": {"batch_size": 65536}, "run": {"max_worker_memory": 1 << 30}},
                         "over its 1.00 GiB (run.max_worker_memory)"),
}


def _merged(job: dict, change: dict) -> dict:
    for key, value in change.items():
        job[key] = _merged(dict(job.get(key) or {}), value) if isinstance(value, dict) else value
    return job


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_what_is_known_before_reading_a_slide_is_refused_by_validate(
        tmp_path: Path, slide_path: Path, classifier: Path, case: str) -> None:
    from gpubatch.runtime.preflight import preflight
    from gpubatch.spec import load_job

    change, fragment = SPEC_CASES[case]
    job = _merged(slide_job([str(slide_path)], classifier, tmp_path / "out"), change)
    path = write_job(tmp_path / "job.yaml", job)
    with pytest.raises(SpecError) as err:
        preflight(load_job(path))
    assert fragment in str(err.value) and err.value.exit_code == 2


def test_forced_workers_and_a_generous_memory_budget_pass(tmp_path: Path, slide_path: Path, classifier: Path) -> None:
    from gpubatch.runtime.preflight import preflight
    from gpubatch.spec import load_job

    job = slide_job([str(slide_path)], classifier, tmp_path / "out",
                    run={"profile": "local", "workers": 64, "force_workers": True})
    preflight(load_job(write_job(tmp_path / "job.yaml", job)))


@pytest.mark.parametrize("case", ["alias bomb", "deep nesting", "oversized"])
def test_hostile_yaml_is_refused_quickly_and_cheaply(tmp_path: Path, case: str) -> None:
    text = {"alias bomb": alias_bomb(), "deep nesting": deep_yaml(),
            "oversized": "name: x\n" + "# padding\n" * 120_000}[case]
    path = tmp_path / "job.yaml"
    path.write_text(text)
    started = time.perf_counter()
    done, peak_kib = cli_peak("validate", str(path), timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert {"alias bomb": "more than 100000 values once aliases are expanded",
            "deep nesting": "nested deeper than 64 levels",
            "oversized": "larger than 1 MiB"}[case] in done.stderr
    assert time.perf_counter() - started < 30
    assert peak_kib < 1_500_000  # no 5 GB expansion


def test_tiff_claiming_a_million_pixels_a_side_fails_fast(tmp_path: Path, classifier: Path) -> None:
    huge = huge_claim_tiff(tmp_path / "huge.tif")
    assert huge.stat().st_size < 8_000_000
    job, _ = _slides_job(tmp_path, [str(huge)], classifier)
    started = time.perf_counter()
    done, peak_kib = cli_peak("run", str(job), timeout=120)
    assert done.returncode == 1  # its only input failed: exit 1, not partial
    assert f"{huge}: level 0 (the level tiles are read from) is 1000000 x 1000000 pixels, over tiles.max_level_pixels" in done.stdout
    assert time.perf_counter() - started < 60
    assert peak_kib < 1_500_000


def test_overlap_never_makes_a_read_unit_larger_than_its_cap(tmp_path: Path, pyramid: Path, classifier: Path) -> None:
    from gpubatch.sources.slides.backends import SlideInfo
    from gpubatch.sources.slides.grid import block_ids, make_grid
    from gpubatch.spec import TilesSpec

    info = SlideInfo(((20000, 20000),), (1.0,), 0.25, None, "test", "test")
    for overlap in (0.0, 0.5, 0.9):
        tiles = TilesSpec(size=224, mpp=0.5, overlap=overlap)
        grid = make_grid(info, tiles, "s")
        per_unit = np.bincount(block_ids(grid, tiles.read_block, tiles.max_read_bytes)).max()
        assert per_unit * grid.read_size**2 * 3 <= tiles.max_read_bytes
    with pytest.raises(InputError, match=r"382319809 tiles, over tiles.max_tiles \(4000000\)"):
        make_grid(info, TilesSpec(size=224, mpp=0.5, overlap=0.999), "s")
    # the cap splits reads, never changes results: a 1 MiB cap against the default
    job, out = _slides_job(tmp_path, [str(pyramid)], classifier, size=32, overlap=0.9)
    assert cli("run", str(job)).returncode == 0
    def rows() -> pd.DataFrame:
        return pd.read_parquet(out / "predictions.parquet").sort_values(["y", "x"]).reset_index(drop=True)

    wide = rows()
    assert cli("run", str(job), "--overwrite", "--set", f"tiles.max_read_bytes={1 << 20}").returncode == 0
    pd.testing.assert_frame_equal(rows(), wide)


# -- 7. a clean terminal -----------------------------------------------------------------------


def test_control_characters_in_job_and_file_names_are_escaped(tmp_path: Path, slide_path: Path,
                                                              classifier: Path) -> None:
    """A raw newline forging a log line, an ANSI colour escape and a right-to-left override in
    the job's name and in a file's name reach the terminal escaped; the file is still named."""
    evil = tmp_path / CONTROL_NAME
    evil.write_bytes(b"")  # a zero-byte slide: quarantined, so its name is printed
    job = slide_job([str(slide_path), str(evil)], classifier, tmp_path / "out")
    job["name"] = CONTROL_NAME
    done = cli("-v", "run", str(write_job(tmp_path / "job.yaml", job)))
    assert done.returncode == 3
    shown = done.stdout + done.stderr
    assert "\x1b" not in shown and "\u202e" not in shown
    assert not any(line.startswith("2026-01-01 gpubatch INFO all fine") for line in shown.splitlines())
    assert "evil\\x0a2026-01-01 gpubatch INFO all fine\\x1b[31m\\u202egnp.tif" in done.stdout
    assert "is an empty (zero-byte) file" in done.stdout
