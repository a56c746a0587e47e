"""Absurd and hostile spec values: `validate` refuses, as `run` does, whatever would exhaust a
worker, hang or fail later, naming the key, the value, the range and the fix (exit 2); what
YAML reads otherwise than the user wrote (a key given twice, 1e5, "64", 16GB, a tab) is said."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import slide_job, windows_job, write_job

from gpubatch.cli.main import main
from gpubatch.core.errors import EXIT_USAGE

DOCS = Path(__file__).resolve().parents[1] / "docs" / "spec.md"


@pytest.fixture()
def spec(tmp_path: Path, slide_path: Path, classifier: Path) -> Path:
    return write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], classifier, tmp_path / "out"))


def _refused(capsys: pytest.CaptureFixture[str], command: str, spec: Path, *sets: str) -> str:
    """What `gpubatch COMMAND SPEC --set ...` said as it refused the spec with exit 2."""
    capsys.readouterr()
    args = [a for s in sets for a in ("--set", s)]
    assert main([command, str(spec), *args]) == EXIT_USAGE
    return capsys.readouterr().err


def test_a_lease_that_goes_stale_between_heartbeats_is_refused_by_validate_and_run(
        spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run.lease_stale_s 1 under the default 10 s heartbeat validated: a second run into the
    output took the live run's lease over 1 s after its beat, and the first stopped (exit 1)
    asking whether it had been suspended."""
    for command in ("validate", "run"):
        err = _refused(capsys, command, spec, "run.lease_stale_s=1")
        assert ("run.lease_stale_s: 1 s is under 3 x run.heartbeat_s (10 s)" in err
                and "raise run.lease_stale_s to 30 or more, or lower run.heartbeat_s" in err), err
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(spec), "--set", "run.lease_stale_s=30"]) == 0
    assert "run.lease_stale_s: 1200 s is under 3 x run.heartbeat_s (600 s)" in _refused(
        capsys, "validate", spec, "run.heartbeat_s=600", "run.lease_stale_s=1200")


@pytest.mark.parametrize(("key", "floor", "why"), [
    ("run.shard_timeout", "5", "so every shard would time out and its worker be restarted"),
    ("run.heartbeat_s", "0.1", "each heartbeat rewrites the lease and status.json in the output"),
    ("run.worker_timeout", "2", "the run would fail within a second of finding no worker there"),
    ("run.queue_timeout", "10", "the wait for a busy queue would end before squeue was asked again"),
    ("run.storage_max_wait_s", "0.1", "a server that asked for fewer requests would get its retries back to back"),
    ("run.lease_stale_s", "0.3", "a live run's own lease would look stale between its beats"),
])
def test_a_timeout_or_heartbeat_too_short_to_mean_anything_is_refused_by_validate_and_run(
        spec: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, floor: str, why: str) -> None:
    """run.shard_timeout 0.001 validated, and every shard timed out (its worker restarted each
    time) until all were quarantined; run.heartbeat_s 0.001 (with run.lease_stale_s 0.01) made
    the heartbeat rewrite the lease and status.json back to back for the whole run;
    run.worker_timeout 0.001 failed a run a second after it found no worker there, and
    run.queue_timeout 0.001 before squeue was asked about its pending jobs again; the floor is
    docs/spec.md's too."""
    # the lease's floor is met at the shortest heartbeat; the other keys keep a lease they meet
    rest = ["run.heartbeat_s=0.1"] if key == "run.lease_stale_s" else ["run.lease_stale_s=120"]
    for command in ("validate", "run"):
        err = _refused(capsys, command, spec, f"{key}=0.001", *rest)
        assert (f"{key}: 0.001 s is under the {floor} s floor: " in err and why in err
                and f"set {key} to {floor} or more (default " in err), err
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(spec), "--set", f"{key}={floor}", *(a for r in rest for a in ("--set", r))]) == 0
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith(f"| `{key}` |"))
    assert f">= {floor}" in row.split("|")[2] or f"{floor}-" in row.split("|")[2], row


def test_a_lease_of_exactly_three_heartbeats_is_valid(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run.lease_stale_s 0.3 with run.heartbeat_s 0.1 was refused as "under 3 x run.heartbeat_s
    (0.1 s): raise run.lease_stale_s to 0.3 or more" (3 x 0.1 is 0.30000000000000004)."""
    for beat, stale in (("0.1", "0.3"), ("0.2", "0.6"), ("1.1", "3.3")):
        assert main(["validate", str(spec), "--set", f"run.heartbeat_s={beat}", "--set",
                     f"run.lease_stale_s={stale}"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(("given", "said"), [
    ("model.threads=100000", "model.threads: Input should be less than or equal to 1024, got 100000"),
    ("run.workers=1000000000000000000000000000000", "run.workers: Input should be less than or equal to 10000"),
    ("model.batch_size=0", "model.batch_size: must be between 1 and 65536, or 'auto', got 0"),
])
def test_counts_past_any_machine_are_refused_naming_the_range(
        spec: Path, capsys: pytest.CaptureFixture[str], given: str, said: str) -> None:
    """`model.threads: 100000` validated, and the run's ONNX Runtime session started tens of
    thousands of threads (17 GB resident) and never ran a batch; a 31-digit run.workers (with
    force_workers) failed in the cluster's start with a traceback (exit 1)."""
    assert said in _refused(capsys, "validate", spec, given, "run.force_workers=true")


def test_a_stride_past_int64_is_a_spec_error_not_a_traceback(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    job = windows_job(tmp_path, 4)
    err = _refused(capsys, "validate", job, "windows.stride=1000000000000000000000000000000")
    assert "windows.stride: Input should be less than or equal to 1099511627776" in err and "Traceback" not in err


def test_a_stride_longer_than_the_window_says_what_goes_unscored(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """stride 100000 over 32-base windows scored 0.03% of the genome, without a word."""
    job = windows_job(tmp_path, 4)  # one contig of 128 bases, 32-base windows
    assert main(["validate", str(job), "--set", "windows.stride=40"]) == 0
    out = capsys.readouterr().out
    assert ("windows.stride 40 is longer than windows.length 32: 24 of the regions' 128 bases (18.8%) lie "
            "between windows and are not scored; set windows.stride to 32 or less") in out
    assert main(["validate", str(job), "--set", "windows.stride=32"]) == 0
    assert "not scored" not in capsys.readouterr().out


def test_read_units_in_flight_count_against_a_worker_s_memory(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Only the batches were counted: 9 read units of up to 64 MiB (tiles.overlap 0.95) in each
    of two pipelines validated under a 32 MiB run.max_worker_memory, and the run's peak memory
    rose by 7 x 64 MiB over readers: 1."""
    sets = ("tiles.overlap=0.95", "tiles.max_read_bytes=67108864", "run.max_worker_memory=33554432")
    for command in ("validate", "run"):
        err = _refused(capsys, command, spec, *sets, "run.readers=8")
        assert ("run.readers: 9 read units in flight (run.readers 8, and one more) of up to 64.00 MiB each "
                "(set by tiles.read_block, tiles.overlap and tiles.max_read_bytes); a worker holds about 1.13 GiB"
                in err and "over its 32.00 MiB (run.max_worker_memory); lower run.readers, tiles.read_block, "
                "tiles.overlap or tiles.max_read_bytes" in err), err
    assert main(["validate", str(spec), "--set", "tiles.overlap=0.95", "--set", "tiles.max_read_bytes=1048576",
                 "--set", "run.max_worker_memory=33554432"]) == 0


def test_a_profile_s_memory_limit_is_a_worker_s_budget(spec: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The nanny kills a worker past its profile's memory_limit; the check counted the machine's
    memory over the workers instead, and passed batches no worker could hold."""
    profile = tmp_path / "small.yaml"
    profile.write_text("cluster: local\nworkers: 1\nthreads_per_worker: 1\nmemory_limit: 64MiB\n")
    err = _refused(capsys, "validate", spec, f"run.profile={profile}", "model.batch_size=4096")
    assert "model.batch_size: 4096 items make a 192.00 MiB model input" in err
    assert "over its 64.00 MiB (the profile's memory_limit)" in err


def test_a_reduced_precision_s_sample_must_fit_the_client(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, "validate", spec, "model.precision=int8", "model.calibration.items=100000000")
    assert ("model.calibration.items: 100000000 calibration and 256 validation items hold about" in err
            and "lower model.calibration.items" in err), err


def test_a_key_given_twice_is_refused_naming_both_lines(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PyYAML kept the second silently: a second `tiles:` replaced the first whole (the tissue
    method back to otsu) and `validate` said valid."""
    text = spec.read_text()
    spec.write_text(text + "tiles:\n  size: 32\n")
    first = 1 + text.splitlines().index("tiles:")
    err = _refused(capsys, "validate", spec)
    assert f"key 'tiles' given twice, on lines {first} and {len(text.splitlines()) + 1}" in err, err
    spec.write_text(text.replace("  batch_size: 16\n", "  batch_size: 16\n  batch_size: 4096\n"))
    assert "key 'batch_size' given twice" in _refused(capsys, "run", spec)


def test_a_merge_may_still_override_the_keys_it_brings() -> None:
    from gpubatch.core.yaml_text import load_yaml_text

    assert load_yaml_text("a: &s {x: 1, y: 2}\nb:\n  <<: *s\n  x: 3\n") == {"a": {"x": 1, "y": 2},
                                                                        "b": {"x": 3, "y": 2}}


def test_a_tab_indent_names_the_file_and_the_fix(spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec.write_text(spec.read_text().replace("  size: 64", "\tsize: 64"))
    err = _refused(capsys, "validate", spec)
    assert f'in "{spec}", line' in err and "YAML indents with spaces, never tabs" in err, err


@pytest.mark.parametrize(("given", "said"), [
    ("run.shard_timeout=1e5", "run.shard_timeout: Input should be a valid number, got '1e5' (YAML reads 1e5 as "
                              "text: an exponent needs a dot and a sign, so write 100000)"),
    ('model.batch_size="64"', "got '64' (a quoted number is text: write 64 without quotes)"),
    ("run.max_worker_memory=16GB", "run.max_worker_memory: Input should be a valid integer, got '16GB' "
                                   "(give a plain number of bytes, no unit: write 16000000000)"),
    ("input.read_ahead_mb=64MB", "give a plain number of MiB, no unit: write 64"),
    ("run.readers=null", "run.readers: Input should be a valid integer, got null (the key has no value): give one, "
                         "or leave the key out for its default"),
    ("model=", "model: should be a section of keys (path, backend, precision, batch_size,"),
])
def test_text_where_a_number_belongs_says_what_to_write(spec: Path, capsys: pytest.CaptureFixture[str],
                                                        given: str, said: str) -> None:
    assert said in _refused(capsys, "validate", spec, given)


def test_a_section_with_every_key_commented_out_takes_its_defaults(
        spec: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = spec.read_text()
    run = text[text.index("run:\n"):]
    spec.write_text(text.replace(run, "run:\n" + "".join(f"#{line}\n" for line in run.splitlines()[1:])))
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
