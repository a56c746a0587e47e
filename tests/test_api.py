"""The Python API as an analysis script uses it: gpubatch.run, open_results and the Result,
on real small runs (inline profile unless the test is about worker processes)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import slide_job, write_job

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path, classifier: Path) -> Path:
    """A finished run of the classifier over the three test slides; its output folder."""
    import gpubatch

    tmp = tmp_path_factory.mktemp("api")
    job = slide_job([str(slides_dir / "*.tif")], classifier, tmp / "out")
    assert gpubatch.run(write_job(tmp / "job.yaml", job), show_progress=False).exit_code == 0
    return tmp / "out"


@pytest.mark.parametrize("where", ["missing", "folder", "file"])
def test_open_results_refuses_what_no_run_wrote(tmp_path: Path, where: str) -> None:
    """A missing folder, a folder of something else or a file gave a Result with exit code 0 and
    an empty report (a typo read as a finished run), and a 404 only at predictions()."""
    import gpubatch
    from gpubatch.core.errors import NotAnOutputError

    path = tmp_path / "nothing"
    if where == "folder":
        path.mkdir()
        (path / "predictions.parquet").write_bytes(b"")
    elif where == "file":
        path.write_text("x")
    with pytest.raises(NotAnOutputError, match="nothing"):
        gpubatch.open_results(str(path))


def test_open_results_refuses_an_object_store_prefix_no_run_wrote(s3: S3Stack) -> None:
    import gpubatch
    from gpubatch.core.errors import NotAnOutputError

    s3.upload_bytes(b"x", "not-an-output/predictions.parquet")
    for uri in (s3.uri("not-an-output"), s3.uri("no-such-prefix")):
        with pytest.raises(NotAnOutputError, match="s3://"):
            gpubatch.open_results(uri, s3.options())


def _interrupted_after_first_shard(job: Path, monkeypatch: pytest.MonkeyPatch, **options: Any) -> None:
    """Run ``job``, Ctrl-C as its first shard is committed."""
    import gpubatch
    from gpubatch.runtime.progress import Progress

    update = Progress.update

    def update_then_interrupt(self: Progress, result: Any) -> None:
        update(self, result)
        os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as patch:
        patch.setattr(Progress, "update", update_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            gpubatch.run(job, show_progress=False, **options)


@pytest.mark.parametrize("first", [True, False], ids=["first-run", "resume"])
def test_an_unfinished_output_says_so_and_never_reads_back_partial(tmp_path: Path, slides_dir: Path,
                                                                     mean_model: Path, first: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run's output: open_results gave exit code 0; predictions() said "object not
    found (404): check the URI" (a first run) or silently returned the finished run before's
    rows without the slide committed since (an interrupted --resume over one more slide)."""
    import gpubatch
    from gpubatch.core.errors import UnfinishedOutputError

    out = tmp_path / "out"
    job = slide_job([str(slides_dir / "s0.tif"), str(slides_dir / "s1.tif")], mean_model, out)
    if not first:
        assert gpubatch.run(write_job(tmp_path / "a.yaml", job), show_progress=False).exit_code == 0
        job["input"]["uris"].append(str(slides_dir / "s2.tif"))
    _interrupted_after_first_shard(write_job(tmp_path / "b.yaml", job), monkeypatch, resume=not first)
    result = gpubatch.open_results(str(out))
    assert not result.complete and result.exit_code == 3
    with pytest.raises(UnfinishedOutputError, match=r"did not finish \(interrupted.*--resume"):
        result.predictions()
    committed = result.predictions(partial=True)
    assert committed["slide"].nunique() == result.report["shards_done"] >= (1 if first else 3)
    one = result.predictions(committed["slide"].iloc[0], columns=["slide", "x"], partial=True)
    assert list(one.columns) == ["slide", "x"] and one["slide"].nunique() == 1
    again = gpubatch.run(tmp_path / "b.yaml", resume=True, show_progress=False)
    assert again.complete and gpubatch.open_results(str(out)).complete
    assert len(again.predictions()) == len(gpubatch.open_results(str(out)).predictions(partial=True))


def test_a_partial_read_has_the_columns_and_types_of_a_finished_one(tmp_path: Path, slides_dir: Path,
                                                                     mean_model: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An unfinished run read with ``partial=True``, for a slide without tissue (or before any
    committed shard had rows), gave a DataFrame with no columns at all (``df["x"]`` a KeyError,
    ``pd.concat`` with a finished run's frame all object), where a finished run gives the typed
    empty columns."""
    import numpy as np

    import gpubatch
    from gpubatch.cli.demo import write_synthetic_slide

    blank = write_synthetic_slide(tmp_path / "blank.tif", 512, 512, levels=1, image=np.full((512, 512, 3), 240, np.uint8))
    job = write_job(tmp_path / "job.yaml", slide_job([str(blank), str(slides_dir / "s0.tif")], mean_model,
                                                     tmp_path / "out", tiles={"tissue": {"method": "otsu"}}))
    _interrupted_after_first_shard(job, monkeypatch)
    result = gpubatch.open_results(str(tmp_path / "out"))
    assert not result.complete
    partial = {"run": result.predictions(partial=True), "slide": result.predictions(str(blank), partial=True),
               "columns": result.predictions(str(blank), columns=["x", "level"], partial=True)}
    finished = gpubatch.run(job, resume=True, show_progress=False).predictions()
    assert len(finished) and len(partial["slide"]) == 0
    for name, frame in partial.items():
        want = finished.dtypes[list(frame.columns)] if name == "columns" else finished.dtypes
        assert list(frame.columns) == list(want.index) and frame.dtypes.equals(want), (name, frame.dtypes)
    assert list(partial["columns"].columns) == ["x", "level"]


def test_the_facade_exports_what_a_script_catches_and_nothing_private() -> None:
    """A script caught SpecError or NotAnOutputError only through gpubatch.core.errors, and
    users' mypy read gpubatch as untyped: there was no py.typed marker in the package."""
    import tomllib

    import gpubatch
    from gpubatch.core import errors

    for name in gpubatch.__all__:
        assert not name.startswith("_") or name == "__version__"
        assert getattr(gpubatch, name) is not None
    caught = {n for n in gpubatch.__all__ if n.endswith(("Error", "Refused", "Full"))}
    assert caught >= {"GpubatchError", "SpecError", "NotAnOutputError", "UnfinishedOutputError", "OutputRefused"}
    for name in caught:
        assert getattr(gpubatch, name) is getattr(errors, name)
        assert issubclass(getattr(gpubatch, name), gpubatch.GpubatchError)
    assert set(gpubatch.__all__) <= set(dir(gpubatch))
    root = Path(gpubatch.__file__).parent
    assert (root / "py.typed").is_file()
    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["gpubatch"]


def test_a_path_object_and_a_user_error_name_the_field(tmp_path: Path, finished: Path) -> None:
    """pathlib paths are accepted everywhere a path is; a bad override is a SpecError naming it."""
    import gpubatch

    assert gpubatch.open_results(finished).report["items"] > 0
    job = finished.parent / "job.yaml"
    assert gpubatch.load_job(job, ["tiles.size=128"]).tiles.size == 128
    with pytest.raises(gpubatch.SpecError, match="tiles.size"):
        gpubatch.run(job, tiles__size="big")
    with pytest.raises(gpubatch.SpecError, match=r"gpubatch.run\(\.\.\., resume=True\) or overwrite=True"):
        gpubatch.run(job)  # a script is told its own words, not only the command line's flags


def test_one_slide_s_predictions_are_read_without_the_rest(finished: Path, slides_dir: Path) -> None:
    """predictions() loaded the whole run into memory: a script wanting one slide of a
    10,000-slide run had no other way. Now a slide, columns and pyarrow filters are applied
    while reading, with the same dtypes as the whole frame."""
    import gpubatch

    result = gpubatch.open_results(finished)
    whole = result.predictions()
    slide = str(slides_dir / "s1.tif")
    one = result.predictions(slide)
    assert len(one) and set(one["slide"]) == {slide}
    assert one.reset_index(drop=True).equals(whole[whole["slide"] == slide].reset_index(drop=True))
    some = result.predictions(slide, columns=["x", "y", "probs_0"], filters=[("x", ">", 0)])
    assert list(some.columns) == ["x", "y", "probs_0"] and (some["x"] > 0).all()
    assert dict(some.dtypes) == {c: whole.dtypes[c] for c in some.columns}
    assert result.predictions("nowhere.tif").empty


REPO = Path(__file__).resolve().parents[1]


def _python_blocks(doc: Path, heading: str) -> list[str]:
    """The ```python blocks of ``doc`` under ``heading`` (to the next heading of its level)."""
    import re

    text = doc.read_text()
    level = heading.split(" ", 1)[0]
    section = text.split(heading + "\n", 1)[1]
    section = re.split(rf"\n{level} ", section, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_s_python_api_example_runs_as_a_script(tmp_path: Path) -> None:
    """README's example, run as a script (local profile: worker processes, the __main__ guard)
    from a clone where `gpubatch demo` has run: it read one slide's embeddings as
    "slides/a.svs", which no run has, so the example stopped at that line."""
    import shutil
    import subprocess
    import sys

    from gpubatch.cli.demo import prepare_demo

    (block,) = _python_blocks(REPO / "README.md", "## The Python API")
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "jobs", clone / "jobs")
    prepare_demo(clone / "demo-work", n_slides=1, size=(2048, 1536))
    script = clone / "example.py"
    script.write_text(block.replace("    main()\n", "    main()\n    print('example done')\n"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env=env, cwd=clone)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("example done")


def test_the_outputs_doc_s_zarr_example_reads_a_real_output(finished: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """docs/outputs.md's zarr-only reading of the bags, on a run's real predictions.zarr."""
    (block,) = [b for b in _python_blocks(REPO / "docs" / "outputs.md", "## predictions.zarr, for MIL code that does not import gpubatch")
                if "zarr.open_group" in b] or [""]
    assert block, "docs/outputs.md lost its zarr example"
    monkeypatch.chdir(finished.parent)
    exec(compile(block.replace("results/features/predictions.zarr", "out/predictions.zarr"), "outputs.md", "exec"), {})
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_an_unguarded_script_s_workers_say_only_what_to_do(tmp_path: Path, slide_path: Path, mean_model: Path) -> None:
    """Each worker process re-importing a script without the __main__ guard went on into a run
    of its own: it took the output's lease, and its traceback, printed first, said "another run
    is writing this output" (the parent's). Now every process says to add the guard."""
    import subprocess
    import sys

    job = write_job(tmp_path / "job.yaml", slide_job([str(slide_path)], mean_model, tmp_path / "out",
                                                     run={"profile": "local", "workers": 1}))
    script = tmp_path / "unguarded.py"
    script.write_text(f"import gpubatch\ngpubatch.run({str(job)!r}, show_progress=False)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert "another run is writing" not in done.stderr, done.stderr[-3000:]
    assert 'Put the call under `if __name__ == "__main__":`' in done.stderr.strip().splitlines()[-1]


def test_a_run_leaves_the_callers_dask_settings_as_it_found_them(tmp_path: Path, slide_path: Path,
                                                                 mean_model: Path) -> None:
    """A notebook that runs gpubatch and then starts its own Dask cluster got gpubatch's settings:
    forkserver workers, no profiler, gpubatch's worker environment, short scheduler logs. They
    are held while gpubatch's cluster lives and the caller's are back after, also on failure."""
    import dask
    import distributed  # noqa: F401 - its defaults are what the caller has

    import gpubatch

    keys = ("distributed.worker.multiprocessing-method", "distributed.worker.profile.enabled",
            "distributed.admin.low-level-log-length", "distributed.nanny.pre-spawn-environ")
    before = {k: dask.config.get(k, None) for k in keys}
    job = slide_job([str(slide_path)], mean_model, tmp_path / "out", run={"profile": "local", "workers": 1})
    assert gpubatch.run(write_job(tmp_path / "job.yaml", job)).exit_code == 0
    assert {k: dask.config.get(k, None) for k in keys} == before


def test_a_cluster_started_before_distributed_is_imported_keeps_dasks_own_defaults() -> None:
    """Set before distributed was imported, gpubatch's settings made a 'distributed' section of
    their own, and distributed's defaults were merged under it: the cluster then failed to start
    with KeyError 'comm' (as test_runner's first local run did, after inline runs only), and
    putting the caller's settings back removed the section whole."""
    import subprocess
    import sys

    script = ("import sys, dask\n"
              "assert 'distributed' not in sys.modules\n"
              "from gpubatch.runtime.cluster import open_executor\n"
              "executor = open_executor({'cluster': 'local', 'threads_per_worker': 1}, 1)\n"
              "executor.close()\n"
              "print(dask.config.get('distributed.comm.timeouts.connect'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-2000:]


def test_a_notebook_s_warnings_and_environment_are_its_own_after_runs(tmp_path: Path, slide_path: Path,
                                                                      mean_model: Path) -> None:
    """After an inline run, every warning the notebook raised went to a DEBUG line of gpubatch's
    log (Python warnings were routed in the caller's process: logging.captureWarnings is
    process-wide); after a local run, os.environ kept Dask's worker environment
    (OMP_NUM_THREADS=1, MKL and OpenBLAS threads, MALLOC_*, PYTHONHASHSEED): numpy and torch in
    the notebook then ran on one thread. Run as `python -c`, as a notebook is: a fresh process."""
    import subprocess
    import sys

    jobs = {prof: write_job(tmp_path / f"{prof}.yaml", slide_job([str(slide_path)], mean_model, tmp_path / prof,
                                                                 run={"profile": prof, "workers": 1}))
            for prof in ("inline", "local")}
    script = ("import json, os, warnings, gpubatch\n"
              "before = dict(os.environ)\n"
              f"for job in {[str(j) for j in jobs.values()]!r}:\n"
              "    assert gpubatch.run(job, show_progress=False).exit_code == 0\n"
              "warnings.warn('the notebook speaks')\n"
              "changed = {k: os.environ.get(k) for k in set(os.environ) | set(before)\n"
              "           if os.environ.get(k) != before.get(k) and k != '__DASK_PARENT_PID'}\n"
              "print(json.dumps(changed))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "UserWarning: the notebook speaks" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "{}"


def test_one_slide_of_an_unfinished_output_is_read_without_the_rest(tmp_path: Path, slides_dir: Path,
                                                                     classifier: Path) -> None:
    """predictions(slide, columns=..., partial=True) decoded every column of every committed
    part and concatenated the run's rows before picking one slide's columns: one slide of a
    large unfinished run cost all of it in memory. Arrow's peak allocation (in a fresh process,
    where it starts at nothing) says what was held."""
    import json
    import subprocess
    import sys

    import gpubatch

    job = slide_job([str(p) for p in sorted(slides_dir.glob("*.tif"))], classifier, tmp_path / "out")
    assert gpubatch.run(write_job(tmp_path / "job.yaml", job), show_progress=False).exit_code == 0
    script = ("import json, sys, pyarrow as pa, gpubatch\n"
              "result = gpubatch.open_results(sys.argv[1])\n"
              "result.report['complete'] = False  # read as while a run still writes it: from the parts\n"
              "one = result.predictions(sys.argv[2], columns=['x'], partial=True)\n"
              "peak_one = pa.default_memory_pool().max_memory()\n"
              "whole = result.predictions(partial=True)\n"
              "same = one['x'].tolist() == whole[whole['slide'] == sys.argv[2]]['x'].tolist()\n"
              "print(json.dumps([peak_one, pa.default_memory_pool().max_memory(), list(one.columns), same]))\n")
    slide = str(sorted(slides_dir.glob("*.tif"))[-1])
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out"), slide], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    peak_one, peak_whole, columns, same = json.loads(done.stdout.strip().splitlines()[-1])
    assert columns == ["x"] and same
    assert peak_one * 3 < peak_whole, (peak_one, peak_whole)


def test_a_second_run_into_the_same_output_from_another_thread_is_refused_and_the_first_finishes(
        tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads of one notebook run one job into one output, the second while the first has
    committed a shard: the second is refused, saying it is this process's own other run (the
    lease's words named this process's pid as "another run" and said to wait for its lease to go
    stale if it was killed), and the first finishes every slide."""
    import threading

    import gpubatch
    from gpubatch.runtime.progress import Progress

    job = write_job(tmp_path / "job.yaml", slide_job([str(p) for p in sorted(slides_dir.glob("*.tif"))],
                                                     mean_model, tmp_path / "out"))
    update, refused = Progress.update, []

    def second_run() -> None:
        try:
            gpubatch.run(job, show_progress=False, resume=True)
        except gpubatch.SpecError as exc:
            refused.append(str(exc))

    def update_then_run_again(self: Progress, result: Any) -> None:
        update(self, result)
        if threading.current_thread().name != "second" and not refused:
            second = threading.Thread(target=second_run, name="second")
            second.start()
            second.join(120)

    monkeypatch.setattr(Progress, "update", update_then_run_again)
    first = gpubatch.run(job, show_progress=False)
    assert first.exit_code == 0 and first.complete and first.report["shards_done"] == 3
    assert len(refused) == 1 and "another run is writing this output" in refused[0]
    assert "in this same process" in refused[0]
    assert "stale" not in refused[0]
    assert gpubatch.open_results(tmp_path / "out").predictions()["slide"].nunique() == 3


def test_open_results_says_what_the_run_said_of_an_output_whose_every_input_failed(tmp_path: Path) -> None:
    """A finished run whose every input was quarantined returned exit code 1 (as the CLI exits),
    and open_results of its output said 3, partial, as if some inputs had been done."""
    import gpubatch
    from gpubatch.cli.demo import make_mean_colour_model

    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"not a slide" * 20)
    job = slide_job([str(bad)], make_mean_colour_model(tmp_path / "m.onnx"), tmp_path / "out")
    result = gpubatch.run(write_job(tmp_path / "job.yaml", job), show_progress=False)
    assert result.exit_code == 1 and len(result.failed) == 1
    again = gpubatch.open_results(tmp_path / "out")
    assert again.complete and again.exit_code == 1 and again.failed == result.failed


def test_open_results_while_a_run_writes_the_output_says_to_wait_not_to_resume(
        tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook reading an output another cell (or process) is still writing was told its run
    "did not finish" and to finish it with `gpubatch run JOB --resume`, which the run's lease
    then refuses. It is told which run is writing it and to wait, or to read what is committed."""
    import re

    import gpubatch
    from gpubatch.core.errors import UnfinishedOutputError
    from gpubatch.runtime.progress import Progress

    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", slide_job([str(p) for p in sorted(slides_dir.glob("*.tif"))],
                                                     mean_model, out))
    update, seen = Progress.update, []

    def update_then_read(self: Progress, result: Any) -> None:
        update(self, result)
        if not seen:
            reading = gpubatch.open_results(out)
            seen.append((reading.complete, reading.exit_code, reading.report["state"]))
            with pytest.raises(UnfinishedOutputError) as said:
                reading.predictions()
            seen.append(str(said.value))
            seen.append(reading.predictions(partial=True)["slide"].nunique())

    monkeypatch.setattr(Progress, "update", update_then_read)
    assert gpubatch.run(job, show_progress=False).exit_code == 0
    assert seen[0] == (False, 3, "running") and seen[2] >= 1
    assert re.search(r"is writing it now \(\d of 3 shards committed so far\)", seen[1]), seen[1]
    assert "--resume" not in seen[1]
    assert "predictions(partial=True)" in seen[1]
    assert gpubatch.open_results(out).predictions()["slide"].nunique() == 3
