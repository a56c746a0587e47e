"""Cluster profiles, and the executors they start.

Profiles live in configs/*.yaml (``local`` is the default). A profile names a cluster kind:
``local`` (LocalCluster of worker processes), ``local-cuda`` (dask-cuda's LocalCUDACluster: one
worker per GPU with an RMM pool), ``scheduler`` (an existing scheduler by address), ``slurm``
(dask-jobqueue), or ``inline`` (no Dask: shards run in this process, for debugging).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpubatch.core.cpu import quota_cores
from gpubatch.core.cpu import usable_cores as cpu_count
from gpubatch.core.errors import GpubatchError, MissingExtraError, SpecError
from gpubatch.core.memory_limit import gib, usable_memory
from gpubatch.core.plural import counted, plural
from gpubatch.core.threads import made_off_the_main_thread
from gpubatch.core.yaml_text import load_yaml_text
from gpubatch.runtime.borrowed import ENVIRON_LOCK, borrow
from gpubatch.runtime.executors import DaskExecutor, Executor, InlineExecutor

log = logging.getLogger("gpubatch")
_PACKAGE = Path(__file__).resolve().parents[1]
#: a source checkout's configs/, then the copy shipped in the wheel as gpubatch._configs
CONFIG_DIRS = [_PACKAGE.parent / "configs", _PACKAGE / "_configs"]
PROFILE_KEYS = {"cluster", "workers", "threads_per_worker", "memory_limit", "address", "rmm_pool_size",
                "device_memory_limit", "slurm", "resources", "storage", "stage_cache", "range_reader", "description",
                "log_directory", "dashboard"}
#: how long ``submit`` waits to reach an existing scheduler before saying it cannot
SCHEDULER_TIMEOUT_S = 10
#: entries kept in each of the in-process scheduler's low-level logs (Dask's default: 1,000)
SCHEDULER_LOG_LENGTH = 50
#: the smallest ``memory_limit`` a worker can run in: below it, a figure is a unit left out
MIN_MEMORY_LIMIT = 64 << 20
#: where the Dask dashboard listens when a profile says ``dashboard: true``
DASHBOARD_DEFAULT = "127.0.0.1:8787"
#: how long a run waits for the cluster it starts (Dask's own start fails sooner on most errors)
CLUSTER_START_TIMEOUT_S = 300
#: gpubatch's clients are its own: made the process's default, a client took the place of the
#: caller's (a notebook's ``dask.compute`` went to gpubatch's cluster while a run lasted), and
#: Dask's ``wait`` on another thread's run found the latest run's client, not its own
NOT_THE_DEFAULT_CLIENT = {"set_as_default": False}


def load_profile(name_or_path: str) -> dict[str, Any]:
    """A profile by name (configs/NAME.yaml) or by path, validated for known keys."""
    path = Path(name_or_path)
    if not path.suffix:
        for d in [Path(os.environ.get("GPUBATCH_CONFIGS", "/nonexistent")), *CONFIG_DIRS]:
            if (d / f"{name_or_path}.yaml").is_file():
                path = d / f"{name_or_path}.yaml"
                break
    if not path.is_file():
        known = sorted({p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.yaml")})
        raise SpecError([("run.profile", f"no profile {name_or_path!r}; known: {known} or a path to a YAML file")])
    data = load_yaml_text(path.read_text(errors="replace"), str(path)) or {}
    unknown = set(data) - PROFILE_KEYS
    if unknown:
        raise SpecError([(f"profile {path.name}", f"unknown keys {sorted(unknown)}; known: {sorted(PROFILE_KEYS)}")])
    data.setdefault("cluster", "local")
    _check_counts(data, path.name)
    read_memory_limit(data.get("memory_limit"), f"profile {path.name}: memory_limit")  # refused here, named
    return data


def _check_counts(data: dict[str, Any], name: str) -> None:
    """``workers`` (or ``auto``) and ``threads_per_worker`` are whole numbers of at least one:
    ``workers: 0`` or ``-3`` quietly ran one worker, ``1.5`` one, and ``lots`` failed with a
    traceback once the run had planned and prepared its model."""
    problems = []
    for key, auto in (("workers", True), ("threads_per_worker", False)):
        value = data.get(key)
        if value is None or (auto and value == "auto"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append((f"profile {name}: {key}", f"{value!r} is not a whole number of at least 1"
                                                       f"{' (or auto)' if auto else ''}"))
    if problems:
        raise SpecError(problems)


def cores_words() -> str:
    """How ``cpu_count`` was reached, for a message: "2 cores", or "1 core (a CPU quota of 1)"."""
    n, quota = cpu_count(), quota_cores()
    capped = f" (a CPU quota of {quota:g})" if quota and n == max(1, math.ceil(quota)) else ""
    return f"{n} {plural(n, 'core')}{capped}"


def worker_count(profile: dict[str, Any], n_shards: int, override: int | None = None) -> int:
    workers = override or profile.get("workers", "auto")
    if workers == "auto":
        workers = min(cpu_count(), max(n_shards, 1))
    return max(1, int(workers))


def open_executor(profile: dict[str, Any], n_workers: int, scheduler: str | None = None,
                  log_dir: str | None = None, job_name: str | None = None,
                  leave_after_s: float | None = None) -> Executor:
    """The executor for the profile: in-process threads, or a Dask client (on a cluster it starts,
    or on an existing scheduler); closing it closes what it started. ``log_dir``: where a batch
    cluster's worker jobs write their logs; ``job_name``: what they are called (one per output);
    ``leave_after_s``: how long its workers wait on a scheduler that answers nothing (a frozen
    client) before they leave and their jobs end (runtime.orphans)."""
    kind = "scheduler" if scheduler else profile["cluster"]
    if kind == "inline":
        return InlineExecutor(int(profile.get("threads_per_worker", 2)))

    resources = profile.get("resources")
    if kind == "scheduler":
        address = scheduler_address(profile, scheduler)
        if not address:
            raise SpecError([("profile.address", "the scheduler profile needs an address (or --scheduler ADDR)")])
        return _watching(DaskExecutor(connect_scheduler(address), None, resources))
    give_back = borrow(_dask_settings(kind), quiet=kind == "local")  # held while the cluster lives, then the caller's again
    try:
        executor = made_off_the_main_thread(
            lambda: _start_executor(kind, profile, n_workers, resources, log_dir, job_name, leave_after_s),
            DaskExecutor.close, CLUSTER_START_TIMEOUT_S, "gpubatch-cluster-start")
    except BaseException:
        give_back()
        raise
    if executor is None:
        give_back()
        raise GpubatchError(f"the {kind} Dask cluster did not start within {CLUSTER_START_TIMEOUT_S} s "
                            f"({n_workers} worker(s)); run with -v to see Dask's own log of its start")
    executor.on_close = give_back
    return executor


def _watching(executor: DaskExecutor) -> DaskExecutor:
    """The executor, its nannies telling how their workers end (a lost worker named: OOM killer,
    crash), and its workers letting their last heartbeat finish as they close (runtime.heartbeats)."""
    from gpubatch.runtime.heartbeats import finish_heartbeats

    executor.watch_exits()
    finish_heartbeats(executor.client)
    return executor


def _start_executor(kind: str, profile: dict[str, Any], n_workers: int, resources: dict[str, float] | None,
                    log_dir: str | None, job_name: str | None, leave_after_s: float | None) -> DaskExecutor:
    """A Dask client on a cluster this run starts (SLURM, local, local-cuda)."""
    from distributed import Client

    if kind == "slurm":
        from gpubatch.runtime.slurm import start_slurm_cluster

        logs = str(profile.get("log_directory") or log_dir or os.path.abspath("gpubatch-logs"))
        cluster, diagnose = start_slurm_cluster(dict(profile.get("slurm") or {}), n_workers, logs, job_name)
        try:
            client = Client(cluster, **NOT_THE_DEFAULT_CLIENT)
            if leave_after_s:
                from gpubatch.runtime.orphans import LeaveWithoutScheduler

                client.register_plugin(LeaveWithoutScheduler(leave_after_s))
        except BaseException:
            cluster.close()
            raise
        return _watching(DaskExecutor(client, cluster, resources, diagnose, jobs=diagnose))
    try:
        cluster = _start_cluster(kind, profile, n_workers)
    except (GpubatchError, KeyboardInterrupt):
        raise
    except Exception as exc:
        hint = main_guard_hint(exc)
        if hint:
            raise GpubatchError(hint) from None
        raise
    if dashboard_address(profile):
        log.info("Dask dashboard: %s", cluster.dashboard_link)
    try:
        return _watching(DaskExecutor(Client(cluster, **NOT_THE_DEFAULT_CLIENT), cluster, resources))
    except BaseException:
        cluster.close()
        raise


def connect_scheduler(address: str) -> Any:
    """A Dask client on an existing scheduler; an unreachable one is one clear error, not
    Dask's retry loop and traceback.

    The client is made on a helper thread and waited for with a deadline: against a peer that
    accepts the connection but never answers (a firewall, a wrong service), Dask's own timeout
    does not fire and the client would wait forever.
    """
    from distributed import Client

    try:
        client = made_off_the_main_thread(
            lambda: Client(address, timeout=f"{SCHEDULER_TIMEOUT_S}s", **NOT_THE_DEFAULT_CLIENT),
            lambda made: made.close(), SCHEDULER_TIMEOUT_S + 2, "gpubatch-connect")
        why = "no answer"
    except (OSError, TimeoutError, ValueError) as exc:
        client, why = None, type(exc).__name__
    if client is not None:
        return client
    raise GpubatchError(f"cannot reach the Dask scheduler at {address} within {SCHEDULER_TIMEOUT_S} s "
                        f"({why}); check the address (tcp://HOST:PORT, port 8786 by default) and that "
                        "the scheduler is running and reachable from here")


def scheduler_address(profile: dict[str, Any], scheduler: str | None = None) -> str | None:
    """An existing scheduler's address: ``--scheduler``, the profile's ``address``, or
    DASK_SCHEDULER_ADDRESS; None where none is given."""
    return scheduler or profile.get("address") or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def workers_memory_limits(address: str) -> list[int]:
    """The ``memory_limit`` each worker of the scheduler at ``address`` reports (0: none), asked
    over a client of its own, closed after. Raises GpubatchError where the scheduler is not
    reached (in seconds: the port first, then a bounded connection)."""
    from distributed.utils import TimeoutError as DaskTimeout

    check_scheduler_reachable(address)
    client = connect_scheduler(address)
    ask = {"callback_timeout": SCHEDULER_TIMEOUT_S}
    try:  # every worker (n_workers=-1: some releases list 5 by default; older ones take no n_workers)
        try:
            identity = client.sync(client.scheduler.identity, n_workers=-1, **ask)
        except TypeError:
            identity = client.sync(client.scheduler.identity, **ask)
    except (TimeoutError, DaskTimeout, OSError) as exc:
        raise GpubatchError(f"the Dask scheduler at {address} did not list its workers within "
                            f"{SCHEDULER_TIMEOUT_S} s ({type(exc).__name__})") from None
    finally:
        client.close()
    return [int(info.get("memory_limit") or 0) for info in identity.get("workers", {}).values()]


def check_scheduler_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once when nothing listens at a tcp:// scheduler address: before planning and
    model preparation (minutes with int8 calibration), not after Dask's own retries."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname:
        return
    try:
        with socket.create_connection((parts.hostname, parts.port or 8786), timeout=timeout_s):
            pass
    except OSError as exc:
        raise GpubatchError(f"cannot reach the Dask scheduler at {address}: {exc.strerror or exc}; check "
                            "the address (tcp://HOST:PORT, port 8786 by default) and that the scheduler "
                            "is running and reachable from here") from None


def dashboard_address(profile: dict[str, Any]) -> str | None:
    """The Dask dashboard's address when the profile asks for it (``dashboard: true`` or
    ``"host:port"``); None (no dashboard) otherwise."""
    value = profile.get("dashboard", False)
    if value is True:
        return DASHBOARD_DEFAULT
    if not value:
        return None
    return str(value)


def _cluster_http(profile: dict[str, Any]) -> dict[str, Any]:
    """LocalCluster arguments for the dashboard. Off, the scheduler still serves a few HTTP
    routes, on port 8787 unless told otherwise (and warns when that port is taken, as it is
    whenever another Dask runs here): a random loopback port keeps a normal run quiet."""
    address = dashboard_address(profile)
    if address is None:
        return {"dashboard_address": None, "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"}}
    return {"dashboard_address": address}


def _is_main_test(node: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not isinstance(node, ast.Compare) or len(node.comparators) != 1:
        return False
    sides = [node.left, node.comparators[0]]
    return any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides) and \
        any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides)


def main_guard_hint(exc: BaseException) -> str | None:
    """Why worker processes could not start, when the cause is a script without the
    ``if __name__ == "__main__":`` guard: forkserver and spawn workers import the main script
    again, so a script that calls gpubatch.run at its top level starts a run in every worker."""
    import multiprocessing

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    guarded = True
    if path and _mp_method() != "fork":
        try:
            tree = ast.parse(Path(path).read_text())
            guarded = any(isinstance(n, ast.If) and _is_main_test(n.test) for n in tree.body)
        except (OSError, SyntaxError, ValueError):
            guarded = True
    child = "bootstrapping phase" in str(exc) or getattr(multiprocessing.current_process(), "_inheriting", False)
    if guarded and not child:
        return None
    where = f" {path}" if path else " the main script"
    return (f"worker processes could not start:{where} calls gpubatch at its top level, and every worker "
            f"process ({_mp_method()}) imports the main script again. Put the call under "
            "`if __name__ == \"__main__\":` (see the README, 'The Python API'), or use the inline "
            "profile (run.profile: inline), which starts no processes")


#: imported once in the forkserver, so each worker process starts with them loaded: everything a
#: shard imports, the output writers included (imported at a worker's first commit, zarr and pandas
#: took 0.7 s there and added tens of MB after the first shards' memory peak, not before it). Each
#: run starts new workers: a module left out is imported again in every worker of every run, in
#: front of its first shard (the slide openers below took 50 ms of CPU per worker;
#: tests/test_worker_imports.py runs a shard in a process forked from the forkserver)
WORKER_MODULES = ["numpy", "pandas", "onnxruntime", "tifffile", "imagecodecs", "pyarrow.parquet", "zarr", "fsspec",
                  "obstore",  # imported only: its runtime starts at a first request, which the forkserver never makes
                  "simplejpeg", "pyarrow.pandas_compat", "fsspec.implementations.local",
                  "pyarrow.vendored.version",  # imported by pyarrow's pandas shim at its first use
                  "gpubatch.engine.worker", "gpubatch.sources.slides.source", "gpubatch.sources.genome.source", "gpubatch.io.stage_cache",
                  "gpubatch.sources.slides.open", "gpubatch.sources.slides.integrity", "gpubatch.core.logs",
                  "gpubatch.models.onnxruntime", "gpubatch.models.prepare.validate", "gpubatch.outputs.writer"]


def _mp_method() -> str:
    """forkserver on Linux: workers fork from a process that imported everything once, instead of
    each paying seconds of imports (a third of a short run on 2 cores); spawn elsewhere."""
    default = "forkserver" if sys.platform.startswith("linux") else "spawn"
    return os.environ.get("GPUBATCH_MP_METHOD", default)


#: Environment of the worker processes, and of the forkserver they fork from (glibc reads its
#: malloc settings once, at process start, so a forked worker has the forkserver's):
#: - Dask asks glibc to hand freed memory back at 64 KiB; gpubatch's batches are tens of MB,
#:   bounded by configuration, so that only turns every batch allocation into page faults;
#: - setting the trim threshold stops glibc raising its mmap threshold, so every block over
#:   128 KiB (a decoded tile, a read unit's tiles) was a fresh mapping, faulted in and zeroed on
#:   each use: blocks up to 4 MiB stay on the heap (bench/bench_worker_env.py, decode-bound
#:   slides: shards 8% faster, CPU per item 6% lower, 1.5x fewer page faults);
#: - short-lived reader threads each got a malloc arena that kept its freed batches: RSS crept
#:   with the number of shards (see core/memory.py);
#: - pyarrow's default pool (mimalloc) keeps what the first commit used for the life of the worker.
WORKER_ENV = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20), "MALLOC_MMAP_THRESHOLD_": str(4 << 20),
              "MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}


@contextlib.contextmanager
def _worker_environ() -> Iterator[None]:
    """WORKER_ENV in os.environ while a process starts (a user's own settings win)."""
    added = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _ensure_forkserver() -> None:
    """Start the forkserver (once) with the worker modules imported and the worker environment."""
    if _mp_method() != "forkserver":
        return
    from multiprocessing import forkserver

    from distributed.utils import get_mp_context

    with ENVIRON_LOCK, _worker_environ():
        ctx = get_mp_context()  # Dask registers its own preload list first
        ctx.set_forkserver_preload(["distributed", *WORKER_MODULES])
        forkserver.ensure_running()


def start_worker_imports(profile: dict[str, Any]) -> None:
    """Start the forkserver, and with it the worker modules' imports, on a background thread.

    Called at the start of a run: the imports (about a second) then run on another core while this
    process validates, plans and prepares the model, instead of in front of the cluster start.
    """
    if profile.get("cluster") != "local" or _mp_method() != "forkserver":
        return

    def start() -> None:
        with contextlib.suppress(Exception):  # the cluster start will try again and report
            _ensure_forkserver()

    threading.Thread(target=start, name="gpubatch-forkserver", daemon=True).start()


def _dask_settings(kind: str) -> dict[str, Any]:
    """The Dask settings a cluster gpubatch starts runs under (runtime.borrowed sets them while it
    lives: a notebook's own clusters later must not inherit them).

    The scheduler's low-level logs (transitions, events) live in the client process for every
    profile gpubatch starts a scheduler for: at Dask's default of 1,000 entries per log they were
    most of a 1,000-shard run's client memory growth (bench/bench_client.py). Local workers get
    gpubatch's environment, no sampling profiler (it wakes every 10 ms in every worker: not ours
    to pay) and the process start method of ``_mp_method``.
    """
    import distributed  # noqa: F401 - its defaults first: else undoing these settings took them too

    settings: dict[str, Any] = {"distributed.admin.low-level-log-length": SCHEDULER_LOG_LENGTH}
    if kind == "local":
        settings.update({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()})
        settings.update({"distributed.worker.profile.enabled": False,
                         "distributed.worker.multiprocessing-method": _mp_method()})
    return settings


def local_cuda_kwargs(profile: dict[str, Any]) -> dict[str, Any]:
    """dask_cuda.LocalCUDACluster arguments for a local-cuda profile (one worker per visible GPU).

    Only the settings the profile gives are passed, so dask-cuda's own defaults hold for the rest:
    ``device_memory_limit=None`` is not "the default" there but "never spill" (the default is
    "default", 80% of the device). ``rmm_pool_size`` reserves that much of each GPU for RMM when the
    worker starts; CuPy (the device stage's buffers and kernels) allocates from that pool only when
    told to (``rmm_allocator_external_lib_list``), so a pool routes CuPy into it rather than leaving
    CuPy the remainder beside a reserved pool nothing of gpubatch's uses.
    """
    kwargs: dict[str, Any] = {
        "threads_per_worker": int(profile.get("threads_per_worker", 1)),
        "resources": profile.get("resources", {"GPU": 1}),
        **_cluster_http(profile),
    }
    for key in ("rmm_pool_size", "device_memory_limit", "memory_limit"):
        if profile.get(key) is not None:
            kwargs[key] = profile[key]
    if "rmm_pool_size" in kwargs:
        _require_rmm()
        kwargs["rmm_allocator_external_lib_list"] = ["cupy"]
    return kwargs


def _require_rmm() -> None:
    """A pool is RMM's: dask-cuda does not install it (nor does the gpu extra), and without it
    LocalCUDACluster refuses to start with "RMM pool or managed memory requested but module 'rmm'
    is not available"; say which profile key asks for it and the two ways out."""
    import importlib.util

    if importlib.util.find_spec("rmm") is None:
        raise GpubatchError("profile.rmm_pool_size needs RMM, which is not installed (dask-cuda does not "
                            "install it): pip install rmm-cu12, or remove rmm_pool_size from the profile")


def effective_memory() -> tuple[int, str]:
    """The memory a local cluster's workers share, and where the figure comes from: this process's
    (core.memory_limit: the tightest cgroup over it and its ancestors, or the RAM), or Dask's own
    figure where that is lower (it also counts RLIMIT_RSS and the top cgroup's soft limits)."""
    from distributed.system import MEMORY_LIMIT

    usable = usable_memory()
    if usable.total and usable.total <= MEMORY_LIMIT:
        return usable.total, usable.said
    return int(MEMORY_LIMIT), "Dask's system memory limit"


def read_memory_limit(given: Any, key: str = "profile memory_limit") -> float | int | str | None:
    """A profile's ``memory_limit`` read as Dask reads it, one way for every reader (the nannies'
    limit, the worker budget ``validate`` checks): ``"auto"``; None (no limit); a fraction in
    (0, 1] of the usable memory, written as a number or a string (Dask takes ``"0.25"`` as a
    fraction too); or bytes (``"4GB"``, a whole number over 1; 0 is no limit). Anything else is
    refused naming ``key`` (a SpecError): a negative figure, a fraction over 1 (``1.5`` was 1 byte
    to Dask), bytes under MIN_MEMORY_LIMIT (``2``, meant as 2 GB, is 2 bytes to Dask), a string no unit reads (``parse_bytes("0.25")`` is 0, which sent the budget check
    back to the memory over the workers while the nannies held each worker to a quarter)."""
    from dask.utils import parse_bytes

    if given is None or given == "auto":
        return given
    fix = 'use auto, a fraction of the usable memory such as 0.25, or bytes such as "4GB"'
    if isinstance(given, bool):
        raise SpecError([(key, f"{given!r} is not a memory limit; {fix}")])
    try:
        number = float(given)
    except (TypeError, ValueError):
        number = None
    if number is None:
        try:
            number = float(parse_bytes(given))
        except (TypeError, ValueError):
            raise SpecError([(key, f"{given!r} is not a memory limit; {fix}")]) from None
        if number >= 0:
            return _not_too_small(given, int(number), key)
    if not math.isfinite(number):
        raise SpecError([(key, f"{given!r} is not a memory limit; {fix}")])
    if number < 0:
        raise SpecError([(key, f"{given!r} is negative; {fix}")])
    if number > 1 and not number.is_integer():
        raise SpecError([(key, f"{given!r} is a fraction over 1 (the whole memory is 1); {fix}")])
    return number if 0 < number <= 1 else _not_too_small(given, int(number), key)


def _not_too_small(given: Any, limit: int, key: str) -> int:
    """``limit`` bytes, refused (naming ``key``) where no worker could run in them: Dask reads a
    bare whole number as bytes, so ``memory_limit: 2`` (meant as 2 GB) held each worker to 2
    bytes and its nanny paused and killed it at once. 0 is no limit."""
    if limit == 0 or limit >= MIN_MEMORY_LIMIT:
        return limit
    if isinstance(given, str) and not given.strip().isdigit():  # a unit, and a figure too small
        said, fix = "", "write at least '64MiB', e.g. '4GB'"
    else:
        said = " (a number without a unit is bytes, as Dask reads it)"
        fix = f"write '{limit}GB'" if limit < 64 else f"write '{limit}MB' or '{limit}GB', as meant"
    raise SpecError([(key, f"{given!r} is {counted(limit, 'byte')}{said}, under the {gib(MIN_MEMORY_LIMIT)} "
                           f"a worker needs; {fix}")])


def nanny_memory_limit(given: Any, n_workers: int) -> Any:
    """The ``memory_limit`` each worker's nanny of a local cluster enforces (pausing, spilling,
    restarting the worker past it).

    Dask's ``"auto"`` (and a fraction) starts from distributed.system, which reads only the top
    cgroup's files: in a nested cgroup (a SLURM job's, a Kubernetes pod's container) each worker's
    limit came from the node's RAM, and the kernel's OOM killer ended the whole job before any
    nanny acted; and ``"auto"`` handed to LocalCluster reaches each nanny as is, where it is the RAM
    times threads over cores (the local profile's 2 threads per worker, a worker per core: the RAM
    twice over in all). ``"auto"`` is therefore the effective memory over the workers, as Dask's
    LocalCluster gives when it picks the limit itself, from the right total; a fraction (``0.25``) is of the effective memory; bytes (``"4GB"``),
    0 and None (no limit) go to Dask as given. Read by :func:`read_memory_limit`.
    """
    limit = read_memory_limit(given)
    if limit is None or isinstance(limit, int):
        return given
    total, said = effective_memory()
    if isinstance(limit, float):
        fraction_limit = int(total * limit)
        log.info("each worker may hold %s: memory_limit %g of %s", gib(fraction_limit), limit, said)
        return fraction_limit
    share = total // max(n_workers, 1)
    log.info("each worker may hold %s: %s over %d %s", gib(share), said, n_workers, plural(n_workers, "worker"))
    return share


def _start_cluster(kind: str, profile: dict[str, Any], n_workers: int) -> Any:
    if kind == "local":
        from distributed import LocalCluster

        _ensure_forkserver()

        return LocalCluster(
            n_workers=n_workers, threads_per_worker=int(profile.get("threads_per_worker", 1)),
            processes=True, memory_limit=nanny_memory_limit(profile.get("memory_limit", "auto"), n_workers),
            silence_logs=40, **_cluster_http(profile),
        )
    if kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
            from dask_cuda.utils import get_n_gpus
        except ImportError:
            raise MissingExtraError("the local-cuda profile", "dask-cuda", "gpu") from None
        kwargs = local_cuda_kwargs(profile)  # one worker per visible GPU, as LocalCUDACluster counts them
        kwargs["memory_limit"] = nanny_memory_limit(profile.get("memory_limit", "auto"), get_n_gpus())
        return LocalCUDACluster(**kwargs)
    raise SpecError([("profile.cluster", f"unknown cluster kind {kind!r}; use local, local-cuda, scheduler, slurm "
                                         "or inline")])
