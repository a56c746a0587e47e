"""The `gpubatch` command. Exit codes: 0 done, 1 error, 2 bad spec or usage, 3 partial."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gpubatch.core.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, GpubatchError
from gpubatch.core.plural import counted, plural
from gpubatch.core.streams import QuietWhenGone
from gpubatch.io.redact import redact, safe_text
from gpubatch.runtime.stopping import Terminated, ignore_further_signals


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors already; keep the text
        self.print_usage(sys.stderr)
        print(f"gpubatch: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gpubatch", description="Batch inference over whole-slide images and genomes.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="generate synthetic slides and a model, run a job, print the summary")
    d.add_argument("--workdir", default="demo-work")
    v = sub.add_parser("validate", help="validate a job spec (nothing runs)")
    v.add_argument("job")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--no-open", action="store_true",
                   help="do not open the slides (by default each is opened and planned, as its shard would)")
    v.add_argument("--profile", help="validate for `run --profile P`")
    v.add_argument("--resume", action="store_true", help="validate for `run --resume` (committed shards kept)")
    v.add_argument("--overwrite", action="store_true", help="validate for `run --overwrite`")
    r = sub.add_parser("run", help="run a job")
    r.add_argument("job")
    r.add_argument("--profile")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--resume", action="store_true", help="finish a run: skip shards already committed")
    r.add_argument("--overwrite", action="store_true", help="start again: remove what earlier runs wrote there")
    s = sub.add_parser("submit", help="run a job on an existing Dask cluster")
    s.add_argument("job")
    s.add_argument("--scheduler", required=True, metavar="ADDR")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--overwrite", action="store_true")
    st = sub.add_parser("status", help="progress of a running or finished job (a folder or a URI)")
    st.add_argument("outdir")
    st.add_argument("--storage", action="append", default=[], metavar="KEY=VALUE",
                    help="fsspec option for an object-store OUTDIR (credentials also come from AWS_*)")
    rp = sub.add_parser("report", help="print a run's summary (a folder or a URI)")
    rp.add_argument("outdir")
    rp.add_argument("--storage", action="append", default=[], metavar="KEY=VALUE")
    rp.add_argument("--html", action="store_true", help="also write OUTDIR/report.html")
    t = sub.add_parser("tune", help="sweep batch sizes and choose one")
    t.add_argument("job")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--profile", help="tune for `run --profile P` (its workers' threads per model)")
    ing = sub.add_parser("ingest", help="convert inputs to fast formats")
    ing.add_argument("what", choices=["genome"])
    ing.add_argument("source")
    ing.add_argument("out")
    ing.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    ing.add_argument("--storage", action="append", default=[], metavar="KEY=VALUE",
                     help="fsspec option for an object-store FASTA or OUT (anon=true for a public "
                          "bucket; credentials also come from AWS_*)")
    ins = sub.add_parser("inspect", help="describe a slide, ONNX model, genome store, FASTA or results folder")
    ins.add_argument("path")
    ins.add_argument("--storage", action="append", default=[], metavar="KEY=VALUE",
                     help="fsspec option for an object-store PATH (credentials also come from AWS_*)")
    return p


def _cmd_validate(args: argparse.Namespace) -> int:
    """Every check ``run`` makes before its first shard, the plan included; nothing runs."""
    from gpubatch.runtime.preflight import validate_job
    from gpubatch.spec import load_job

    job = load_job(args.job, args.set)
    check = validate_job(job, open_inputs=not args.no_open, profile_name=args.profile, resume=args.resume,
                         overwrite=args.overwrite)
    items = f", {counted(check.items, 'item')}" if check.items is not None else ""
    print(f"{safe_text(args.job)}: valid ({job.kind} job '{safe_text(job.name)}': {counted(check.shards, 'shard')}{items})")
    for note in check.notes:
        print(f"  note: {safe_text(note)}")
    for f in check.failed:
        print(f"  warning: {safe_text(f['input'])} would be quarantined: {safe_text(f['error'])}")
    return EXIT_OK


def _run_and_report(job_path: str, sets: list[str], **options: Any) -> int:
    from gpubatch.report.text import format_summary
    from gpubatch.runtime.runner import run_job
    from gpubatch.spec import load_job

    job = load_job(job_path, sets)
    result = run_job(job, **options)
    print(format_summary(result.report))
    print(f"outputs: {safe_text(result.output_uri)}")
    return result.exit_code


def _cmd_run(args: argparse.Namespace) -> int:
    return _run_and_report(args.job, args.set, profile=args.profile, resume=args.resume,
                           overwrite=args.overwrite)


def _cmd_submit(args: argparse.Namespace) -> int:
    from gpubatch.runtime.cluster import check_scheduler_reachable

    check_scheduler_reachable(args.scheduler)
    return _run_and_report(args.job, args.set, scheduler=args.scheduler, resume=args.resume,
                           overwrite=args.overwrite)


def _cmd_demo(args: argparse.Namespace) -> int:
    from gpubatch.cli.demo import prepare_demo, prepare_genome_demo

    codes = []
    for job_path in (prepare_demo(args.workdir), prepare_genome_demo(args.workdir)):
        print(f"\ndemo job spec: {job_path}")
        codes.append(_run_and_report(str(job_path), [], overwrite=True))  # the demo owns its outputs
    return max(codes)


def _storage(args: argparse.Namespace) -> dict[str, Any]:
    from gpubatch.core.overrides import parse_override

    options: dict[str, Any] = {}
    for text in args.storage:
        path, value = parse_override(text, "--storage")
        options[".".join(path)] = value
    return options


def _output_store(args: argparse.Namespace) -> Any:
    """OUTDIR's store, refused (exit 2) unless a run made it: ``report`` printed an empty report
    of a folder that was never an output, and exited 0, and ``status`` called it a spec error."""
    from gpubatch.outputs.store import OutputStore
    from gpubatch.runtime.result import require_output

    return require_output(OutputStore(args.outdir, _storage(args)), args.outdir)


def _read_status(store: Any, outdir: str) -> dict[str, Any] | None:
    """status.json, None where there is none; a damaged one is named, not a traceback."""
    from gpubatch.outputs.layout import STATUS

    try:
        return store.read_json(STATUS) if store.exists(STATUS) else None
    except ValueError as exc:
        raise GpubatchError(f"{safe_text(outdir)}/{STATUS} cannot be read ({exc}): a live run rewrites it "
                            f"every heartbeat; `gpubatch report {safe_text(outdir)}` sums up what is committed") from None


def _cmd_status(args: argparse.Namespace) -> int:
    from gpubatch.outputs.layout import STATUS

    store = _output_store(args)
    s = _read_status(store, args.outdir)
    starting = starting_run(store, s)
    if starting is not None:
        print(starting)
        return EXIT_OK
    if s is None:  # the marker is there: a run made the output and stopped before its shards
        print(f"not started: no run wrote {STATUS} in {safe_text(args.outdir)}; the run that made it stopped "
              "before its shards began (checking the inputs or preparing the model: its terminal said why); "
              "run the job again")
        return EXIT_OK
    eta = s.get("eta_s")
    state = status_state(s)
    print(f"{state}: {s['done']}/{s['total']} shards done, {s['failed']} failed"
          + (f", {s['plan_failed']} input(s) quarantined at plan (listed in report.json)"
             if s.get("plan_failed") else "")
          + _rate_words(s)
          + (f", {s['items_running']:,} more in running shards (not yet committed)"
             if s.get("items_running") and s["state"] == "running" else "")
          + (f", starvation {s['starvation']:.1%}" if "starvation" in s and s.get("items") else "")
          + (f", ETA {eta:.0f} s" if eta is not None and s["state"] == "running" and "ending" not in s else "")
          + (ending_words(s["ending"]) if isinstance(s.get("ending"), dict) and state == "running" else "")
          + stopped_words(s)
          + (f"; {s['waiting']['words']}" if isinstance(s.get("waiting"), dict) and s["state"] == "running" else ""))
    return EXIT_OK


def _rate_words(status: dict[str, Any]) -> str:
    """The rate as report.json's headline gives it, items over seconds since the run started, so
    that a reader can tell what it measures ("this run": a resume's rate leaves the shards
    committed before it out, as report.json's does). Older status.json files have no ``wall_s``."""
    if "items_per_s" not in status or not status.get("items"):
        return ""
    rate = f"{status['items_per_s']:.1f} items/s"
    if "wall_s" not in status:
        return f", {rate}"
    this_run = " this run" if status.get("resumed") else ""
    return f", {status['items']} {plural(status['items'], 'item')}{this_run} in {status['wall_s']:.1f} s = {rate}"


def ending_words(ending: dict[str, Any]) -> str:
    """What a live run does once its shards are over (status.json's ``ending``): the step of its
    end and how far it is, where it said; "ETA 0 s" read as done while it merged for minutes."""
    step = ending.get("step")
    if not step:
        return "; the shards are over, finishing the run"
    words = ending.get("words")
    far = f"{words}, " if words and words != "under way" else ""
    return f"; the shards are over, finishing the run: {step} ({far}{float(ending.get('step_s', 0.0)):.0f} s)"


def starting_run(store: Any, status: dict[str, Any] | None) -> str | None:
    """The line for a run that holds the output's lease, live, but has not written status.json
    yet: its resume checks and model preparation (a quantization, a TensorRT build) come first,
    and meanwhile status.json is the run before's (or absent), which `status` gave as the state."""
    from gpubatch.outputs.lease import live_holder
    from gpubatch.spec import RunSpec

    lease = live_holder(store, RunSpec.model_fields["lease_stale_s"].default)
    if lease is None or (status or {}).get("run_id") == lease.get("run_id"):
        return None
    return (f"starting: run {lease.get('run_id', '?')} on host {lease.get('host', '?')} (pid {lease.get('pid', '?')}) "
            "holds the output and has not started its shards yet (checking what is committed, "
            "preparing the model)")


def status_state(status: dict[str, Any], now: float | None = None) -> str:
    """The state status.json gives, except that a ``running`` whose heartbeat stopped is a run
    that was killed: it is ``interrupted``, never a stale ``running``."""
    from gpubatch.report.summary import stale_for

    age = stale_for(status, now)
    if age is None:
        return str(status.get("state", "unknown"))
    return (f"interrupted (no heartbeat for {age:.0f} s: the run is not running; "
            "finish it with `gpubatch run JOB --resume`)")


def stopped_words(status: dict[str, Any]) -> str:
    """Why a stopped run stopped and what finishes it: a Ctrl-C's reason is the bare word
    "interrupted", and a failure's its error, neither saying that --resume finishes the run."""
    from gpubatch.report.summary import next_step

    reason = str(status.get("reason") or "")
    if status.get("state") not in ("interrupted", "failed") or "--resume" in reason:
        return f"; {reason}" if reason else ""
    said = "" if not reason or reason == status.get("state") else f"; {reason}"
    return f"{said}; {next_step(status)}"


def _cmd_report(args: argparse.Namespace) -> int:
    from gpubatch.report.summary import latest_report, next_step, summarize_output
    from gpubatch.report.text import format_summary

    store = _output_store(args)
    finished, why = latest_report(store)
    if finished is not None:
        report = finished
    else:
        report = summarize_output(store)
        total = report.get("shards_total")
        print(f"{safe_text(why)}: what is committed there so far (latest run: {report.get('state')}; "
              f"{report.get('shards_done')} of {total if total is not None else '?'} shard(s) committed); "
              f"{next_step(report)}")
    print(format_summary(report))
    if args.html:
        from gpubatch.report.html import write_html

        print(f"wrote {write_html(store, report)}")
    return EXIT_OK


def _cmd_tune(args: argparse.Namespace) -> int:
    """Prepare the job's model as a run would, sweep batch sizes afresh, print the curve.

    The model swept is the one the run would use (after quantization and the validation gate),
    and the choice is stored in the cache, so a following ``batch_size: auto`` run picks it up
    (quantization is deterministic: the run's reduced model has the same checksum, so the key).
    Nothing is written to the job's output.
    """
    import tempfile

    from gpubatch.io.retry import policy_for, run_policy
    from gpubatch.models.prepare import prepare_model
    from gpubatch.models.prepare.tune import TuneResult
    from gpubatch.runtime.cluster import load_profile, worker_count
    from gpubatch.runtime.preflight import preflight, refuse_empty_plan
    from gpubatch.runtime.runner import all_workers_here, batch_limit, workers_model_threads
    from gpubatch.sources import get_source
    from gpubatch.spec import load_job

    in_spec = load_job(args.job, list(args.set or [])).model.batch_size
    job = load_job(args.job, list(args.set or []) + ["model.batch_size=auto"])
    prof = load_profile(args.profile or job.run.profile)
    with run_policy(policy_for(job.run)):  # its reads retried as the run's would be
        preflight(job, prof, tuning=True)
        source = get_source(job.kind)
        shards, failed = source.plan(job)
        refuse_empty_plan(shards, failed)
        here = all_workers_here(prof, None)
        threads = workers_model_threads(job, worker_count(prof, len(shards), job.run.workers), here)
        with tempfile.TemporaryDirectory(prefix="gpubatch-tune-") as models_dir:
            # a reduced model is made in a folder of tune's own: the job's output is the run's to
            # write (a folder holding only _models was then refused by validate and run as foreign)
            prepared = prepare_model(job, source, shards, Path(models_dir), retune=True, threads=threads,
                                     batch_limit=batch_limit(job, prof))
    _print_tuning(args, job, prepared, TuneResult.from_dict(prepared.report.get("tuning", {})), here)
    if in_spec != "auto":
        print(f"  note: the job's spec sets model.batch_size: {in_spec}, and `run` uses that; set "
              f"model.batch_size: auto (or --set model.batch_size=auto) to run at the tuned size")
    return EXIT_OK


def _print_tuning(args: argparse.Namespace, job: Any, prepared: Any, result: Any, here: bool) -> None:
    """The curve, what it measured, the choice and why; and what the run will do with it."""
    from gpubatch.models.prepare.tune import cache_path, describe_method, explain, format_curve

    tuning = prepared.report.get("tuning", {})
    threads = f", {tuning['threads']} threads" if tuning.get("threads") else ""
    print(f"model {safe_text(job.model.path)} ({prepared.computes_in}, {tuning.get('backend', job.model.backend)}, "
          f"{tuning.get('device', '?')}{threads})")
    print(describe_method(result))
    print(format_curve(result))
    print(f"chosen batch_size: {result.batch_size} ({explain(result)}); sweep stopped: {result.stopped_by}; "
          f"cached in {cache_path()}")
    if not here:
        print(f"  note: profile {args.profile or job.run.profile!r} runs its workers on other hosts: this was "
              "measured here; run `gpubatch tune` on a worker's host for figures that hold there")
def _cmd_ingest(args: argparse.Namespace) -> int:
    from gpubatch.cli.inspect import contig_summary
    from gpubatch.sources.genome.ingest import ingest_genome

    info = ingest_genome(args.source, args.out, _storage(args), overwrite=args.overwrite)
    info.update(contig_summary(info["contigs"], info["lengths"]))
    print(json.dumps(redact(info), indent=1, default=str))
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    """What PATH holds, redacted: the answer quotes PATH (and a genome store its FASTA's
    location), and a URL's userinfo or signature was printed as given."""
    from gpubatch.cli.inspect import inspect_path

    print(json.dumps(redact(inspect_path(args.path, _storage(args))), indent=1, default=str))
    return EXIT_OK


COMMANDS = {"validate": _cmd_validate, "run": _cmd_run, "submit": _cmd_submit, "demo": _cmd_demo,
            "status": _cmd_status, "report": _cmd_report, "tune": _cmd_tune, "ingest": _cmd_ingest,
            "inspect": _cmd_inspect}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is logged, not when the handler was made
    (a second ``main()`` in one process, or a test's captured stream, would otherwise be stale)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    """gpubatch's own lines at INFO, redacted and printable; Dask's chatter only when it is an
    error; the input libraries' warnings routed into gpubatch's log at DEBUG (``-v``).

    One handler however often ``main`` runs in a process, and only when the root logger has none;
    when it has (a host that configured logging, pytest's log capture), lines go up to it instead
    of being printed twice.
    """
    from gpubatch.core.logs import SafeFormatter, route_library_logs

    route_library_logs()
    log = logging.getLogger("gpubatch")
    for old in [h for h in log.handlers if isinstance(h, _StderrHandler)]:
        log.removeHandler(old)
    quiet_above = not logging.getLogger().handlers
    if quiet_above:
        handler = _StderrHandler()
        handler.setFormatter(SafeFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.propagate = not quiet_above
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_dask()


def quiet_dask() -> None:
    """Dask's and its event loop's chatter on the terminal only when it is an error, and asyncio's
    reports of tasks left behind by a client that gpubatch closed only with ``-v`` (they are
    noise after a run stopped on purpose: no worker left, an interruption)."""
    import dask

    from gpubatch.core.logs import route_library_logs

    dask.config.set({"logging.distributed": "error"})
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in ("distributed", "tornado")]
    for name in ["distributed", "tornado", *names]:
        logging.getLogger(name).setLevel(logging.ERROR)
    route_library_logs(extra=("asyncio",))


@contextmanager
def _quiet_when_gone() -> Iterator[None]:
    """stdout and stderr whose reader may go (``| head -1``, a terminal hung up under ``nohup``):
    what is left to print is dropped, and the command does the rest of its work and exits with
    its own status, never 1 or 141 for the reader's leaving: a run's 0, 3 or 1 says how the run
    went; `status OUT | grep -q finished` under ``set -o pipefail`` is a run that finished.
    Flushed here, where a failure is still caught, not at the interpreter's exit."""
    before = sys.stdout, sys.stderr
    wrapped = [QuietWhenGone(s) if s is not None else None for s in before]
    sys.stdout, sys.stderr = wrapped  # type: ignore[assignment]
    try:
        yield
    finally:
        for stream in wrapped:
            if stream is not None:
                stream.flush()
        sys.stdout, sys.stderr = before


def main(argv: list[str] | None = None) -> int:
    with _quiet_when_gone():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except GpubatchError as exc:
        if isinstance(exc, Terminated):
            ignore_further_signals()
        print(f"gpubatch: {safe_text(exc, keep_newlines=True)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        ignore_further_signals()  # the run stopped in order: more Ctrl-Cs must not end its exit
        print(f"gpubatch: interrupted{INTERRUPTED_HINTS.get(args.command, '')}", file=sys.stderr)
        return EXIT_ERROR


#: what a Ctrl-C leaves to do, per command (``--resume`` means something to run and submit only)
INTERRUPTED_HINTS = {
    "run": "; rerun with --resume to finish", "submit": "; rerun with --resume to finish",
    "ingest": ("; a genome already at the output is as it was on local disk (an object store's is "
               "now incomplete): rerun the ingest"),
    "tune": "; nothing was cached (earlier choices are kept) and the job's output was not touched",
}


if __name__ == "__main__":
    raise SystemExit(main())
