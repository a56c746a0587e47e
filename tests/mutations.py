"""Mutation run: plant each named bug in a copy of the package and check a test catches it.

``python tests/mutations.py`` copies ``gpubatch/``, ``tests/``, ``configs/``, ``kernels/`` and
``pyproject.toml`` into a temporary folder (the real tree is never written), checks that the tests
named below pass there unchanged, then plants one bug at a time: each mutation is a textual
replacement that must match its file exactly once (an anchor that no longer matches fails the
run loudly, so the mutations move with the code), runs only the tests that should catch it
(``pytest -x`` with PYTHONPATH on the copy) and puts the file back. It prints one line per
mutation (name, caught or SURVIVED, by which test, seconds) and ``caught N of M`` last, and exits
0 only when every mutation is caught.

Options: ``-k TEXT`` runs the mutations whose name contains TEXT; ``--list`` prints them;
``--no-baseline`` skips the unmutated check (quicker, when iterating on one mutation); ``--why``
adds the catching test's first error line (to see that it fails for the planted reason).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("gpubatch", "tests", "configs", "kernels", "pyproject.toml")
TIMEOUT_S = 300


@dataclass(frozen=True)
class Mutation:
    """One planted bug: ``(file, old, new)`` edits (each ``old`` found exactly once) and the
    test ids that must fail with it."""

    name: str
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]


def _m(name: str, file: str, old: str, new: str, *tests: str) -> Mutation:
    return Mutation(name, ((file, old, new),), tests)


def _leak(name: str, image: str, fmt: str, dest: str) -> Mutation:
    """Slides' write_outputs also writes each slide's ``image`` (label, macro) as ``fmt`` to ``dest``."""
    anchor = "        write_heatmaps(store, places, job.output.heatmap, progress)\n"
    leak = ("        import io as _io\n\n        import openslide as _os\n\n"
            "        for _uri in places:\n"
            "            _buf = _io.BytesIO()\n"
            f"            _os.OpenSlide(_uri).associated_images[{image!r}].convert('RGB').save(_buf, {fmt!r})\n"
            f"            store.write_bytes({dest!r}, _buf.getvalue())\n")
    return _m(name, "gpubatch/sources/slides/source.py", anchor, leak + anchor, "tests/test_privacy.py")


QUANT = "gpubatch/models/prepare/quantize.py"
MUTATIONS: tuple[Mutation, ...] = (
    _m("workers run fp32 while reporting int8", "gpubatch/runtime/runner.py",
       "model_path, model_storage = self._model_for_workers(prepared.path, local_job.model.path)",
       "model_path, model_storage = self._model_for_workers(local_job.model.path, local_job.model.path)",
       "tests/test_quantize.py::test_int8_end_to_end_run"),
    _m("worker loads the fp32 fallback as its model", "gpubatch/engine/worker.py",
       "model = get_model(localize(ctx.model_path, ctx.model_storage, ctx.model_version), ctx.backend, ctx.precision, threads)",
       "model = get_model(ctx.fallback_model_path or ctx.model_path, ctx.backend, ctx.precision, threads)",
       "tests/test_quantize.py::test_confidence_fallback_through_a_run"),
    _m("quantizer per tensor", QUANT, 'per_channel=opts["per_channel"],', "per_channel=False,",
       "tests/test_quantize.py::test_quantized_file_has_per_channel_weights_and_uint8_activations"),
    _m("quantizer signed activations", QUANT,
       'activation_type=getattr(QuantType, opts["activation_type"]),', "activation_type=QuantType.QInt8,",
       "tests/test_quantize.py::test_quantized_file_has_per_channel_weights_and_uint8_activations"),
    _m("validation gate always passes", "gpubatch/models/prepare/validate.py",
       'return GateResult(figures["agreement"] >= min_agreement, figures)', "return GateResult(True, figures)",
       "tests/test_quantize.py::test_fragile_model_is_refused_with_figures"),
    _m("confidence fallback never re-runs", "gpubatch/engine/model_stage.py",
       "low = np.flatnonzero(top < threshold)", "low = np.flatnonzero(top < 0.0)",
       "tests/test_quantize.py::test_confidence_fallback_reruns_unsure_items"),
    _m("resume recomputes every shard", "gpubatch/runtime/resume.py",
       "                    kept.add(CommitRef.of(e))",
       "                    pass",
       "tests/test_resume_exact.py::test_resume_recomputes_only_uncommitted_shards"),
    _m("manifest checksum skipped", "gpubatch/outputs/manifest.py",
       "if data is None or hashlib.sha256(data).hexdigest() != entry.sha256:", "if data is None:",
       "tests/test_resume_exact.py::test_corrupt_committed_part_is_detected_and_recomputed"),
    _m("gpubatch's own shard retries are 0", "gpubatch/runtime/submit.py",
       "result.attempt <= self.job.run.retries", "result.attempt <= 0",
       "tests/test_resume_exact.py::test_retryable_failure_succeeds_on_the_second_attempt",
       "tests/test_resume_exact.py::test_a_failure_on_every_attempt_is_quarantined_after_the_last_retry"),
    _m("a bad input is retried", "gpubatch/engine/worker.py",
       "retryable=bool(getattr(exc, \"retryable\", False)) or not bad_input)", "retryable=True)",
       "tests/test_resilience.py::test_truncated_slide_is_quarantined_at_once_not_retried"),
    _m("storage retries off", "gpubatch/io/retry.py",
       "if not is_transient(exc) or attempt + 1 >= policy.attempts:", "if True:",
       "tests/test_storage.py::test_faults_are_retried_and_reads_identical"),
    _m("redact stops scrubbing registered values", "gpubatch/io/redact.py",
       "for secret in sorted(known, key=len, reverse=True):",
       "for secret in sorted(known, key=len, reverse=True)[:0]:",
       "tests/test_redaction.py"),
    _m("storage options stop registering secrets", "gpubatch/io/redact.py",
       "            if str(k).lower() in SENSITIVE_KEYS and isinstance(v, str):\n                _remember(v)",
       "            if str(k).lower() in SENSITIVE_KEYS and isinstance(v, str):\n                pass",
       "tests/test_redaction.py"),
    _leak("label image copied to the output", "label", "PNG", "thumbnail.png"),
    _leak("macro image hidden as a parquet part", "macro", "JPEG", "_parts/zz-overview.parquet"),
    _leak("label image saved as a heatmap", "label", "PNG", "heatmaps/zz-label.png"),
    _m("obstore reads stop sending If-Match", "gpubatch/io/obstore.py",
       'options["if_match"] = f\'"{self._etag}"\'', "pass",
       "tests/test_written_over_remote.py::test_obstore_refuses_the_read_itself_with_if_match"),
    _m("an object written over mid-shard is not checked after it", "gpubatch/io/storage.py",
       "    if before.get(\"etag\") is None and before.get(\"mtime\") is None:", "    if True:",
       "tests/test_written_over_remote.py::test_a_remote_slide_written_over_while_read_is_read_again_not_mixed"),
    _m("a replaced input is kept on resume", "gpubatch/runtime/resume.py",
       "return [e for e in entries if e.input_identity and now[e.input] != e.input_identity]", "return []",
       "tests/test_runs_cannot_mix.py::test_an_input_replaced_between_runs_is_recomputed"),
    _m("stray attempts never swept", "gpubatch/outputs/manifest.py",
       'if (name.endswith(".parquet") or name.startswith(TMP_PREFIX)) and not kept.has_part(name):',
       'if name.startswith(TMP_PREFIX) and not kept.has_part(name):',
       "tests/test_runs_cannot_mix.py::test_a_finished_output_holds_no_temporaries_or_stray_attempts"),
    _m("one-hot code swap A<->C", "gpubatch/ops/kernels.py",
       'for _base, _code in (("A", 0), ("C", 1), ("G", 2), ("T", 3)):',
       'for _base, _code in (("A", 1), ("C", 0), ("G", 2), ("T", 3)):',
       "tests/test_genome.py::test_genome_tiling_and_padding"),
    _m("reverse complement pairs A-G", "gpubatch/ops/kernels.py",
       "COMPLEMENT_CODES = np.array([3, 2, 1, 0, 4], dtype=np.uint8)",
       "COMPLEMENT_CODES = np.array([2, 3, 0, 1, 4], dtype=np.uint8)",
       "tests/test_genome.py::test_minus_strand_is_reverse_complement"),
    _m("reverse complement forgets to reverse", "gpubatch/ops/kernels.py",
       "return COMPLEMENT_CODES[codes[..., ::-1]]", "return COMPLEMENT_CODES[codes]",
       "tests/test_genome.py::test_minus_strand_is_reverse_complement"),
    _m("packed contig read from the packed array's start", "gpubatch/sources/genome/zarr_reference.py",
       "self._codes(key, offset + start, offset + end)", "self._codes(key, start, end)",
       "tests/test_genome_layout.py::test_packed_contigs_read_the_bases_of_the_fasta"),
    _m("a long read keeps its first chunk's codes as its last chunk", "gpubatch/sources/genome/kept.py",
       "cache.put(key, index, span[(index - first) * chunk : (index - first + 1) * chunk])",
       "cache.put(key, index, span[:chunk])",
       "tests/test_genome_layout.py::test_packed_contigs_read_the_bases_of_the_fasta"),
    _m("layout version 1 read as version 2", "gpubatch/sources/genome/reference.py",
       'if meta.get("version", 1) == 1:', "if False:",
       "tests/test_genome_layout.py::test_the_version_1_layout_is_still_read"),
    _m("REF check always true", "gpubatch/sources/genome/variants.py",
       "ref_match = bool(np.array_equal(observed, encode_dna(ref)))", "ref_match = True",
       "tests/test_genome.py::test_variant_pairs_indels_and_ref_mismatch"),
    _m("prefetch queue unbounded", "gpubatch/engine/pipeline.py",
       "ready: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches)", "ready: queue.Queue = queue.Queue()",
       "tests/test_engine.py::test_look_ahead_is_bounded_by_configuration"),
    _m("starvation formula inverted", "gpubatch/core/clocks.py",
       "return starved / total if total > 0 else 0.0", "return busy / total if total > 0 else 0.0",
       "tests/test_engine.py::test_slow_reader_means_high_starvation"),
    _m("short last batch not trimmed", "gpubatch/engine/pipeline.py",
       "outputs = {name: values[:real] for name, values in outputs.items()}",
       "outputs = {name: values for name, values in outputs.items()}",
       "tests/test_engine.py::test_short_last_batch_is_padded_for_the_model_and_trimmed_after"),
    _m("tiles normalised without the mean", "gpubatch/ops/kernels.py",
       "        out += offset.reshape(1, -1, 1, 1)\n", "",
       "tests/test_kernels.py"),
    _m("a failed upload is published", "gpubatch/outputs/store.py",
       "                    _discard(raw)\n                    raise\n",
       "                    raw.close()\n                    raise\n",
       "tests/test_remote_outputs.py::test_a_write_that_fails_midway_leaves_no_object"),
    _m("a Ctrl-C during the run's end is not recorded", "gpubatch/runtime/runner.py",
       "        except (KeyboardInterrupt, Terminated, Exception) as exc:  # the commits stand; recorded as\n"
       "            self._abandon(progress, exc)  # interrupted or failed, never left saying \"running\"\n"
       "            raise\n", "",
       "tests/test_stopping.py::test_a_ctrl_c_during_the_run_s_end_is_recorded_and_resume_finishes_it",
       "tests/test_stopping.py::test_a_run_whose_end_fails_otherwise_than_by_storage_is_recorded_as_failed"),
    _m("read-ahead joins every read into one group", "gpubatch/io/readahead.py",
       "joined > requests + alone // 2", "False",
       "tests/test_readahead.py::test_neighbouring_blocks_rows_are_joined_into_one_request_per_row"),
    _m("a Ctrl-C a finaliser dropped is forgotten", "gpubatch/runtime/submit.py",
       "        done = self.executor.wait_first(pending, timeout=POLL_S)\n        raise_if_stopped()\n",
       "        done = self.executor.wait_first(pending, timeout=POLL_S)\n",
       "tests/test_stopping.py::test_a_run_whose_ctrl_c_a_finaliser_swallowed_stops_at_the_next_poll"),
    _m("a resume counts commits its plan does not name as done", "gpubatch/runtime/runner.py",
       "kept = sum(1 for _ in self.commits.in_order(s.shard_id for s in shards))", "kept = len(self.commits)",
       "tests/test_resume_exact.py::test_a_resume_whose_input_list_swapped_one_input_computes_the_new_one"),
    _m("a resume keeps a shard whose zarr group is gone", "gpubatch/outputs/manifest.py",
       "elif entry.group and _group_marker(entry.group) not in groups:", "elif False:",
       "tests/test_resume_exact.py::test_a_committed_shard_whose_zarr_group_is_gone_is_recomputed"),
    _m("a resume keeps committed parts of other columns", "gpubatch/runtime/resume.py",
       'problem = columns.problem(f"{PARTS_DIR}/{entry.part}", part_columns(data))', "problem = None",
       "tests/test_resume_columns.py::test_a_resume_over_windows_parts_without_the_region_column_is_refused_before_computing",
       "tests/test_resume_columns.py::test_a_resume_over_a_slide_part_with_other_output_columns_is_refused"),
    _m("the lease is beaten only once the shards start", "gpubatch/runtime/runner.py",
       "        run.lease.hold()  # beaten from now", "        pass  # beaten from now",
       "tests/test_runs_cannot_mix.py::test_a_run_still_preparing_its_model_keeps_its_lease"),
    _m("the S3 lease is written without a condition", "gpubatch/outputs/conditional.py",
       'condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}',
       "condition: dict[str, str] = {}",
       "tests/test_remote_output_faults.py::test_two_writers_taking_over_one_stale_s3_lease_one_refuses",
       "tests/test_lease.py::test_two_runs_taking_a_free_output_at_once_only_one_holds_it[s3]"),
    _m("the Azure lease is created without a condition", "gpubatch/outputs/conditional.py",
       'condition: dict[str, Any] = {"overwrite": False, "match_condition": MatchConditions.IfMissing}',
       'condition: dict[str, Any] = {"overwrite": True}',
       "tests/test_lease.py::test_two_runs_taking_a_free_output_at_once_only_one_holds_it[azure]"),
    _m("the Azure heartbeat is written without a condition", "gpubatch/outputs/conditional.py",
       'condition = {"overwrite": True, "etag": version, "match_condition": MatchConditions.IfNotModified}',
       'condition = {"overwrite": True}',
       "tests/test_lease.py::test_a_heartbeat_never_overwrites_the_lease_a_successor_took_over[azure]"),
    _m("the Azure lease is deleted without a condition", "gpubatch/outputs/conditional.py",
       "await blob.delete_blob(etag=version, match_condition=MatchConditions.IfNotModified, **timeouts)",
       "await blob.delete_blob(**timeouts)",
       "tests/test_lease.py::test_a_release_never_deletes_the_lease_a_successor_took_over[azure]"),
    _m("the GCS lease is created without a condition", "gpubatch/outputs/conditional.py",
       'uploadType="multipart", ifGenerationMatch=version or "0",', 'uploadType="multipart",',
       "tests/test_lease.py::test_two_runs_taking_a_free_output_at_once_only_one_holds_it[gcs]"),
    _m("the GCS heartbeat is written without a condition", "gpubatch/outputs/conditional.py",
       'ifGenerationMatch=version or "0",', 'ifGenerationMatch=None if version else "0",',
       "tests/test_lease.py::test_a_heartbeat_never_overwrites_the_lease_a_successor_took_over[gcs]"),
    _m("the GCS lease is deleted without a condition", "gpubatch/outputs/conditional.py",
       'fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)',
       'fs.call("DELETE", "b/{}/o/{}", bucket, key)',
       "tests/test_lease.py::test_on_gcs_a_release_deletes_only_the_generation_it_wrote"),
    _m("the GCS version is its ETag, not its generation", "gpubatch/outputs/conditional.py",
       'keys = ("generation",) if protocol in GCS_PROTOCOLS else ("ETag", "etag")', 'keys = ("etag",)',
       "tests/test_lease.py::test_a_version_names_the_object_as_it_is_now[gcs]"),
    _m("a run beats on a lease another run took over", "gpubatch/outputs/lease.py",
       "        if self._taken_over():\n", "        if False:\n",
       # the run's end reads the lease itself (Lease.confirm): the whole run still stops, exit 1, at
       # its end; the heartbeat's own stop is seen by the lease's test
       "tests/test_lease.py::test_on_disk_a_heartbeat_never_overwrites_the_lease_a_successor_took_over",
       "tests/test_runs_cannot_mix.py::test_a_run_whose_lease_was_taken_over_stops_and_leaves_the_output_to_the_new_one"),
    _m("the conditional heartbeat is written without a condition", "gpubatch/outputs/lease.py",
       "        written = self._write_if(self._version)\n", "        written = None\n",
       "tests/test_lease.py::test_a_heartbeat_never_overwrites_the_lease_a_successor_took_over"),
    _m("a heartbeat refused by its own landed write stops the run", "gpubatch/outputs/lease.py",
       "        return written or self._still_ours()\n", "        return bool(written)\n",
       "tests/test_lease.py::test_a_heartbeat_that_meets_its_own_landed_write_beats_on"),
    _m("the conditional lease is deleted without a condition", "gpubatch/outputs/lease.py",
       "        if self._version is None:  # no conditional delete here", "        if True:  # no conditional delete here",
       "tests/test_lease.py::test_a_release_never_deletes_the_lease_a_successor_took_over"),
)


def copy_tree(dest: Path) -> None:
    """The parts of the checkout the tests need, without caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)


def check_anchors(root: Path, mutations: tuple[Mutation, ...]) -> list[str]:
    """A problem line for each edit whose text is not found exactly once in its file."""
    problems = []
    for m in mutations:
        for file, old, _ in m.edits:
            n = (root / file).read_text().count(old)
            if n != 1:
                problems.append(f"{m.name}: {file}: the anchor is found {n} times, not once: {old[:70]!r}")
    return problems


def env_for(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}


def run_tests(root: Path, tests: tuple[str, ...], timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """(pytest's exit code, its output) for ``tests`` in the copy; 124 when it ran past ``timeout``."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out
    return proc.returncode, proc.stdout + proc.stderr


def failed_test(output: str, why: bool = False) -> str:
    """The first test pytest reports as failed (or in error); with ``why``, its first error line."""
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    name = found.group(1) if found else "?"
    error = re.search(r"^E +(.+)$", output, re.MULTILINE)
    return f"{name}  [{error.group(1)[:150]}]" if why and error else name


def apply(root: Path, m: Mutation) -> dict[Path, str]:
    """Plant ``m`` in the copy; returns the original texts to put back."""
    originals: dict[Path, str] = {}
    for file, old, new in m.edits:
        path = root / file
        text = path.read_text()
        originals.setdefault(path, text)
        path.write_text(text.replace(old, new, 1))
    return originals


def run_mutation(root: Path, m: Mutation, why: bool = False) -> tuple[bool, str, float]:
    """(caught, by which test or why not, seconds) for one mutation."""
    originals = apply(root, m)
    t0 = time.perf_counter()
    try:
        code, out = run_tests(root, m.tests)
    finally:
        for path, text in originals.items():
            path.write_text(text)
    seconds = time.perf_counter() - t0
    if code == 124:
        return True, f"timeout after {TIMEOUT_S} s in {' '.join(m.tests)}", seconds
    if code == 1:
        return True, failed_test(out, why), seconds
    if code == 0:
        return False, "every test passed", seconds
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return False, f"pytest exit {code}, not a test failure (a broken mutation?): {last}", seconds


def baseline(root: Path, mutations: tuple[Mutation, ...]) -> None:
    """The selected tests pass on the unmutated copy, or a 'caught' would mean nothing."""
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    code, out = run_tests(root, tests, timeout=3 * TIMEOUT_S)
    if code != 0:
        sys.exit(f"the selected tests fail without any mutation (pytest exit {code}); fix them first:\n"
                 + "\n".join(out.splitlines()[-30:]))


def check_copy_is_imported(root: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import gpubatch; print(gpubatch.__file__)"], cwd=root,
                           env=env_for(root), capture_output=True, text=True, check=True)
    if not probe.stdout.strip().startswith(str(root)):
        sys.exit(f"the copy is not what Python imports (gpubatch from {probe.stdout.strip()}): "
                 "an install shadows PYTHONPATH")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", default="", help="only mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated check")
    parser.add_argument("--why", action="store_true", help="show each catching test's first error line")
    args = parser.parse_args(argv)
    chosen = tuple(m for m in MUTATIONS if args.select in m.name)
    if not chosen:
        sys.exit(f"no mutation's name contains {args.select!r} (--list names them)")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="gpubatch-mutations-") as tmp:
        root = Path(tmp)
        copy_tree(root)
        problems = check_anchors(root, chosen)
        if problems:
            sys.exit("mutation anchors no longer match the code (move them with it):\n" + "\n".join(problems))
        check_copy_is_imported(root)
        if not args.no_baseline:
            baseline(root, chosen)
        caught = 0
        width = max(len(m.name) for m in chosen)
        for m in chosen:
            ok, by, seconds = run_mutation(root, m, args.why)
            caught += ok
            print(f"{m.name:<{width}}  {'caught' if ok else 'SURVIVED':<8}  {by}  {seconds:.1f}s", flush=True)
    print(f"caught {caught} of {len(chosen)}")
    return 0 if caught == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
