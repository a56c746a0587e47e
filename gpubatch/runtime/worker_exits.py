"""How a worker process ended, told to the scheduler by its nanny, so that a lost worker is named.

A worker killed by the kernel's OOM killer, or by a SLURM job's memory cgroup, leaves no event
behind: its nanny logs "Worker process N was killed by signal 9" to its own log (on the worker's
host, silenced in most deployments) and starts another, and the run recorded the loss as
"worker lost", the same words as a host that vanished. Overnight, the operator could not tell
a batch too large for the machine from a flaky node. :class:`WorkerExits` is a nanny plugin that
logs each worker process's exit code to the scheduler's ``gpubatch-worker-exit`` topic, where
:func:`exit_cause` turns it into words with the fix.

It hooks the nanny's exit callback (``Nanny._on_worker_exit_sync``, and the running process's
``on_exit``), which distributed does not publish as an interface: where they are absent (another
distributed), the plugin does nothing and losses stay unexplained, as before.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from distributed.diagnostics.plugin import NannyPlugin

log = logging.getLogger("gpubatch")

EXIT_TOPIC = "gpubatch-worker-exit"
_HOOKED = "_gpubatch_exits_hooked"


class WorkerExits(NannyPlugin):
    """On each nanny: log ``{"worker": address, "exitcode": code}`` when its worker process ends."""

    idempotent = True  # registered once per scheduler; a second run's registration is ignored
    name = "gpubatch-worker-exits"

    def setup(self, nanny: Any) -> None:
        original = getattr(nanny, "_on_worker_exit_sync", None)
        if original is None or getattr(nanny, _HOOKED, False):
            return

        def on_exit(exitcode: int) -> None:
            try:
                worker = getattr(nanny.process, "worker_address", None) or nanny.worker_address
                nanny.log_event(EXIT_TOPIC, {"worker": worker, "exitcode": int(exitcode)})
            except Exception:  # noqa: BLE001 - telling is best effort; the restart below must happen
                log.debug("could not log a worker's exit", exc_info=True)
            original(exitcode)

        nanny._on_worker_exit_sync = on_exit  # the callback of the processes the nanny starts next
        if getattr(nanny, "process", None) is not None and hasattr(nanny.process, "on_exit"):
            nanny.process.on_exit = on_exit  # and of the one running now
        setattr(nanny, _HOOKED, True)


def exit_cause(events: Any, worker: str | None) -> str | None:
    """Words for how ``worker`` (None: any worker) last ended, from the topic's events; None where
    no event names it or it exited cleanly."""
    for _, event in reversed(list(events or ())):
        if not isinstance(event, dict) or (worker is not None and event.get("worker") != worker):
            continue
        code = event.get("exitcode")
        return exit_words(int(code)) if isinstance(code, int) and code != 0 else None
    return None


def exit_words(exitcode: int) -> str:
    """The cause, and what to check or change, of a worker process's exit code (negative: the
    signal that killed it)."""
    if exitcode == -signal.SIGKILL:
        return ("its process was killed by signal 9 (SIGKILL) from outside Dask: most often the kernel's OOM "
                "killer or a memory cgroup (a SLURM job's --mem) when its host ran out of memory; "
                "`dmesg -T | grep -i oom` on its host, or `sacct -j JOBID -o State,MaxRSS`, says which; "
                "if so, lower model.batch_size or run.prefetch_batches, or give the workers more memory")
    if exitcode == -signal.SIGSEGV or exitcode == -signal.SIGBUS or exitcode == -signal.SIGABRT:
        name = signal.Signals(-exitcode).name
        return (f"its process crashed ({name}) in native code: a decoder or the model's runtime; its shards "
                "are run again, and if the same input crashes a worker each time, that input is the cause")
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        return f"its process was killed by signal {-exitcode} ({name})"
    return f"its process exited with status {exitcode}"
