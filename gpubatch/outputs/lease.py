"""Whose output this is: the folder guard (marker) and the lease of the run writing it now.

Two runs writing one output would both compute every shard and mix their files; a run pointed
at a folder that is not gpubatch's (``/``, a home folder, a project directory) could overwrite
or sweep files it never wrote. So: an output is a folder that is empty or holds gpubatch's
marker, and a run holds a lease on it (owner host and pid, a heartbeat refreshed while it
runs). A second run into a held output stops with exit 2 naming the holder; a lease whose
heartbeat stopped (the holder was killed) goes stale after ``run.lease_stale_s`` and is taken
over. On disk a free output's lease is created atomically (a hard link that fails if it exists).
On S3, Azure Blob and Google Cloud Storage (``s3://``, ``az://``, ``abfs://``, ``gs://``: the
stores whose conditional requests are reached, outputs.conditional) it is created with a
conditional write (``If-None-Match: *``; on GCS ``ifGenerationMatch=0``) and a stale one replaced
only if it is still the version read (``If-Match`` on its ETag; on GCS ``ifGenerationMatch`` on
its generation): write, wait, read back, which is all a store without conditions allows (other
fsspec stores), let two runs through when one's write was held in flight past the other's
read-back (a stalled or retried request), and both computed every shard. The read-back stays
after a conditional write too, for servers that ignore the condition.

Holding it is conditional too on those stores: each heartbeat, and the delete at the end, is
made on the version this run last wrote. A run suspended (a laptop asleep, SIGSTOP, a paused
VM) between a heartbeat's read of its lease and the write after it, or between its release's
read and its delete, woke to replace or delete the lease a successor had taken over meanwhile,
and both runs wrote one output; now that write is refused and the run stops as one whose lease
was taken over. On disk no compare-and-swap of a file's contents exists, so a heartbeat there
never writes contents: it reads the lease (still this run's?) and then sets the file's
modification time, the beat readers take as the holder's last (``last_beat``). A run suspended
between the two wakes to touch its successor's lease, which only refreshes a live run's beat;
its next heartbeat reads the successor's record and it stops. (It rewrote the record, taking
the lease back, and a successor's run stopped instead, or both wrote.) Its release sets the file aside (a
rename) and deletes what it set aside only if that is its own record: another run's is put back. On object stores without
conditions the heartbeat still reads, then writes.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpubatch.core.errors import GpubatchError, SpecError
from gpubatch.io.redact import redact
from gpubatch.outputs.layout import LEASE, MARKER, TMP_PREFIX
from gpubatch.outputs.store import OutputStore

log = logging.getLogger("gpubatch")
CONFIRM_S = 0.3  # time between writing a lease and reading it back
ABSENT_RECHECK_S = 0.2  # on disk, the second look at a lease found missing


class LeaseLost(GpubatchError):
    """Another writer took this one's lease over (its heartbeat was late past lease_stale_s)."""


def guard_output(store: OutputStore, given: str) -> None:
    """Refuse an output that is not a folder of gpubatch's own (or empty, or new); mark it ours."""
    if check_output_folder(store, given):
        return
    store.write_json(MARKER, {"created": time.time(), "by": "gpubatch"})


def check_output_folder(store: OutputStore, given: str) -> bool:
    """Refuse (SpecError, exit 2) an output that is no place for gpubatch to write, writing
    nothing: ``validate`` refuses what ``run`` would. True when the folder already holds
    gpubatch's marker, False when it is empty or new (``guard_output`` then marks it)."""
    if given.strip() in ("", ".", "./") or (not store.remote and _too_broad(Path(store.uri))):
        raise SpecError([("output.uri", f"{given!r} is not a folder gpubatch may write into: give a "
                                        "dedicated output folder, e.g. results/<job name>")])
    if not store.remote and store.exists() and not Path(store.uri).is_dir():
        raise SpecError([("output.uri", f"{store.uri} is a file, not a folder")])
    if store.exists(MARKER):
        return True
    if not _empty_or_being_marked(store):
        raise SpecError([("output.uri", f"{redact(store.uri)} holds files that gpubatch did not write "
                                        f"(no {MARKER} marker); give an empty or new folder")])
    return False


def _empty_or_being_marked(store: OutputStore) -> bool:
    """Whether the folder is empty, or holds nothing but the marker another run is writing this
    instant (its temporary name, renamed to the marker next): two runs started at once on a new
    output, the second refused as if the folder held a user's files ("holds files that gpubatch
    did not write") instead of by the lease, which says which run is writing it."""
    return all(name.startswith(TMP_PREFIX) and name.endswith(f"-{MARKER}") for name in store.listdir())


def _too_broad(path: Path) -> bool:
    resolved = path.resolve()
    return resolved == Path(resolved.anchor) or resolved == Path.home().resolve()


class Lease:
    """The lease of one run on one output; ``hold`` refreshes it (and any extra heartbeat work)
    on a thread until ``release``.

    ``name`` is the lease file in ``store`` (a run's lives inside its output; another writer,
    such as ``gpubatch ingest genome``, keeps one per output in the folder beside it), and a
    subclass words its own refusal (``_refusal``)."""

    def __init__(self, store: OutputStore, run_id: str, stale_s: float, heartbeat_s: float,
                 name: str = LEASE):
        self.store, self.run_id, self.name = store, run_id, name
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.owner = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beat: Callable[[], None] | None = None
        #: the lease another writer took over from this one (then this one stops writing); {}
        #: when the lease is gone and who took it is not known
        self.lost: dict[str, Any] | None = None
        #: S3 and Azure Blob: the ETag of the lease as this run last wrote (or read) it, GCS: its
        #: generation, on which its next write and its delete are conditioned; None on stores
        #: without conditional writes
        self._version: str | None = None

    def _record(self) -> dict[str, Any]:
        return {**self.owner, "heartbeat": time.time(), "stale_after_s": self.stale_s}

    def acquire(self) -> None:
        """Take the lease, or raise ``_refusal``'s error (exit 2) naming the writer that holds it."""
        if self.store.conditional:
            created = self._write_if(None)
        else:
            created = self.store.create_json(self.name, self._record())
        if created and not self.store.remote:
            return  # created where none was: no other run can hold it, nothing to wait for
        if not created:
            self._take_over()
        # read back after a while: a server that ignored a condition (or a store without them,
        # where the last write wins) shows here which of two writers holds the lease
        time.sleep(CONFIRM_S)
        now = self._read()
        if now is None or now.get("run_id") != self.run_id:
            raise self._refusal(now or {}, 0.0)

    def _take_over(self) -> None:
        """Write this run's lease over one that is there: refused while its holder is live; a
        stale one (its holder killed or suspended) is replaced only if it is still the version
        read (If-Match on S3 and Azure Blob, ifGenerationMatch on GCS), so of two runs replacing
        it at once one gets it, the other stops."""
        version = self.store.version(self.name)  # before the read: a later write fails the match
        held = self._read()
        if held is not None and held.get("run_id") != self.run_id:
            age = time.time() - last_beat(self.store, held, self.name)
            if age < float(held.get("stale_after_s", self.stale_s)) and not _dead_here(held):
                raise self._refusal(held, age)
            log.warning("taking over a stale lease on %s: run %s on %s (pid %s) last beat %.0f s ago",
                        redact(self.store.uri), held.get("run_id"), held.get("host"), held.get("pid"), age)
        replaced = self._write_if(version)
        if replaced is None:
            self.store.write_json(self.name, self._record())
        elif not replaced:  # another writer's lease landed since it was read: that writer holds it
            now = self._read() or {}
            if now.get("run_id") != self.run_id:
                raise self._refusal(now, time.time() - last_beat(self.store, now, self.name, time.time()))

    def _write_if(self, version: str | None) -> bool | None:
        """Write this run's record only if the lease is still at ``version`` (None: only if there
        is none), keeping the ETag written: True when written, False when refused (another
        object is there, or none is), None where the store has no conditional writes."""
        if not self.store.conditional:
            return None
        written = self.store.put_json_if(self.name, self._record(), version)
        if written is not None:
            self._version = written
        return written is not None

    def _refusal(self, held: dict[str, Any], age: float) -> GpubatchError:
        """The error (exit 2) that stops a writer finding ``held`` live on the output."""
        return SpecError([("output.uri", _held_message(held, age, self.stale_s))])

    def hold(self, beat: Callable[[], None] | None = None) -> None:
        """Refresh the lease every ``heartbeat_s`` on a daemon thread, calling ``beat`` too.
        Call it as soon as the lease is taken: whatever precedes the work (a resume's checks, a
        model's quantization) can outlast ``stale_s``, and an unbeaten lease is taken over."""
        self._beat = beat

        def loop() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    if not self._refresh():
                        return  # beating on would take the output back from the run that has it
                    if self._beat is not None:
                        self._beat()
                except Exception as exc:  # noqa: BLE001 - a missed beat is logged, not fatal
                    log.warning("heartbeat failed: %s", redact(str(exc)))

        # in the run's context: its output calls retry under the run's policy (io.retry.run_policy)
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,),
                                        name="gpubatch-heartbeat", daemon=True)
        self._thread.start()

    def _refresh(self) -> bool:
        """One heartbeat: False (and ``lost`` set) once another writer holds the lease. The read
        first sees a take-over on every store. On S3, Azure Blob and GCS this run's record is
        then written, conditional on the version this run last wrote, which closes the gap
        between that read and the write (a process suspended there). On disk the file is
        touched, never rewritten: a file's contents have no compare-and-swap (a rename replaces
        whatever is there), and a lock held by a suspended run would stop its successor; a
        touch that lands on a successor's lease only refreshes it."""
        if self._taken_over():
            return False
        if not self.store.remote:
            self.store.touch(self.name)
            return True
        written = self._write_if(self._version)
        if written is None:
            self.store.write_json(self.name, self._record())
            return True
        return written or self._still_ours()

    def _still_ours(self) -> bool:
        """After a refused heartbeat: whether the lease is still this run's (a retried write
        that had landed meets its own newer version: that version is taken as this run's), or
        lost (another writer's, or gone)."""
        version = self.store.version(self.name)  # before the read: a later write is not taken for ours
        held = self._read()
        if held is not None and held.get("run_id") == self.run_id:
            self._version = version
            return True
        self._lose(held or {})
        return False

    def _taken_over(self) -> bool:
        """Whether this run no longer holds the lease: another writer's is there (this one's
        heartbeat was late past ``stale_s``: a suspended process, storage that kept failing),
        or none is. A missing lease is lost on every store: on disk the heartbeat used to write
        it back, so a run suspended until the run that took it over had finished and released
        it woke to hold the output again, and its end swept that run's commits as attempts no
        commit of its own named. A read that fails raises: a missed beat, not a loss."""
        held = self._holder_now()
        if held is not None and held.get("run_id") == self.run_id:
            return False
        self._lose(held or {})
        return True

    def _holder_now(self) -> dict[str, Any] | None:
        """The lease's record now, None when there is none ({} for one that is not a record)."""
        if not self._lease_exists():
            return None
        data = self.store.read_json(self.name)
        return data if isinstance(data, dict) else {}

    def confirm(self) -> None:
        """Raise LeaseLost unless the lease is this run's now, read from the store. The run's
        end sweeps what its own commits do not name and writes the output's files; the flag
        ``check`` reads is set by the heartbeat thread, and a process continued after a
        suspension (SIGCONT) ran its end before that thread had looked: it merged, swept and
        finished (exit 0) over the run that had taken it over."""
        if self.lost is None:
            self._taken_over()
        self.check()

    def _lose(self, held: dict[str, Any]) -> None:
        if self.lost is not None:  # the heartbeat and confirm() may both find it
            return
        self.lost = held
        if held:
            log.error("run %s took the lease on %s over; this run stops", held.get("run_id", "?"),
                      redact(self.store.uri))
        else:
            log.error("the lease on %s is gone; this run stops", redact(self.store.uri))

    def lost_message(self) -> str:
        held = self.lost or {}
        who = (f"run {held.get('run_id', '?')} on host {held.get('host', '?')} (pid {held.get('pid', '?')}) "
               "holds its lease" if held else
               "its lease is gone (released by the run that took it over, or removed), holder unknown")
        return (f"another run took this output over: {who}, because this one's heartbeat was late by "
                f"more than {self.stale_s:g} s (run.lease_stale_s; was this process suspended?). This run "
                "stops and leaves the output to it; what this run committed stands")

    def check(self) -> None:
        """Raise LeaseLost once another writer has taken the lease over."""
        if self.lost is not None:
            raise LeaseLost(self.lost_message())

    def also_beat(self, beat: Callable[[], None]) -> None:
        """From now on each heartbeat calls ``beat`` too (e.g. status.json, once there is one)."""
        self._beat = beat

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        if not self.store.remote:
            self._release_on_disk()
            return
        held = self._read()
        if held is None or held.get("run_id") != self.run_id:
            return
        if self._version is None:  # no conditional delete here: the read above is the check
            self.store.delete(self.name)
        elif not self.store.delete_if(self.name, self._version):  # a successor's since the read
            log.info("the lease on %s is no longer this run's version; left as it is", redact(self.store.uri))

    def _release_on_disk(self) -> None:
        """Delete this run's lease file, and no other run's. Read, then deleted by name, it was
        a successor's lease that went when this run was suspended between the two (the
        successor then stopped, its lease gone). Set aside first (an atomic rename), the file
        read is the file deleted; one that is not this run's is put back, and a successor's
        beat that meets its brief absence looks again (``_lease_exists``)."""
        aside = self.store.set_aside(self.name)
        if aside is None:
            return
        try:
            held = json.loads(aside.read_bytes())
        except (ValueError, OSError):
            held = None
        if isinstance(held, dict) and held.get("run_id") == self.run_id:
            aside.unlink(missing_ok=True)
        elif not self.store.put_back(aside, self.name):
            log.warning("the lease on %s was another run's and a third run's landed while it was set "
                        "aside; the third holds the output", redact(self.store.uri))

    def _lease_exists(self) -> bool:
        """Whether the lease file is there. On disk a missing one is looked for again after
        ``ABSENT_RECHECK_S``: a release that set another run's lease aside puts it back
        within microseconds (``_release_on_disk``), and a lease read as gone is lost."""
        if self.store.exists(self.name):
            return True
        if self.store.remote:
            return False
        time.sleep(ABSENT_RECHECK_S)
        return self.store.exists(self.name)

    def _read(self) -> dict[str, Any] | None:
        if not self._lease_exists():
            return None
        try:
            data = self.store.read_json(self.name)
        except (ValueError, OSError):
            return None
        return data if isinstance(data, dict) else None


def live_holder(store: OutputStore, stale_s: float, name: str = LEASE) -> dict[str, Any] | None:
    """The lease record of a writer that holds ``store`` now (a heartbeat younger than its
    staleness, and not a process known dead on this host), or None: what ``Lease.acquire``
    would stop at, read without taking anything (``validate``)."""
    try:
        held = store.read_json(name) if store.exists(name) else None
    except (ValueError, OSError):
        return None
    if not isinstance(held, dict):
        return None
    age = time.time() - last_beat(store, held, name)
    if age >= float(held.get("stale_after_s", stale_s)) or _dead_here(held):
        return None
    return held


def last_beat(store: OutputStore, held: dict[str, Any], name: str = LEASE, default: float = 0.0) -> float:
    """When the holder of the lease ``held`` (read from ``name``) last beat: its record's time,
    or on disk the file's modification time where later (the heartbeat there touches the file,
    ``Lease._refresh``)."""
    return max(float(held.get("heartbeat", default)), store.modified(name) or 0.0)


def refuse_if_held(store: OutputStore, stale_s: float) -> None:
    """Raise the refusal (exit 2) a run would meet on an output another run is writing now."""
    held = live_holder(store, stale_s)
    if held is not None:
        age = time.time() - last_beat(store, held)
        raise SpecError([("output.uri", _held_message(held, age, stale_s))])


def _dead_here(held: dict[str, Any]) -> bool:
    """A holder on this host whose process is gone (a killed client): no need to wait for staleness."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(held.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def _held_message(held: dict[str, Any], age: float, stale_s: float) -> str:
    if held.get("host") == socket.gethostname() and held.get("pid") == os.getpid():
        return (f"another run is writing this output: run {held.get('run_id', '?')}, in this same process "
                "(gpubatch.run called from another thread, or a call still going). Wait for it to finish "
                "or use another output.uri")
    return (f"another run is writing this output: run {held.get('run_id', '?')} on host "
            f"{held.get('host', '?')} (pid {held.get('pid', '?')}), last heartbeat {age:.0f} s ago. "
            f"Wait for it to finish or use another output.uri; if it was killed, its lease goes "
            f"stale {stale_s:.0f} s after its last heartbeat (run.lease_stale_s)")
