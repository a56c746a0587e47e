"""Where ``gpubatch ingest genome`` writes its genome, and who may: the output's lease and swap.

Why: a zarr group opened with mode "w" deletes what was there, so writing a genome in place lost
the old one when the new FASTA turned out bad, and two ingests into one output mixed their chunks
or stopped with a zarr traceback. So an ingest holds a lease on its output (``outputs.lease``'s,
in a file *beside* OUT, since mode "w" wipes everything inside OUT), and on local disk writes into
a hidden sibling folder that takes OUT's place only once complete; a failure removes the sibling
and leaves the old genome as it was. Object stores have no rename: there the genome is written in
place, ``complete`` last (readers refuse a store without it), and a failure says that OUT is now
incomplete and must be ingested again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpubatch.core.errors import GpubatchError, InputError, OutputRefused
from gpubatch.io.redact import redact
from gpubatch.io.storage import exists
from gpubatch.io.uris import is_remote, local_path
from gpubatch.outputs.layout import TMP_PREFIX
from gpubatch.outputs.lease import Lease, LeaseLost
from gpubatch.outputs.store import OutputStore

log = logging.getLogger("gpubatch")
LEASE_SUFFIX = ".ingest-lease.json"
#: an ingest beats every HEARTBEAT_S; one silent for STALE_S (killed on another host) is taken over
STALE_S = 120.0
HEARTBEAT_S = 10.0
#: a sibling of OUT being written (new) or a replaced genome on its way out (old)
_LEFTOVER = re.compile(rf"{re.escape(TMP_PREFIX)}(new|old)-[0-9a-f]{{8}}-(.+)")


def output_path(out_uri: str) -> str:
    """OUT as the ingest writes it: a local path resolved (links followed, so the staging folder
    is on the filesystem of the genome it replaces, and every ingest of it finds one lease)."""
    return out_uri.rstrip("/") if is_remote(out_uri) else os.path.realpath(local_path(out_uri))


def _parent_and_name(out: str) -> tuple[str, str]:
    """(the folder holding OUT, OUT's name): the lease and the staging folder live there."""
    if not is_remote(out):
        return os.path.dirname(out), os.path.basename(out)
    parent, _, name = out.rpartition("/")
    if not name or parent.endswith(":/") or parent.endswith(":"):
        raise OutputRefused(f"{redact(out)}: give the genome a folder of its own (e.g. "
                            "s3://bucket/genomes/hg38.zarr), not a bucket's root: its lease is "
                            "kept beside it")
    return parent, name


class IngestLease(Lease):
    """One ingest's lease on OUT: the file ``<OUT>.ingest-lease.json`` beside it."""

    def __init__(self, out: str, options: dict[str, Any] | None):
        parent, name = _parent_and_name(out)
        super().__init__(OutputStore(parent, options), uuid.uuid4().hex, STALE_S, HEARTBEAT_S,
                         name=name + LEASE_SUFFIX)
        self.out = out

    def _refusal(self, held: dict[str, Any], age: float) -> GpubatchError:
        started = held.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started))) if started else "?"
        host = held.get("host", "?")
        return OutputRefused(
            f"{redact(self.out)} is being written by another `gpubatch ingest genome`: host {host}, "
            f"pid {held.get('pid', '?')}, started {when} (last heartbeat {age:.0f} s ago). Wait for "
            "it to finish, or ingest into another output. If that ingest was killed, the next one "
            f"takes over its lease ({redact(self.store.url(self.name))}) at once on host {host}, "
            f"or from another host {self.stale_s:.0f} s after its last heartbeat")

    def lost_message(self) -> str:
        held = self.lost or {}
        who = (f"another `gpubatch ingest genome` holds its lease (host {held.get('host', '?')}, pid "
               f"{held.get('pid', '?')})" if held else "its lease is gone (removed, or released by the "
               "ingest that took it over)")
        return (f"{redact(self.out)} was taken over: {who}, because this ingest's heartbeat was late by "
                f"more than {self.stale_s:g} s (was this process suspended?). This ingest stops without "
                "marking its genome complete; the output is the other ingest's")


@contextlib.contextmanager
def ingest_lease(out: str, options: dict[str, Any] | None) -> Iterator[IngestLease]:
    """Hold OUT's lease (refreshed on a thread) while the body runs; released however it ends.
    On disk, what a killed ingest of OUT left beside it is cleared once the lease is ours. The
    body confirms the lease (``Lease.confirm``) before it marks its genome complete."""
    lease = IngestLease(out, options)
    lease.acquire()
    try:
        lease.hold()
        if not is_remote(out):
            sweep_leftovers(Path(out))
        yield lease
    finally:
        lease.release()


@contextlib.contextmanager
def staged_output(out: str, options: dict[str, Any] | None, overwrite: bool) -> Iterator[str]:
    """Where to write the genome. On disk: a hidden sibling of OUT, swapped into OUT's place
    only when the body completes, and removed however it ends (the old genome is untouched until
    the swap). On object storage: OUT itself, and a failure says that OUT is now incomplete."""
    if is_remote(out):
        with _in_place(out, options):
            yield out
        return
    target = Path(out)
    new = _sibling(target, "new")
    try:
        yield str(new)
        _swap_in(new, target, overwrite)
    finally:
        _remove(new)


@contextlib.contextmanager
def _in_place(out: str, options: dict[str, Any] | None) -> Iterator[None]:
    """Written in place: a failure's message (or, for an interruption, a logged line) says that
    the store at OUT, the old genome included, is now incomplete and what to run."""
    replaced = exists(out, options)
    try:
        yield
    except LeaseLost:
        raise  # the ingest that took OUT over is writing it: not this one's to call incomplete
    except InputError as exc:
        raise InputError(exc.input_uri, f"{exc.message}. {_incomplete(out, replaced)}",
                         retryable=exc.retryable) from exc
    except BaseException:
        log.error("%s", _incomplete(out, replaced))
        raise


def _incomplete(out: str, replaced: bool) -> str:
    head = (f"the genome store that was at {redact(out)} has already been replaced (object storage "
            "has no rename, so an ingest writes in place) and is now incomplete" if replaced
            else f"{redact(out)} is left incomplete")
    return (f"{head}: readers refuse it. Rerun `gpubatch ingest genome FASTA {redact(out)} "
            "--overwrite` with a good FASTA")


def _swap_in(new: Path, out: Path, overwrite: bool) -> None:
    """Put the finished genome at OUT. Over an old one: old renamed aside, new renamed in, old
    removed (renames within one folder: OUT is the old genome or the new, never a mix). An OUT
    that appeared while the genome was written is refused without ``overwrite``."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    if not overwrite:
        raise InputError(str(out), "output appeared while the genome was written; nothing was "
                                   "replaced. Remove it, or rerun with --overwrite")
    old = _sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    _remove(old)


def sweep_leftovers(out: Path) -> None:
    """Clear what a killed ingest of OUT left beside it: an unfinished new genome, or an old one
    renamed aside (put back if it was killed between the two renames, so OUT is missing). Only
    while holding OUT's lease: then no live ingest of OUT owns these."""
    with os.scandir(out.parent) as entries:
        names = sorted(e.name for e in entries)
    for name in names:
        match = _LEFTOVER.fullmatch(name)
        if match is None or match.group(2) != out.name:
            continue
        entry = out.parent / name
        if match.group(1) == "old" and not os.path.lexists(out):
            log.warning("putting back %s, which an interrupted ingest had moved aside", out)
            os.rename(entry, out)
        else:
            log.info("removing %s, left by an interrupted ingest", entry)
            _remove(entry)


def _sibling(out: Path, role: str) -> Path:
    return out.with_name(f"{TMP_PREFIX}{role}-{uuid.uuid4().hex[:8]}-{out.name}")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)
