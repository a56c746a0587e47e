"""`gpubatch inspect PATH_OR_URL` given what a bioinformatician has at hand: a URL with credentials,
a genome store on object storage or half written, a FASTA, a VCF, and files that are none of these."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import shared_file
from http_servers import FileServer
from test_ingest import write_fasta

from gpubatch.cli.main import main
from gpubatch.sources.genome.ingest import ingest_genome

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]
SECRET = "s3cr3t-pw-77"


def inspect_cli(target: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpubatch", "inspect", target], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def png_bytes() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (8).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" + bytes(24) * 8)) + chunk(b"IEND", b""))


def test_a_url_with_credentials_is_redacted_in_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The answer's ``slide`` quoted the URL as given, password and all."""
    slide = shared_file("slides", "CMU-1-Small-Region.svs").read_bytes()
    server = FileServer({"/wsi/s.svs": slide, "/wsi/x.png": png_bytes()}, etag='"v1"')
    try:
        host = server.url.removeprefix("http://")
        assert main(["inspect", f"http://alice:{SECRET}@{host}/wsi/s.svs"]) == 0
        said = capsys.readouterr()
        info = json.loads(said.out)
        assert info["slide"] == f"http://***@{host}/wsi/s.svs" and info["width"] == 2220
        assert SECRET not in said.out + said.err
        for missing in ("x.png", "gone.svs"):  # the failures' lines too
            assert main(["inspect", f"http://alice:{SECRET}@{host}/wsi/{missing}"]) == 1
            said = capsys.readouterr()
            assert SECRET not in said.out + said.err and f"http://***@{host}/wsi/{missing}" in said.err
    finally:
        server.close()


def test_a_genome_store_on_object_storage_is_described(s3: S3Stack, tmp_path: Path) -> None:
    """It was opened as a slide: "zarr group holds no OME-NGFF 'multiscales' metadata", exit 1."""
    out = f"s3://{s3.bucket}/genomes-{uuid.uuid4().hex[:6]}/g.zarr"
    ingest_genome(str(write_fasta(tmp_path / "g.fa", seed=1)), out, s3.options(via_proxy=False))
    env = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.key,
           "AWS_SECRET_ACCESS_KEY": s3.secret, "AWS_DEFAULT_REGION": "us-east-1"}
    done = inspect_cli(out, env)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["genome_store"] == out
    assert info["gpubatch_genome"]["contigs"] == 3 and list(info["gpubatch_genome"]["lengths"]) == ["chr0", "chr1", "chr2"]
    assert info["gpubatch_genome"]["source"] == str(tmp_path / "g.fa")
    assert s3.secret not in done.stdout + done.stderr


def test_a_draft_assemblys_ingest_and_inspect_print_a_screenful(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`ingest` and `inspect` printed every contig's name, length and packed offset, one per
    line: a 500,000-scaffold assembly printed about two million lines. They give counts and the
    first contigs now, saying so."""
    fasta = write_fasta(tmp_path / "draft.fa", seed=3, contigs=45, length=300)
    out = tmp_path / "draft.zarr"
    assert main(["ingest", "genome", str(fasta), str(out)]) == 0
    for said in (capsys.readouterr().out, (main(["inspect", str(out)]), capsys.readouterr().out)[1]):
        info = json.loads(said)
        told = info.get("gpubatch_genome", info)
        assert told["contigs"] == 45 and told["bases"] == 45 * 300, told
        assert list(told["lengths"]) == [f"chr{i}" for i in range(20)]
        assert told["lengths_shown"] == "the first 20 of 45 contigs"
        assert len(said.splitlines()) < 80, said
    assert told["layout"]["packed_contigs"] == 45 and told["layout"]["own_arrays"] == 0


def test_a_half_written_genome_store_is_not_shown_as_a_genome(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """What an ingest on object storage leaves when killed (zarr.json, some contigs, no genome
    attribute) was shown as a genome store with no contigs, exit 0."""
    import zarr

    group = zarr.open_group(str(tmp_path / "half.zarr"), mode="w")
    group.create_array("chr0", shape=(10,), dtype="uint8")
    assert main(["inspect", str(tmp_path / "half.zarr")]) == 1
    err = capsys.readouterr().err
    assert "neither an OME-Zarr image nor a complete genome store" in err
    assert "did not finish, or is still writing; runs refuse it" in err


def test_a_fasta_is_described_as_a_job_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A FASTA was "not a slide format openslide or tifffile can read"."""
    pysam = pytest.importorskip("pysam")
    fasta = write_fasta(tmp_path / "g.fa", seed=1, contigs=2, length=700)
    assert main(["inspect", str(fasta)]) == 1
    assert "FASTA index" in capsys.readouterr().err  # and how to make one, or ingest it
    pysam.faidx(str(fasta))
    assert main(["inspect", str(fasta)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["fasta"], info["format"], info["contigs"], info["bases"]) == (str(fasta), "fasta", 2, 1400)
    assert info["lengths"] == {"chr0": 700, "chr1": 700}
    plain_gzip = tmp_path / "g.fa.gz"
    plain_gzip.write_bytes(gzip.compress(fasta.read_bytes()))
    assert main(["inspect", str(plain_gzip)]) == 1
    assert "gzip but not bgzip" in capsys.readouterr().err


@pytest.mark.parametrize("packed", [False, True])
def test_a_vcf_is_named_as_one(tmp_path: Path, packed: bool, capsys: pytest.CaptureFixture[str]) -> None:
    text = "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\nchr1\t5\t.\tA\tG\t.\t.\t.\n"
    vcf = tmp_path / ("v.vcf.gz" if packed else "v.vcf")
    vcf.write_bytes(gzip.compress(text.encode()) if packed else text.encode())
    assert main(["inspect", str(vcf)]) == 1
    assert "a VCF, which `inspect` does not describe" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "said"), [("v.bcf", "a BCF"), ("v.tsv", "a table of variants"),
                                            ("body.vcf", "a VCF body without its header")])
def test_a_bcf_a_variant_table_and_a_vcf_body_are_named(tmp_path: Path, name: str, said: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """These were 'not a slide format openslide or tifffile can read': a job reads each as
    windows.variants, and inspect says so, as it does for a VCF."""
    import pysam

    text = "##fileformat=VCFv4.2\n##contig=<ID=chr1>\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\nchr1\t5\t.\tA\tG\t.\t.\t.\n"
    path = tmp_path / name
    if name == "v.bcf":
        (tmp_path / "v.vcf").write_text(text)
        with pysam.VariantFile(str(tmp_path / "v.vcf")) as src, pysam.VariantFile(str(path), "wb", header=src.header) as dst:
            for rec in src:
                dst.write(rec)
    else:
        path.write_text("chrom\tpos\tref\talt\nchr1\t5\tA\tG\n" if name == "v.tsv" else text.splitlines()[-1] + "\n")
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{said}, which `inspect` does not describe" in err and "windows.variants" in err, err


@pytest.mark.parametrize(("what", "said"), [("png", "not a slide format"), ("text", "not a slide format"),
                                            ("empty", "empty (zero-byte) file"), ("folder", "is a directory"),
                                            ("missing", "file not found")])
def test_what_is_none_of_these_is_one_clear_line(tmp_path: Path, what: str, said: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 1 (the one input failed; the contract's 2 is a spec or usage refusal), no traceback."""
    path = tmp_path / {"png": "x.png", "text": "notes.txt", "empty": "e.svs", "folder": "d", "missing": "m.svs"}[what]
    if what == "png":
        path.write_bytes(png_bytes())
    elif what == "text":
        path.write_text("hello\n")
    elif what == "empty":
        path.write_bytes(b"")
    elif what == "folder":
        path.mkdir()
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert said in err and str(path) in err and "Traceback" not in err, err


def test_a_slide_with_no_mpp_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((512, 512, 3), np.uint8), tile=(256, 256))
    assert main(["inspect", str(tmp_path / "plain.tif")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] is None and info["width"] == 512


def test_ingest_and_inspect_take_storage_options_on_the_command_line(s3: S3Stack, tmp_path: Path) -> None:
    """`status` and `report` took --storage KEY=VALUE; `ingest` and `inspect` did not (argparse
    refused it, exit 2), so a FASTA in a bucket the AWS_* environment cannot describe (another
    endpoint, anon=true for a public bucket) could not be ingested from the command line."""
    fasta = s3.upload(write_fasta(tmp_path / "g.fa", seed=1), f"refs-{uuid.uuid4().hex[:6]}/g.fa")
    out = fasta.removesuffix("g.fa") + "g.zarr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    storage = ["--storage", f"endpoint_url={s3.endpoint}", "--storage", f"key={s3.key}",
               "--storage", f"secret={s3.secret}"]
    done = subprocess.run([sys.executable, "-m", "gpubatch", "ingest", "genome", fasta, out, *storage],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "gpubatch", "inspect", out, *storage],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gpubatch_genome"]["source"] == fasta
    assert s3.secret not in done.stdout + done.stderr


@pytest.mark.parametrize("command", [["inspect", "x.svs"], ["ingest", "genome", "g.fa", "g.zarr"]])
def test_a_storage_option_without_a_value_is_named_as_one(command: list[str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`--storage anon` (no value) was refused as "--set: expected key.path=value": an option the
    user never gave. The refusal names --storage, before anything is read (exit 2)."""
    assert main([*command, "--storage", "anon"]) == 2
    err = capsys.readouterr().err
    assert "--storage: expected key.path=value, got 'anon'" in err and "--set" not in err, err
