"""A genome run's reference versions on its workers: what each shard's reads are pinned to, and
the index (.fai, .gzi) each shard reads checked to be the one its plan used.

A moto S3 server behind the counting proxy of ``s3_fixtures`` for the remote cases.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpubatch.spec import JobSpec

pytest.importorskip("pysam")
pytest.importorskip("moto")

from s3_fixtures import S3Stack  # noqa: E402
from test_input_versions import CONTIGS, genome_spec, write_fasta  # noqa: E402

pytest_plugins = ["s3_fixtures"]


CLIENTS = ["obstore", "fsspec"]
#: another genome of the same contig lengths (so the same .fai): a FASTA written over with it
#: reads as well as the first, and nothing in its bytes says which version a window came from
OTHER = {"chrA": "TTGCA" * 400, "chrB": "CCATTAG" * 100}


def _upload_reference(s3: S3Stack, tmp_path: Path, key: str) -> str:
    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    s3.upload(Path(f"{fasta}.fai"), f"{key}.fai")
    return s3.upload(fasta, key)


def _fasta_heads(s3: S3Stack, tmp_path: Path, uri: str, per_shard: int) -> tuple[int, int]:
    """(shards, HEADs of the FASTA) of one genome run over ``uri``, plan and checks included."""
    from gpubatch.runtime.runner import run_job

    spec = genome_spec(tmp_path, uri, s3.options(), windows_per_shard=per_shard)
    job = JobSpec.model_validate({**spec, "output": {"uri": str(tmp_path / f"out{per_shard}")}})
    s3.proxy.reset()
    result = run_job(job, profile="inline", show_progress=False)
    assert result.exit_code == 0, result.report["failed"]
    return result.report["shards_total"], s3.proxy.heads.get(uri.removeprefix("s3://"), 0)


@pytest.mark.parametrize(("client", "per_shard"), [("obstore", 0), ("fsspec", 2)])
def test_a_pinned_reference_is_not_asked_again_after_its_shard(s3: S3Stack, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               client: str, per_shard: int) -> None:
    """A windows shard's reads of a remote FASTA through obstore are pinned to one ETag (If-Match),
    as a streamed slide's are, and the reader now says which: the worker takes it instead of a
    HEAD after the shard (4 HEADs of the FASTA a shard before, 3 now). fsspec's reads are not
    pinned, so there the HEAD after stays. Counted as the difference between a 3-shard run and a
    1-shard run of the same windows, so the plan's and the run's own requests cancel out. (Since
    shards carry the reference's form, its probe's 2 HEADs a shard are gone too: 1 and 2 then.
    Since a windows shard's reads are pinned to the planned ETag itself, the planned identity is
    its start identity, no HEAD beside the open: none a shard through obstore now.)"""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    uri = _upload_reference(s3, tmp_path, f"pin-{client}/ref.fa")
    one, heads_one = _fasta_heads(s3, tmp_path, uri, 100)
    three, heads_three = _fasta_heads(s3, tmp_path, uri, 10)
    assert (one, three) == (1, 3)
    assert heads_three - heads_one == 2 * per_shard


def _writing_over_at_second_read(monkeypatch: pytest.MonkeyPatch, write: Callable[[], object],
                                 at: int = 2) -> list[int]:
    """The run's ``at``-th (second) reference read first calls ``write`` (another writer, mid-shard)."""
    from gpubatch.sources.genome.source import GenomeWindowReader

    read_run = GenomeWindowReader._read_run
    reads: list[int] = []

    def written_over(self: GenomeWindowReader, i: int, j: int) -> object:
        reads.append(1)
        if len(reads) == at:
            write()
        return read_run(self, i, j)

    monkeypatch.setattr(GenomeWindowReader, "_read_run", written_over)
    return reads


@pytest.mark.parametrize("client", CLIENTS)
def test_a_reference_written_over_mid_run_is_refused_not_mixed(s3: S3Stack, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                client: str) -> None:
    """The FASTA is written over (same contig lengths, other bases) between a shard's first and
    second read (after shards that committed): through obstore a pinned read is refused (412) or
    reads another version than the shard's start; through fsspec the HEAD after the shard sees
    the new ETag. The attempt fails saying the input changed; its next attempt,
    and every shard after, finds another version than the plan's and is refused too, naming
    --overwrite (a later shard read at the new version would sit beside earlier ones read at the
    planned one). What was committed is all of the planned version: a clean run's over it."""
    import pandas as pd
    from conftest import audit_lines

    from gpubatch.runtime.runner import run_job

    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    key = f"over-{client}/ref.fa"
    uri = _upload_reference(s3, tmp_path, key)
    (tmp_path / "other").mkdir()
    other = write_fasta(tmp_path / "other" / "ref.fa", OTHER)
    assert Path(f"{other}.fai").read_bytes() == (tmp_path / "ref.fa.fai").read_bytes()
    _writing_over_at_second_read(monkeypatch, lambda: s3.upload(other, key), at=4)
    spec = genome_spec(tmp_path, uri, s3.options(), windows_per_shard=5, chunk_bases=1024)
    spec["run"].update(readers=1, retries=1)
    got = run_job(JobSpec.model_validate(spec), profile="inline", show_progress=False)
    assert got.exit_code != 0 and got.report["failed"]
    for failed in got.report["failed"]:
        assert "changed since the run was planned" in failed["error"] and failed["attempts"] == 2, failed
    mid_shard = ("412 Precondition Failed", "changed while it was read", "changed after it was opened")
    errors = [line["error"] for line in audit_lines(tmp_path / "out", "shard_failed")]
    assert any(any(said in e for said in mid_shard) for e in errors), errors  # the shard in flight
    monkeypatch.undo()
    clean = genome_spec(tmp_path, str(tmp_path / "ref.fa"), windows_per_shard=5, chunk_bases=1024)
    want = run_job(JobSpec.model_validate({**clean, "output": {"uri": str(tmp_path / "clean")}}),
                   profile="inline", show_progress=False).predictions()
    kept = got.predictions()
    assert 0 < got.report["shards_done"] < got.report["shards_total"] and len(kept)
    on = ["chrom", "start", "end", "strand"]
    pd.testing.assert_frame_equal(kept.reset_index(drop=True),
                                  kept[on].merge(want, on=on, how="left").reset_index(drop=True)[kept.columns])


@pytest.mark.parametrize("after", ["open", "first read"])
def test_a_read_held_to_the_planned_reference_says_it_changed_since_the_plan(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str) -> None:
    """A reference opened through obstore held to its planned identity (a windows shard's FASTA,
    a variants shard's reference) reads only the planned ETag (If-Match), with no HEAD. Written
    over after the plan, the read's 412 said "the object changed while it was read", though the
    object was no longer the planned version whenever it was written: now it says the reference
    changed since the run was planned (naming the 412 and --overwrite), as a HEAD would have."""
    from gpubatch.core.errors import InputChanged
    from gpubatch.io.storage import input_identity
    from gpubatch.sources.genome.indexes import forget_indexes
    from gpubatch.sources.genome.opening import open_reference

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    key = f"held-{after.replace(' ', '-')}/ref.fa"
    uri = _upload_reference(s3, tmp_path, key)
    planned = input_identity(uri, s3.options())
    (tmp_path / "other").mkdir()
    other = write_fasta(tmp_path / "other" / "ref.fa", OTHER)
    forget_indexes()
    reference = open_reference(uri, s3.options(), fmt="fasta", planned=planned)
    try:
        if after == "first read":
            assert bytes(reference.fetch("chrA", 0, 5)) == bytes(reference.fetch("chrA", 0, 5))
        s3.upload(other, key)
        with pytest.raises(InputChanged) as caught:
            reference.fetch("chrB", 0, 100)
    finally:
        reference.close()
    said = caught.value.message
    assert "changed since the run was planned" in said and "412 Precondition Failed" in said, said
    assert planned["etag"] in said and "--overwrite" in said and caught.value.retryable


def _rewriting_before_shards(monkeypatch: pytest.MonkeyPatch, fai: Path, data: bytes) -> None:
    """As each shard starts on its worker (the source's before_shard hook), after the plan read
    the index: ``fai`` is written with ``data`` (another writer rebuilding the index mid-run)."""
    from gpubatch.sources.genome.source import GenomeSource

    def rewrite(self: GenomeSource, job: JobSpec, upcoming: object) -> None:
        part = fai.with_name(f"{fai.name}.{uuid.uuid4().hex}")
        part.write_bytes(data)  # whole, then in place: another shard may be reading it meanwhile
        part.replace(fai)

    monkeypatch.setattr(GenomeSource, "before_shard", rewrite, raising=False)


def test_an_index_rewritten_after_the_plan_is_refused_by_its_shards(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The .fai is rewritten between the plan and the workers' reads, with its lines in another
    order (every check against the FASTA passes, so the shards committed before). Each shard
    now compares the index it read with the plan's (its sha256, carried in the shard) and is
    refused with InputChanged: read again (run.retries), then reported naming the .fai. The
    same bytes written again (a touch) change nothing."""
    from test_input_versions import _reordered

    from gpubatch.runtime.runner import run_job

    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    fai = Path(f"{fasta}.fai")
    original = fai.read_bytes()
    spec = genome_spec(tmp_path, str(fasta))
    spec["run"].update(retries=1)
    _rewriting_before_shards(monkeypatch, fai, original)
    same = run_job(JobSpec.model_validate({**spec, "output": {"uri": str(tmp_path / "same")}}),
                   profile="inline", show_progress=False)
    assert same.exit_code == 0, same.report["failed"]
    _rewriting_before_shards(monkeypatch, fai, _reordered(fai))
    got = run_job(JobSpec.model_validate(spec), profile="inline", show_progress=False)
    assert got.exit_code != 0 and got.report["shards_done"] == 0
    assert len(got.report["failed"]) == got.report["shards_total"] == 3
    for failed in got.report["failed"]:
        assert failed["input"] == str(fasta) and failed["attempts"] == 2, failed
        assert f"index {fasta}.fai changed since the run was planned" in failed["error"], failed
        assert "--overwrite" in failed["error"]


# -- requests per shard before its first window ---------------------------------------------------

#: the objects a FASTA reference is, by suffix of its key
OBJECTS = {"fasta": "", "fai": ".fai", "gzi": ".gzi", "zarr.json": "/zarr.json"}


def _requests(s3: S3Stack, tmp_path: Path, uri: str, per_shard: int) -> tuple[int, dict[str, tuple[int, int]]]:
    """(shards, (HEADs, GETs) per object of the reference) of one genome run over ``uri``, the
    plan included, in a worker process that has kept no index yet (a fresh one)."""
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.indexes import forget_indexes

    spec = genome_spec(tmp_path, uri, s3.options(), windows_per_shard=per_shard)
    job = JobSpec.model_validate({**spec, "output": {"uri": str(tmp_path / f"out{per_shard}")}})
    forget_indexes()
    s3.proxy.reset()
    result = run_job(job, profile="inline", show_progress=False)
    assert result.exit_code == 0, result.report["failed"]
    key = uri.removeprefix("s3://")
    return result.report["shards_total"], {name: (s3.proxy.heads.get(key + end, 0), s3.proxy.gets.get(key + end, 0))
                                           for name, end in OBJECTS.items()}


def _per_two_shards(s3: S3Stack, tmp_path: Path, uri: str) -> dict[str, tuple[int, int]]:
    """(HEADs, GETs) per object that a 3-shard run makes more than a 1-shard run of the same
    windows: the requests of a process's 2nd and 3rd shards (the plan's cancel out)."""
    one, before = _requests(s3, tmp_path, uri, 100)
    three, after = _requests(s3, tmp_path, uri, 10)
    assert (one, three) == (1, 3)
    return {name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in OBJECTS}


def _upload_bgzip(s3: S3Stack, tmp_path: Path, key: str) -> str:
    fasta = write_fasta(tmp_path / "ref.fa.gz", CONTIGS, bgzip=True)
    for end in (".fai", ".gzi"):
        s3.upload(Path(f"{fasta}{end}"), f"{key}{end}")
    return s3.upload(fasta, key)


@pytest.mark.parametrize("client", CLIENTS)
def test_a_shard_opens_a_plain_reference_without_asking_what_the_plan_knew(s3: S3Stack, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          client: str) -> None:
    """Each shard took, before its first window, 3 HEADs and a GET of the FASTA, a HEAD of
    ``zarr.json`` (the form probed: 2 HEADs, a GET, and an existence HEAD), and 2 HEADs and a
    GET of the .fai (an existence HEAD, then the read). Now the form comes with the shard, the
    existence HEADs are gone (the read says what is missing) and a process keeps an index read
    at a known version (obstore's pinned ETag; fsspec's, the ETag of a HEAD before and after its
    read: it was unknown, and each shard read the .fai again, a HEAD and a GET) for its later
    shards of that version. Per shard left: the FASTA's identity HEAD (fsspec: and the one
    after, unpinned) and its one sequence GET; nothing of the .fai, zarr.json or the .gzi.
    Through obstore the identity HEAD is gone too: the shard's reads are pinned to the planned
    ETag and size (If-Match), so the planned identity is its start identity (a FASTA written over
    is refused by the read, see test_a_reference_written_over_mid_run_is_refused_not_mixed)."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    extra = _per_two_shards(s3, tmp_path, _upload_reference(s3, tmp_path, f"asks-{client}/ref.fa"))
    want = {"obstore": {"fasta": (0, 2), "fai": (0, 0), "gzi": (0, 0), "zarr.json": (0, 0)},
            "fsspec": {"fasta": (4, 2), "fai": (0, 0), "gzi": (0, 0), "zarr.json": (0, 0)}}[client]
    assert extra == want


def test_a_shard_opens_a_bgzip_reference_with_its_kept_indexes(s3: S3Stack, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A bgzip FASTA's shards through obstore: the .fai and .gzi (each an existence HEAD, a HEAD
    and a GET a shard before) are read by a process's first shard only, zarr.json is not asked,
    and the FASTA's own GETs are the one sequence read a shard (2 before: the probe's 4 bytes)."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    extra = _per_two_shards(s3, tmp_path, _upload_bgzip(s3, tmp_path, "asks-bgzip/ref.fa.gz"))
    assert {name: extra[name] for name in ("fai", "gzi", "zarr.json")} == dict.fromkeys(("fai", "gzi", "zarr.json"), (0, 0))
    assert extra["fasta"][1] == 2


@pytest.mark.parametrize("client", CLIENTS)
def test_a_runs_indexes_are_read_once_at_the_version_its_result_fields_asked(s3: S3Stack, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            client: str) -> None:
    """A 1-shard run over a bgzip FASTA asked each index 3 HEADs and 2 GETs through obstore (5 and 2
    through fsspec): the result fields' HEAD (its version), the plan's read (a HEAD, the GET;
    fsspec: a HEAD before and after) and the shard's, apart. Now the plan reads the version the
    result fields asked (obstore: pinned by If-Match; fsspec: checked by a HEAD after) and keeps
    what it read for the shards of this process: 1 HEAD and 1 GET each (fsspec: 2 and 1)."""
    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    shards, requests = _requests(s3, tmp_path, _upload_bgzip(s3, tmp_path, f"once-{client}/ref.fa.gz"), 100)
    want = {"obstore": (1, 1), "fsspec": (2, 1)}[client]
    assert shards == 1 and requests["fai"] == requests["gzi"] == want, requests


@pytest.mark.parametrize("first_read", [1 << 20, 4])
def test_a_worker_reads_a_remote_index_in_one_get_without_a_head(s3: S3Stack, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  first_read: int) -> None:
    """A worker (no run's versions asked in its process) read each index with a HEAD and a GET:
    obstore's GET carries the object's size and ETag, so one GET now says the version it read,
    the same the plan recorded. An index longer than the first read takes one GET more, pinned
    to the first's ETag."""
    from gpubatch.io import localized
    from gpubatch.sources.genome.indexes import (
        Versions,
        forget_indexes,
        index_version,
        read_gzi,
        read_index,
    )

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    monkeypatch.setattr(localized, "FIRST_READ_BYTES", first_read)
    uri = _upload_bgzip(s3, tmp_path, f"worker-index-{first_read}/ref.fa.gz")
    versions: Versions = {}
    want_gzi = read_gzi(uri, s3.options(), versions)
    planned = index_version({"fai": f"etag:{s3.fs().info(uri + '.fai')['ETag'].strip(chr(34))}", **versions})
    forget_indexes()
    s3.proxy.reset()
    index = read_index(uri, "bgzip", s3.options(), planned)
    assert index.version == planned and index.gzi == want_gzi and set(index.fai) == {"chrA", "chrB"}
    key = uri.removeprefix("s3://")
    gets = 1 if first_read > 1000 else 2
    assert {end: (s3.proxy.heads.get(key + end, 0), s3.proxy.gets.get(key + end, 0)) for end in (".fai", ".gzi")} \
        == {".fai": (0, gets), ".gzi": (0, gets)}, s3.proxy.log


def test_a_shard_planned_without_the_reference_facts_still_probes(s3: S3Stack, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard from a plan that carried neither the form nor the index version (an older
    gpubatch's, read again by --resume) opens the reference as before: it probes the form (the
    zarr.json HEAD again, each shard) and reads the index each shard (one GET: obstore's answer
    says its version, no HEAD beside it), and the run is as good."""
    from gpubatch.sources.genome import source

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    monkeypatch.setattr(source, "reference_facts", lambda contigs: {})
    extra = _per_two_shards(s3, tmp_path, _upload_reference(s3, tmp_path, "old-plan/ref.fa"))
    assert extra["zarr.json"] == (2, 0) and extra["fai"] == (0, 2)


@pytest.mark.parametrize("client", CLIENTS)
def test_a_remote_index_rewritten_after_the_plan_is_refused_though_indexes_are_kept(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    """The .fai on S3 is written over (lines reordered, every check passes) as each shard starts,
    after the plan read it, in worker processes that kept no index (forgotten as each shard
    starts: the plan's, kept in this process, is not a worker's). Each shard reads the new ETag
    and is refused, read again, then reported.
    Through fsspec, whose reads cannot be pinned, the index's version was unknown (None), so
    nothing compared it and the shards committed windows cut by the other index: its version is
    now the ETag a HEAD gives before and after the read (the two must agree). An inline shard
    runs in its run's context and reads the index at the version the run asked (no HEAD): the
    change is found by that read, and named as one since the run asked (it said "changed while
    it was read", naming no file)."""
    from test_input_versions import _reordered

    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.indexes import forget_indexes
    from gpubatch.sources.genome.source import GenomeSource

    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    uri = _upload_reference(s3, tmp_path, f"rewritten-{client}/ref.fa")
    reordered = _reordered(tmp_path / "ref.fa.fai")
    monkeypatch.setattr(GenomeSource, "before_shard",
                        lambda self, job, upcoming: (forget_indexes(),
                                                     s3.upload_bytes(reordered, f"rewritten-{client}/ref.fa.fai")),
                        raising=False)
    spec = genome_spec(tmp_path, uri, s3.options())
    spec["run"].update(retries=1)
    forget_indexes()
    got = run_job(JobSpec.model_validate(spec), profile="inline", show_progress=False)
    assert got.exit_code != 0 and got.report["shards_done"] == 0
    assert len(got.report["failed"]) == got.report["shards_total"] == 3
    for failed in got.report["failed"]:
        assert failed["attempts"] == 2 and f"{uri}.fai changed since" in failed["error"], failed
        assert "changed since the run was planned" in failed["error"] or "since this run asked" in failed["error"]


def test_a_missing_remote_index_says_which_and_how_to_make_it(s3: S3Stack, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the existence HEAD, the index read's own 404 says the .fai is missing: the same
    error as before, naming the file and `samtools faidx`; a missing FASTA says so too."""
    from gpubatch.core.errors import InputError
    from gpubatch.sources.genome.indexes import forget_indexes, read_index
    from gpubatch.sources.genome.reference import reference_format

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    uri = s3.upload(fasta, "no-index/ref.fa")
    forget_indexes()
    with pytest.raises(InputError, match=r"FASTA index .*no-index/ref\.fa\.fai not found; make it with `samtools faidx"):
        read_index(uri, "fasta", s3.options(), "fai etag:x")
    with pytest.raises(InputError, match=r"reference not found: check windows\.reference"):
        reference_format(uri + ".missing", s3.options())


def test_a_reference_written_over_after_the_plan_is_refused_by_its_shards(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The FASTA is written over between the plan and the workers' reads with another genome of
    the same contig lengths: the same .fai, every check passes, and the shards read other bases
    than those the run's earlier shards read (windows from two versions of one reference). Each
    windows shard carries the reference's identity as planned and is refused where the file is
    another version at its start: read again (run.retries), then reported, naming --overwrite."""
    from gpubatch.runtime.runner import run_job

    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    (tmp_path / "other").mkdir()
    other = write_fasta(tmp_path / "other" / "ref.fa", OTHER).read_bytes()
    assert Path(f"{fasta}.fai").read_bytes() == (tmp_path / "other" / "ref.fa.fai").read_bytes()
    spec = genome_spec(tmp_path, str(fasta))
    spec["run"].update(retries=1)
    _rewriting_before_shards(monkeypatch, fasta, other)
    got = run_job(JobSpec.model_validate(spec), profile="inline", show_progress=False)
    assert got.exit_code != 0 and got.report["shards_done"] == 0
    assert len(got.report["failed"]) == got.report["shards_total"] == 3
    for failed in got.report["failed"]:
        assert failed["input"] == str(fasta) and failed["attempts"] == 2, failed
        assert "changed since the run was planned" in failed["error"] and "--overwrite" in failed["error"], failed


def _variants_spec(tmp_path: Path, reference: str, storage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Twelve SNVs on chrA whose REF the planned reference holds, four to a shard."""
    vcf = tmp_path / "v.vcf"
    bases = CONTIGS["chrA"]
    records = [f"chrA\t{pos}\t.\t{bases[pos - 1]}\t{'T' if bases[pos - 1] != 'T' else 'G'}\t.\t.\t."
               for pos in range(200, 1400, 100)]
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=chrA,length=2000>\n"
                   "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n" + "".join(r + "\n" for r in records))
    spec = genome_spec(tmp_path, reference, storage, windows_per_shard=4)
    spec["windows"]["variants"] = str(vcf)
    spec["run"].update(retries=1)
    return spec


def test_a_reference_written_over_after_the_plan_is_refused_by_variant_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variants shard's input is its VCF, so the worker's checks of its input never looked at
    the FASTA its REF and windows come from: written over after the plan (the same .fai), the
    shards scored variants against other bases, and the run ended 0. Each shard now holds its
    reference reads to the plan's version (a local file: compared at its open) and is refused."""
    from gpubatch.runtime.runner import run_job

    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    (tmp_path / "other").mkdir()
    other = write_fasta(tmp_path / "other" / "ref.fa", OTHER).read_bytes()
    spec = _variants_spec(tmp_path, str(fasta))
    assert run_job(JobSpec.model_validate({**spec, "output": {"uri": str(tmp_path / "before")}}),
                   show_progress=False).exit_code == 0
    _rewriting_before_shards(monkeypatch, fasta, other)
    got = run_job(JobSpec.model_validate(spec), show_progress=False)
    assert got.exit_code != 0 and got.report["shards_done"] == 0
    assert len(got.report["failed"]) == got.report["shards_total"] == 3
    for failed in got.report["failed"]:
        assert "reference changed since the run was planned" in failed["error"] and failed["attempts"] == 2, failed


def test_a_remote_reference_written_over_is_refused_by_the_pinned_reads_of_variant_shards(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On object storage through obstore the variants shards' reads are pinned to the plan's ETag
    from their first request (If-Match, no HEAD more): the FASTA written over after the plan is
    refused by the reads themselves (412), every shard, and nothing is scored against it."""
    from gpubatch.runtime.runner import run_job

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    key = f"variants-{uuid.uuid4().hex[:8]}/ref.fa"
    uri = _upload_reference(s3, tmp_path, key)
    (tmp_path / "other").mkdir()
    other = write_fasta(tmp_path / "other" / "ref.fa", OTHER)
    spec = _variants_spec(tmp_path, uri, s3.options())
    uploading, uploaded = threading.Lock(), []

    def write_over(self: object, job: JobSpec, upcoming: object) -> None:
        with uploading:  # once, and every shard waits until it is done: a shard that read all of
            if not uploaded:  # the planned version before the upload landed is rightly committed
                s3.upload(other, key)
                uploaded.append(1)

    from gpubatch.sources.genome.source import GenomeSource

    monkeypatch.setattr(GenomeSource, "before_shard", write_over, raising=False)
    got = run_job(JobSpec.model_validate(spec), show_progress=False)
    assert got.exit_code != 0 and got.report["shards_done"] == 0
    for failed in got.report["failed"]:
        assert "412 Precondition Failed" in failed["error"], failed


def test_a_genome_zarr_ingested_again_after_the_plan_is_refused_by_its_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A genome zarr (gpubatch ingest) is a folder: its own identity says nothing, so a genome
    ingested over it after the plan was read by the shards unseen. Each shard now holds the
    zarr's ``zarr.json`` to the plan's version and is refused where it is another."""
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.ingest import ingest_genome
    from gpubatch.sources.genome.source import GenomeSource

    zarr_uri = str(tmp_path / "ref.zarr")
    ingest_genome(str(write_fasta(tmp_path / "ref.fa", CONTIGS)), zarr_uri)
    (tmp_path / "other").mkdir()
    other = str(write_fasta(tmp_path / "other" / "ref.fa", OTHER))
    spec = genome_spec(tmp_path, zarr_uri)
    spec["run"].update(retries=1)
    assert run_job(JobSpec.model_validate({**spec, "output": {"uri": str(tmp_path / "before")}}),
                   show_progress=False).exit_code == 0

    ingesting, ingested = threading.Lock(), []

    def ingest_again(self: GenomeSource, job: JobSpec, upcoming: object) -> None:
        with ingesting:  # once, and every shard waits until it is done
            if not ingested:
                ingest_genome(other, zarr_uri, overwrite=True)
                ingested.append(zarr_uri)

    monkeypatch.setattr(GenomeSource, "before_shard", ingest_again, raising=False)
    got = run_job(JobSpec.model_validate(spec), show_progress=False)
    assert got.exit_code != 0 and got.report["shards_done"] == 0
    assert len(got.report["failed"]) == got.report["shards_total"] == 3
    for failed in got.report["failed"]:
        assert "reference changed since the run was planned" in failed["error"], failed


def test_a_shard_naming_a_reference_form_this_gpubatch_does_not_read_is_refused(tmp_path: Path) -> None:
    """A shard carries the reference's form as its plan found it; one this gpubatch does not read
    (a plan made by another version) is an error naming the form and the fix, not a probe's
    guess or a decoder's traceback."""
    from gpubatch.core.errors import InputError
    from gpubatch.sources.genome.opening import open_reference

    fasta = write_fasta(tmp_path / "ref.fa", CONTIGS)
    with pytest.raises(InputError) as caught:
        open_reference(str(fasta), fmt="cram")
    assert "'cram'" in caught.value.message and "--overwrite" in caught.value.message
    assert open_reference(str(fasta), fmt="fasta").contigs.names == tuple(CONTIGS)


def test_a_reference_written_over_while_it_is_planned_is_refused_at_the_plan(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FASTA is written over (its bases laid out 50 to a line: another .fai) after the plan
    checked the .fai against it and before the plan recorded its identity (a HEAD). The shards
    held their reads to that identity, the new FASTA, and their index to the planned one, the
    old .fai: each read the new file by the old offsets. The plan now refuses, naming both ETags."""
    from gpubatch.core.errors import SpecError
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.source import GenomeSource

    monkeypatch.setenv("GPUBATCH_RANGE_READER", "obstore")
    key = f"planned-{uuid.uuid4().hex[:8]}/ref.fa"
    uri = _upload_reference(s3, tmp_path, key)
    (tmp_path / "narrow").mkdir()
    narrow = write_fasta(tmp_path / "narrow" / "ref.fa", CONTIGS, width=50)
    checked = GenomeSource.contig_table

    def then_written_over(reference: str, storage: dict[str, Any]) -> object:
        table = checked(reference, storage)
        s3.upload(narrow, key)
        return table

    monkeypatch.setattr(GenomeSource, "contig_table", staticmethod(then_written_over))
    with pytest.raises(SpecError, match="changed while the run was planned: its index was checked against ETag"):
        run_job(JobSpec.model_validate(genome_spec(tmp_path, uri, s3.options())), profile="inline",
                show_progress=False)


@pytest.mark.parametrize("client", CLIENTS)
def test_the_storage_summary_counts_the_heads_of_a_reference_and_its_indexes(
        s3: S3Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str) -> None:
    """A bgzip reference's HEADs (the plan's and the shards': the FASTA's identity, a reader's
    size, an index read between two HEADs through fsspec) are the report's ``heads``, as many as
    the server answered for the three objects, and the HEAD of an object that is not there (a
    genome zarr's zarr.json, looked for first): answered (404) and billed, it is counted too.
    The job validated first in the same process (a notebook's way): those HEADs are not the run's."""
    from gpubatch.runtime.preflight import validate_job
    from gpubatch.runtime.runner import run_job
    from gpubatch.sources.genome.indexes import forget_indexes

    monkeypatch.setenv("GPUBATCH_RANGE_READER", client)
    uri = _upload_bgzip(s3, tmp_path, f"heads-{client}/ref.fa.gz")
    job = JobSpec.model_validate(genome_spec(tmp_path, uri, s3.options()))
    validate_job(job, profile_name="inline")
    forget_indexes()
    s3.proxy.reset()
    result = run_job(job, profile="inline", show_progress=False)
    assert result.exit_code == 0, result.report["failed"]
    key = uri.removeprefix("s3://")
    answered = sum(s3.proxy.heads.get(key + end, 0) for end in ("", ".fai", ".gzi"))
    assert s3.proxy.heads.get(key + "/zarr.json") == 1  # 404: no genome zarr there
    assert result.report["storage"]["heads"] == answered + 1 > 4, s3.proxy.heads
