"""Inputs' versions on real servers: what a run records of them, and the requests it costs.

A moto S3 server behind the counting proxy of ``s3_fixtures``, and small local HTTP servers for
what S3 never answers (weak ETags, no Content-Length).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpubatch.spec import JobSpec

pysam = pytest.importorskip("pysam")
pytest.importorskip("moto")

from http_servers import FileServer  # noqa: E402
from s3_fixtures import S3Stack  # noqa: E402

pytest_plugins = ["s3_fixtures"]


def write_fasta(path: Path, contigs: dict[str, str], width: int = 60, bgzip: bool = False) -> Path:
    """A FASTA (bgzip-compressed when asked) and its samtools index (.fai, and .gzi for bgzip)."""
    plain = path.with_suffix(".plain") if bgzip else path
    with open(plain, "w") as f:
        for name, seq in contigs.items():
            f.write(f">{name}\n")
            f.writelines(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
    if bgzip:
        pysam.tabix_compress(str(plain), str(path), force=True)
    pysam.faidx(str(path))
    return path


CONTIGS = {"chrA": "ACGT" * 500, "chrB": "GATTACA" * 100}


def genome_spec(tmp_path: Path, reference: str, storage: dict[str, Any] | None = None, **windows: Any) -> dict[str, Any]:
    from gpubatch.cli.demo_models import make_genome_model

    model = tmp_path / "g.onnx"
    if not model.exists():
        make_genome_model(model, 100)
    return {"kind": "genome", "input": {"storage": storage or {}},
            "windows": {"reference": reference, "length": 100, "windows_per_shard": 10, **windows},
            "model": {"path": str(model)}, "output": {"uri": str(tmp_path / "out")},
            "run": {"profile": "inline"}}


# -- the spec's result fields: asked once per run ------------------------------------------------


def test_a_remote_bed_is_asked_for_its_version_once_per_run(s3: S3Stack, tmp_path: Path) -> None:
    """The spec's result fields HEAD a remote BED; a run asked for them three times (the spec
    record, its hash, the workers' hash). Now once per run, and a second run asks again: a BED
    changed between the runs is still a changed result field."""
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.source import GenomeSource

    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t1000\n")
    uri = s3.upload(bed, "beds/once.bed")
    job = JobSpec.model_validate(genome_spec(tmp_path, str(fasta), s3.options(), regions=uri))
    key = uri.removeprefix("s3://")
    GenomeSource().plan(job)  # the plan's own reads of the BED, counted apart
    planned = s3.proxy.heads.get(key, 0)
    s3.proxy.reset()
    assert run_job(job, profile="inline", show_progress=False).exit_code == 0
    assert s3.proxy.heads.get(key, 0) == planned + 1
    s3.proxy.reset()
    assert run_job(job, profile="inline", resume=True, show_progress=False).exit_code == 0
    assert s3.proxy.heads.get(key, 0) == planned + 1  # the plan is made again on resume
    bed.write_text("chrA\t0\t1000\nchrA\t1000\t2000\n")
    s3.upload(bed, "beds/once.bed")
    from gpubatch.core.errors import SpecError

    with pytest.raises(SpecError, match="windows.regions_version"):
        run_job(job, profile="inline", resume=True, show_progress=False)


def test_a_remote_bed_is_read_with_one_head(s3: S3Stack, tmp_path: Path) -> None:
    """A BED file read through s3fs took two HEADs: an existence check, then the file's own (its
    size). The file's own HEAD says a missing file as well: one now, and a BED that is not
    there is still "file not found"."""
    from gpubatch.core.errors import SpecError
    from gpubatch.sources.genome.regions import parse_bed

    bed = tmp_path / "regions.bed"
    bed.write_text("chrA\t0\t1000\nchrB\t0\t600\n")
    uri = s3.upload(bed, "beds/heads.bed")
    s3.proxy.reset()
    table = parse_bed(uri, s3.options())
    assert [(r.chrom, r.start, r.end) for r in table] == [("chrA", 0, 1000), ("chrB", 0, 600)]
    assert (s3.proxy.heads.get(uri.removeprefix("s3://"), 0), s3.proxy.gets.get(uri.removeprefix("s3://"), 0)) == (1, 1)
    with pytest.raises(SpecError, match="file not found"):
        parse_bed(uri + ".missing", s3.options())


# -- a reference's version covers its indexes -----------------------------------------------------


def _reordered(fai: Path) -> bytes:
    """The index with its lines in another order: every check against the FASTA passes (they go
    by offset), but the contig table's order, and so the plan's windows over ``genome`` and
    which shard holds which, is another."""
    lines = fai.read_bytes().splitlines(keepends=True)
    return b"".join(lines[::-1])


def test_a_rebuilt_index_is_a_changed_result_field_locally(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The FASTA is unchanged and its .fai lists the contigs in another order (samtools would
    not, a hand-edited or merged index may): the kept shards would hold other windows than the
    plan's same shards. --resume is refused, naming the field."""
    from conftest import write_job

    from gpubatch.cli.main import main

    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    spec = write_job(tmp_path / "job.yaml", genome_spec(tmp_path, str(fasta)))
    assert main(["run", str(spec)]) == 0
    fai = Path(f"{fasta}.fai")
    stat = fasta.stat()
    fai.write_bytes(_reordered(fai))
    assert fasta.stat().st_mtime == stat.st_mtime  # the FASTA itself is as it was
    capsys.readouterr()
    assert main(["run", str(spec), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "windows.reference_version" in err and "--overwrite" in err
    assert main(["run", str(spec), "--overwrite"]) == 0


def test_a_remote_index_changed_since_the_run_is_refused(s3: S3Stack, tmp_path: Path) -> None:
    """The same on object storage, for a bgzip FASTA: its .fai's ETag, and its .gzi's, are in
    the reference's version; a .fai written over between the run and --resume is refused."""
    from gpubatch.core.errors import SpecError
    from gpubatch.runtime.runner import run_job

    gz = write_fasta(tmp_path / "ref.fa.gz", CONTIGS, bgzip=True)
    uri = s3.upload(gz, "ref/ref.fa.gz")
    s3.upload(Path(f"{gz}.fai"), "ref/ref.fa.gz.fai")
    s3.upload(Path(f"{gz}.gzi"), "ref/ref.fa.gz.gzi")
    job = JobSpec.model_validate(genome_spec(tmp_path, uri, s3.options()))
    version = job.result_fields()["windows"]["reference_version"]
    assert [part.split(" ")[0] for part in version.split("; ")] == ["fasta", "fai", "gzi"]
    assert all(" etag:" in part for part in version.split("; "))
    assert run_job(job, profile="inline", show_progress=False).exit_code == 0
    s3.upload_bytes(_reordered(Path(f"{gz}.fai")), "ref/ref.fa.gz.fai")
    with pytest.raises(SpecError, match="windows.reference_version"):
        run_job(job, profile="inline", resume=True, show_progress=False)
    gzi = Path(f"{gz}.gzi").read_bytes()
    s3.upload_bytes(gzi + bytes(16), "ref/ref.fa.gz.gzi")  # another .gzi: another version
    assert job.result_fields()["windows"]["reference_version"].split("; ")[2] != version.split("; ")[2]


# -- the HEADs a slide's reading sends ---------------------------------------------------------


def _slide_requests(log: list[tuple[str, str]], keys: list[str]) -> dict[str, dict[str, int]]:
    """Per slide key, the server's requests of it by kind (the proxy's access log)."""
    from test_storage_request_kinds import request_kind

    counted: dict[str, dict[str, int]] = {key: {} for key in keys}
    for method, path in log:
        key = path.split("?", 1)[0].lstrip("/")
        if key in counted:
            kind = request_kind(method, path)
            counted[key][kind] = counted[key].get(kind, 0) + 1
    return counted


@pytest.mark.parametrize(("client", "access", "ahead", "profile", "heads"), [
    ("obstore", "stream", 0, "inline", 0), ("obstore", "stage", 0, "inline", 1),
    ("obstore", "stage", 2, "inline", 1), ("obstore", "stage", 2, "local", 1),
    ("fsspec", "stream", 0, "inline", 2)])
def test_the_heads_of_each_slide_are_the_ones_its_version_needs(
        s3: S3Stack, tmp_path: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch,
        client: str, access: str, ahead: int, profile: str, heads: int) -> None:
    """Four slides on S3, each read in its shard. Every slide's reading sent a HEAD of it beside
    its reads: the streamed open's (its size and ETag), which obstore's first GET answers itself
    (Content-Range's size, the ETag its later GETs pin with If-Match); and the shard's identity,
    asked again of a staged copy whose staging HEAD had just said which version it is of. Before:
    1 HEAD per streamed slide (obstore), 2 per staged one. Now none and one (the staging's, which
    its chunked download is pinned to). Through fsspec, whose GETs cannot be pinned, the open's
    HEAD and the check after the shard stay: two. The identity committed is still the object's,
    and the report's requests by kind are still what the server answered.

    Staged with ``run.stage_ahead`` above 0, the client stages the first slides before the
    workers start, and a worker opening (or prefetching) one asked its version again: 2 HEADs
    for each of those (3 where a worker's prefetch found the client's download in progress and
    its open asked once more), 8 for 4 slides on the local profile. The client's records name
    the run and keep the version it asked, which the run's workers take: 1 HEAD per slide, as
    at ``stage_ahead: 0``, on the inline profile (one process) and the local one (worker
    processes)."""
    from conftest import slide_job, synthetic_slides, write_job

    import gpubatch
    from gpubatch.outputs.manifest import Manifest
    from gpubatch.outputs.store import OutputStore

    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    (tmp_path / "slides").mkdir()
    folder = synthetic_slides(tmp_path / "slides", 4, 40, "s")
    keys = [f"heads-{client}-{access}-{ahead}-{profile}/{p.name}" for p in sorted(folder.glob("*.tif"))]
    uris = [s3.upload(folder / key.rsplit("/", 1)[1], key) for key in keys]
    job = slide_job(uris, mean_model, tmp_path / "out", run={"stage_ahead": ahead, "profile": profile})
    job["input"].update(storage=s3.options(), access=access)
    s3.proxy.reset()
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
    assert result.exit_code == 0, result.report["failed"]
    seen = _slide_requests(s3.proxy.log, [f"{s3.bucket}/{key}" for key in keys])
    assert [n.get("head", 0) for n in seen.values()] == [heads] * 4, seen
    assert all(n.get("get", 0) >= 1 for n in seen.values()), seen
    by_kind = result.report["storage"]["by_kind"]
    assert by_kind.get("head", 0) == sum(n.get("head", 0) for n in seen.values()), (by_kind, seen)
    assert by_kind.get("get", 0) == sum(n.get("get", 0) for n in seen.values()), (by_kind, seen)
    etags = {u: s3.fs().info(u)["ETag"].strip('"') for u in uris}
    committed = {e.input: e.input_identity for e in Manifest(OutputStore(str(tmp_path / "out"))).iter_committed()}
    assert {u: (committed[u]["etag"], committed[u]["size"]) for u in uris} == {
        u: (etags[u], (folder / u.rsplit("/", 1)[1]).stat().st_size) for u in uris}


@pytest.mark.parametrize(("client", "heads"), [
    ("obstore", {"ref.fa.gz": 4, "ref.fa.gz.fai": 1, "ref.fa.gz.gzi": 1}),
    ("fsspec", {"ref.fa.gz": 10, "ref.fa.gz.fai": 2, "ref.fa.gz.gzi": 2})])
def test_the_heads_of_a_remote_genome_are_the_ones_its_versions_need(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str, heads: dict[str, int]) -> None:
    """A bgzip FASTA on S3 with its .fai and .gzi, two windows shards in this process, the plan
    included. Through obstore each shard asked the FASTA's identity (a HEAD) beside its open, and
    its reader asked the size (another: the bgzip read needs it) although the shard carried the
    planned ETag and size: 8 HEADs of the FASTA. Now the shard's reads are pinned to the planned
    ETag (If-Match) and take its size, so the planned identity is its start identity and no HEAD
    after is needed (a FASTA written over is refused by the read itself): 4, all the plan's.
    The indexes took 3 HEADs each (5 through fsspec): the result fields', the plan's read's and
    the worker's first shard's. Now the plan reads the version the result fields asked and keeps
    it for this process's shards: 1 each (fsspec, which cannot pin its reads: and the HEAD after
    the read). fsspec's FASTA checks stay (10). The report's HEAD count is still the server's."""
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.indexes import forget_indexes

    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    fasta = write_fasta(tmp_path / "ref.fa.gz", CONTIGS, bgzip=True)
    for end in (".fai", ".gzi"):
        s3.upload(Path(f"{fasta}{end}"), f"genheads-{client}/ref.fa.gz{end}")
    uri = s3.upload(fasta, f"genheads-{client}/ref.fa.gz")
    spec = genome_spec(tmp_path, uri, s3.options(), regions=["chrA:0-1000", "chrB:0-600"])
    spec["output"] = {"uri": str(tmp_path / "out")}
    spec["run"].update(profile="inline", workers=1)
    job = JobSpec.model_validate(spec)
    forget_indexes()
    s3.proxy.reset()
    result = run_job(job, profile="inline", show_progress=False)
    assert result.exit_code == 0, result.report["failed"]
    assert result.report["shards_total"] == 2
    seen = _slide_requests(s3.proxy.log, [f"{s3.bucket}/genheads-{client}/{name}" for name in heads])
    assert {key.rsplit("/", 1)[1]: n.get("head", 0) for key, n in seen.items()} == heads, seen
    by_kind = result.report["storage"]["by_kind"]
    answered = sum(1 for method, _ in s3.proxy.log if method == "HEAD")
    assert by_kind.get("head", 0) == answered == result.report["storage"]["heads"], (by_kind, seen)


# -- servers S3 is not: weak ETags, no Content-Length --------------------------------------------


def test_a_weak_etag_pins_nothing_and_the_report_says_which_inputs(tmp_path: Path, slides_dir: Path,
                                                                     mean_model: Path) -> None:
    """A server's weak ETag (``W/"..."``) is no version If-Match may name (RFC 9110: strong
    comparison; a server must answer 412). Its slides are read unpinned: no If-Match sent, a HEAD
    after each shard (the only one: the open's size and ETag come with its first GET), and the
    report's notes say in one line which inputs could not be pinned and why."""
    from conftest import slide_job, write_job

    import gpubatch

    slides = sorted(slides_dir.glob("*.tif"))[:2]
    server = FileServer({f"/weak/{p.name}": p.read_bytes() for p in slides}, etag='W/"v1"')
    try:
        uris = [f"{server.url}/weak/{p.name}" for p in slides]
        job = slide_job(uris, mean_model, tmp_path / "out", run={"stage_ahead": 0})
        job["input"].update(access="stream")
        result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
        assert result.exit_code == 0, result.report["failed"]
        assert result.report["counters"].get("storage.client.obstore", 0) >= 2  # the client that pins
        assert server.requests and not any(if_match for _, _, if_match in server.requests)
        assert [server.count("HEAD", f"/weak/{p.name}") for p in slides] == [1, 1]
        notes = [n for n in result.report["notes"] if "not pinned" in n]
        assert len(notes) == 1 and notes[0].startswith("2 inputs (") and "weak" in notes[0], notes
        assert all(u in notes[0] for u in uris)
    finally:
        server.close()


def test_a_download_of_unknown_size_is_checked_to_be_the_version_listed(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that gives no Content-Length (HTTP/1.0, the body ends with the connection): the
    stage cache downloads such an object in one GET, which no range read pins. The GET's own
    ETag is checked against the listing's: another one (the object written over between them)
    is InputChanged, so the shard is read again; the same one stages the file with no HEAD more.
    (Reached through fsspec: obstore refuses a HEAD without Content-Length.)"""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.core.errors import InputChanged
    from gpubatch.io.stage_cache import StageCache

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "fsspec")
    body = b"a slide only openslide reads " * 100
    server = FileServer({"/s/a.svs": body}, etag='"v1"', lengths=False)
    try:
        uri = f"{server.url}/s/a.svs"
        with StageCache(str(tmp_path / "stage")).open(uri, None, StageClocks()) as staged:
            assert Path(staged.path).read_bytes() == body and staged.etag == "v1"
        heads, gets = server.count("HEAD", "/s/a.svs"), server.count("GET", "/s/a.svs")
        server.get_etags = ['"v1"'] * (gets - 1)  # the listing's own GETs (fsspec's info asks one)
        server.etag = '"v2"'  # then the object is written over: the download's GET is of v2
        with pytest.raises(InputChanged, match="ETag v1 listed, v2 downloaded"):
            StageCache(str(tmp_path / "stage2")).open(uri, None, StageClocks())
        assert server.count("HEAD", "/s/a.svs") == 2 * heads  # the listing's, no HEAD after
    finally:
        server.close()


def test_auto_reads_an_object_of_unknown_size_through_fsspec(tmp_path: Path, slides_dir: Path, mean_model: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """``range_reader: auto`` (the default) on a server that gives no Content-Length: obstore's
    HEAD refuses such an answer ("Content-Length Header missing"), and the run failed every slide.
    auto now reads such an object through fsspec, as ``range_reader: fsspec`` would, saying why
    once per server; every tile comes back, the identity committed is the object's ETag (so the
    download is still checked to be of it), and a range read with no HEAD before it switches too."""
    from conftest import slide_job, write_job

    import gpubatch

    slides = sorted(slides_dir.glob("*.tif"))[:2]
    server = FileServer({f"/nolen/{p.name}": p.read_bytes() for p in slides}, etag='"v1"', lengths=False)
    try:
        uris = [f"{server.url}/nolen/{p.name}" for p in slides]
        job = slide_job(uris, mean_model, tmp_path / "out", run={"stage_ahead": 0})
        job["input"].update(access="stage")  # no size to stream by: staged in one GET
        want = gpubatch.run(write_job(tmp_path / "local.yaml", slide_job(
            [str(p) for p in slides], mean_model, tmp_path / "local", run={"stage_ahead": 0})))
        with caplog.at_level("INFO", logger="gpubatch"):
            result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
        assert result.exit_code == 0, result.report["failed"]
        assert len(result.predictions()) == len(want.predictions()) > 0
        assert result.report["counters"].get("storage.client.fsspec", 0) >= 2
        from gpubatch.outputs.manifest import Manifest
        from gpubatch.outputs.store import OutputStore

        committed = Manifest(OutputStore(str(tmp_path / "out"))).iter_committed()
        assert {e.input: e.input_identity["etag"] for e in committed} == dict.fromkeys(uris, "v1")
        from gpubatch.io.storage import open_ranges

        server.files["/nolen/raw.bin"] = bytes(range(256)) * 4  # a range read with no HEAD first
        with caplog.at_level("INFO", logger="gpubatch"), open_ranges(f"{server.url}/nolen/raw.bin") as reader:
            assert reader.fetch(10, 20) == bytes(range(10, 20)) and reader.version() is None
        why = [r.getMessage() for r in caplog.records if "Content-Length" in r.getMessage()]
        assert len(why) == 1 and "fsspec" in why[0], why
    finally:
        server.close()


def test_auto_stages_a_slide_whose_server_gives_no_size_and_refuses_an_empty_one(
        tmp_path: Path, slides_dir: Path, mean_model: Path) -> None:
    """``input.access: auto`` streams a TIFF, which needs the object's size to read ranges by. A
    server that sends no Content-Length gives none: the slide was failed as "an empty object or
    a prefix". auto now stages it (one whole GET, checked to be the version listed) and reads
    every tile; an object that is really empty is still failed, by name, and the run goes on."""
    from conftest import slide_job, write_job

    import gpubatch

    slide = sorted(slides_dir.glob("*.tif"))[0]
    server = FileServer({"/nolen/a.tif": slide.read_bytes(), "/nolen/empty.tif": b""}, etag='"v1"', lengths=False)
    try:
        uris = [f"{server.url}/nolen/a.tif", f"{server.url}/nolen/empty.tif"]
        job = slide_job(uris, mean_model, tmp_path / "out", run={"stage_ahead": 0})
        want = gpubatch.run(write_job(tmp_path / "local.yaml", slide_job(
            [str(slide)], mean_model, tmp_path / "local", run={"stage_ahead": 0})))
        result = gpubatch.run(write_job(tmp_path / "job.yaml", job))
        assert result.exit_code == 3, result.report["failed"]
        assert len(result.predictions()) == len(want.predictions()) > 0
        (failed,) = result.report["failed"]
        assert failed["input"].endswith("empty.tif") and "empty" in failed["error"], failed
        assert result.report["counters"].get("storage.stream_fallbacks", 0) >= 1
    finally:
        server.close()
