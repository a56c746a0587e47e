"""What a worker holds in flight, against the memory it has: refused before anything runs.

Memory is bounded by configuration, never by input size, so the bound can be computed from the spec and
the profile alone. A worker runs ``slots`` shards at once; each shard's pipeline holds up to
``run.readers + 1`` read units (decoded tiles, a genome chunk and its windows), ``run.prefetch_batches``
ready batches (uint8) and two float copies of a batch; a streamed slide fetches up to
``input.read_ahead_mb`` of tile bytes ahead, for every slide the worker has open (those running and
those opened ahead, ``run.stage_ahead``). Only the batches were counted: ``run.readers: 256`` with
``tiles.overlap: 0.95`` (each read unit up to ``tiles.max_read_bytes``, 256 MiB) validated, and held
64 GiB of read units in each pipeline. Both ``validate`` and ``run`` refuse a sum over the worker's
memory (exit 2), naming the key that holds most of it; a reduced precision's calibration and
validation items, held on the client, are checked against the client's memory the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubatch.core.errors import GpubatchError
from gpubatch.core.memory_limit import gib, usable_memory
from gpubatch.io.uris import is_remote
from gpubatch.sources import get_source
from gpubatch.spec import JobSpec

log = logging.getLogger("gpubatch")
#: the share of the client's memory a reduced precision's calibration and validation items may
#: hold (the fp32 and reduced models' sessions and the plan share the rest)
SAMPLE_SHARE = 0.5


def _either(keys: tuple[str, ...], word: str) -> str:
    """``a, b or c`` (word: or, and)."""
    return f"{', '.join(keys[:-1])} {word} {keys[-1]}" if len(keys) > 1 else "".join(keys)


def workers_asked(job: JobSpec, prof: dict[str, Any]) -> int | None:
    return job.run.workers or (prof.get("workers") if isinstance(prof.get("workers"), int) else None)


def worker_slots(prof: dict[str, Any]) -> int:
    """Shards one worker runs at once: its threads (the in-process executor runs 2 by default),
    one where shards claim a resource such as a GPU, a SLURM job's cores over its processes."""
    cluster, threads = prof.get("cluster"), prof.get("threads_per_worker")
    if prof.get("resources"):
        return 1
    if isinstance(threads, int) and threads >= 1:
        return threads
    if cluster == "slurm":
        slurm = prof.get("slurm") or {}
        cores, processes = slurm.get("cores"), slurm.get("processes") or 1
        return max(1, cores // processes) if isinstance(cores, int) and isinstance(processes, int) else 1
    return 2 if cluster == "inline" else 1


def worker_memory_budget(job: JobSpec, prof: dict[str, Any]) -> tuple[int, str]:
    """Bytes one worker may hold in flight, and what set the figure (0: unknown): the spec's
    ``run.max_worker_memory``; else the machine's memory over its workers, or less where the
    profile limits a worker (a local cluster's ``memory_limit``, which its nanny enforces by
    killing the worker; a SLURM job's ``memory`` over its ``processes``). The machine's memory is
    its cgroup's limit where that is lower (``core.memory_limit``): in a container the RAM is the
    node's, and a budget sized on it met the OOM killer instead of this check."""
    from gpubatch.runtime.cluster import cpu_count

    if job.run.max_worker_memory:
        return job.run.max_worker_memory, "run.max_worker_memory"
    local = prof.get("cluster") in ("local", "local-cuda")
    workers = workers_asked(job, prof) or (1 if not local else cpu_count())
    usable = usable_memory()
    share = usable.total // max(workers, 1)
    which = f"{usable.said} over {workers} workers" if workers > 1 else usable.said
    if prof.get("cluster") == "scheduler":
        return _scheduler_budget(prof, share, which)
    limit, said = _profile_limit(prof)
    if limit and (prof.get("cluster") == "slurm" or not share or limit < share):
        return limit, said
    return share, which


def _scheduler_budget(prof: dict[str, Any], client_share: int, client_said: str) -> tuple[int, str]:
    """An existing scheduler's workers run on their own hosts: the smallest ``memory_limit`` its
    workers report (what their nannies enforce). The client's memory (``client_share``, a login
    node's, a laptop's) was the budget, passing what no worker could hold; it is the fallback only
    where no worker reports a limit, the scheduler is not reached, or no address is given."""
    from gpubatch.runtime.cluster import scheduler_address, workers_memory_limits

    address = scheduler_address(prof)
    limits: list[int] = []
    if address is None:
        why = "no scheduler address is given"
    else:
        try:
            limits = workers_memory_limits(address)
            why = "no worker is connected" if not limits else "its workers report no memory_limit"
        except GpubatchError as exc:
            why = f"the scheduler did not answer: {exc}"
    reported = [limit for limit in limits if limit > 0]
    if reported:
        said = (f"the smallest memory_limit the scheduler's workers report ({len(reported)} of "
                f"{len(limits)} report one)")
        budget = min(reported)
    else:
        said, budget = f"{client_said}, the client's, as {why}", client_share
    log.info("a worker's memory budget: %s, %s", gib(budget) if budget else "unknown", said)
    return budget, said


def _profile_limit(prof: dict[str, Any]) -> tuple[int, str]:
    """A worker's memory as the profile limits it (0 where it does not, or says it unreadably).
    A local cluster's ``memory_limit`` is read as its nannies read it (cluster.read_memory_limit):
    a fraction of the same effective memory, so the budget checked is the limit enforced."""
    from dask.utils import parse_bytes

    from gpubatch.runtime.cluster import effective_memory, read_memory_limit

    if prof.get("cluster") != "slurm":
        limit, said = read_memory_limit(prof.get("memory_limit")), "the profile's memory_limit"
        if isinstance(limit, float):
            return int(limit * effective_memory()[0]), said
        return (limit, said) if isinstance(limit, int) else (0, said)
    slurm = prof.get("slurm") or {}
    given, processes = slurm.get("memory"), slurm.get("processes") or 1
    said, per = "the profile's slurm.memory / slurm.processes", max(int(processes), 1)
    try:
        if isinstance(given, str) and given != "auto":
            return int(parse_bytes(given)) // per, said
        if isinstance(given, (int, float)) and not isinstance(given, bool) and given > 0:
            return int(given * usable_memory().total if given <= 1 else given) // per, said
    except (ValueError, TypeError):
        pass
    return 0, said


@dataclass(frozen=True)
class InFlight:
    """What one worker holds at most, in bytes, by part."""

    slots: int
    batch: int  # one model input batch
    batches: float  # a pipeline's batches: prefetched (uint8) and two float copies
    unit: int  # one read unit
    units: int  # a pipeline's read units: run.readers + 1
    read_ahead: int  # the worker's streamed slides' bytes fetched ahead, all of them

    @property
    def parts(self) -> dict[str, float]:
        """Bytes by the key that sets them."""
        return {"model.batch_size": self.slots * self.batches, "run.readers": self.slots * self.units,
                "input.read_ahead_mb": self.read_ahead}

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def batch_bytes(job: JobSpec, batch_size: int) -> tuple[int, float]:
    """(the model input's bytes, what one pipeline holds of such batches in flight)."""
    shape, dtype = get_source(job.kind).model_input(job, batch_size)
    batch = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    # queued batches travel as uint8 (a quarter of the float input), two float copies at once
    return batch, batch * (job.run.prefetch_batches / 4 + 2)


def in_flight(job: JobSpec, prof: dict[str, Any], batch_size: int) -> InFlight:
    slots = worker_slots(prof)
    batch, batches = batch_bytes(job, batch_size)
    unit = get_source(job.kind).read_unit_bytes(job)[0]
    return InFlight(slots, batch, batches, unit, unit * (job.run.readers + 1), _read_ahead(job, slots))


def _read_ahead(job: JobSpec, slots: int) -> int:
    """Bytes a worker's streamed slides may fetch ahead: only remote slides are streamed, and
    ``access: stage`` downloads them whole instead (into the stage cache, on disk)."""
    remote = any(is_remote(uri.removeprefix("glob:")) for uri in job.input.uris)
    if job.kind != "slides" or not remote or job.input.access == "stage":
        return 0
    return (job.input.read_ahead_mb << 20) * (slots + job.run.stage_ahead)


def memory_problem(job: JobSpec, prof: dict[str, Any]) -> tuple[str, str] | None:
    """The key and the words of a worker's in-flight memory over its budget; None when it fits.
    For ``batch_size: auto`` the smallest batch the tuner can choose is counted."""
    budget, which = worker_memory_budget(job, prof)
    batch_size = job.model.batch_size if isinstance(job.model.batch_size, int) else 1
    held = in_flight(job, prof, batch_size)
    if not budget or held.total <= budget:
        return None
    parts = held.parts
    key = max(parts, key=lambda k: parts[k])
    fewer = ", or run fewer workers (run.workers)" if which.endswith(" workers") else ""
    return key, (f"{_lead(job, held, key, batch_size)}; a worker holds about {gib(held.total)} "
                 f"({_breakdown(held)}), over its {gib(budget)} ({which}); lower {_fixes(job, key)}{fewer}")


def _lead(job: JobSpec, held: InFlight, key: str, batch_size: int) -> str:
    """What the key's own figure is, in its terms."""
    if key == "model.batch_size":
        items = "item makes" if batch_size == 1 else "items make"
        return (f"{batch_size} {items} a {gib(held.batch)} model input, with run.prefetch_batches "
                f"{job.run.prefetch_batches}")
    if key == "run.readers":
        keys = get_source(job.kind).read_unit_bytes(job)[1]
        return (f"{job.run.readers + 1} read units in flight (run.readers {job.run.readers}, and one more) "
                f"of up to {gib(held.unit)} each (set by {_either(keys, 'and')})")
    return (f"streamed slides fetch up to {job.input.read_ahead_mb} MiB ahead (input.read_ahead_mb) for each of "
            f"the {held.slots + job.run.stage_ahead} slides a worker has open (run.stage_ahead included)")


def _breakdown(held: InFlight) -> str:
    names = {"model.batch_size": "batches", "run.readers": "read units", "input.read_ahead_mb": "read ahead"}
    said = ", ".join(f"{gib(v)} {names[k]}" for k, v in held.parts.items() if v)
    return said + (f", for {held.slots} shards at once" if held.slots > 1 else "")


def _fixes(job: JobSpec, key: str) -> str:
    if key == "model.batch_size":
        size = "tiles.size" if job.kind == "slides" else "windows.length"
        return f"model.batch_size, {size} or run.prefetch_batches"
    if key == "run.readers":
        return _either(("run.readers", *get_source(job.kind).read_unit_bytes(job)[1]), "or")
    return "input.read_ahead_mb or run.stage_ahead"


def largest_batch_in_memory(job: JobSpec, prof: dict[str, Any]) -> tuple[int | None, str]:
    """The largest batch size ``memory_problem`` lets a worker hold, and what sets it (None: no
    limit known): a tuned batch size must be one that validate would pass as a fixed one."""
    budget, which = worker_memory_budget(job, prof)
    if not budget:
        return None, which
    one = in_flight(job, prof, 1)
    room = budget - one.parts["run.readers"] - one.read_ahead
    return max(1, int(room // (one.slots * one.batches))), which


def sample_problem(job: JobSpec) -> tuple[str, str] | None:
    """A reduced precision draws ``model.calibration.items`` and ``model.validation.items`` from
    the job's inputs into the client's memory (uint8 and model-ready copies): ``items: 1000000``
    of 224 px tiles asked for 700 GiB there, found only by the OOM killer after planning."""
    if job.model.precision == "fp32":
        return None
    counts = {"model.calibration.items": job.model.calibration.items,
              "model.validation.items": job.model.validation.items}
    shape, dtype = get_source(job.kind).model_input(job, 1)
    item = int(np.prod(shape, dtype=np.float64)) * (np.dtype(dtype).itemsize + 1)
    usable = usable_memory()
    held, budget = sum(counts.values()) * item, int(usable.total * SAMPLE_SHARE)
    if not budget or held <= budget:
        return None
    key = max(counts, key=lambda k: counts[k])
    from dask.utils import format_bytes

    return key, (f"{counts['model.calibration.items']} calibration and {counts['model.validation.items']} "
                 f"validation items hold about {gib(held)} on the client ({format_bytes(item)} an item, raw "
                 f"and model-ready), over half its memory ({gib(budget)}, half {usable.said}); lower {key} (a few hundred "
                 "items calibrate and grade a model well)")
