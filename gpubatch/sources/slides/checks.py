"""Opening every slide as a worker would, for ``validate``: which would be quarantined, before a
night's run is spent finding out.

A slide is opened the way its shard opens it (locally, in place, or streamed by byte range),
configured with the job's decode settings, and its reads are planned: the tile grid (the MPP or
level, the tile size against the stored tiles), and the tissue mask from the coarsest level.
What a shard would quarantine at its start is said here, by file. Two things are left to the run:
a stored tile that is corrupt (every tile would have to be decoded), and slides that would be
downloaded whole (``stage``): validate downloads nothing, and says how many it did not open.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError
from gpubatch.core.phases import phase
from gpubatch.core.threads import ContextPool
from gpubatch.io.redact import redact
from gpubatch.io.retry import policy_for
from gpubatch.io.uris import is_remote
from gpubatch.sources.slides.backends import SlideBackend
from gpubatch.sources.slides.open import choose_access, open_slide_input, read_in_place
from gpubatch.spec import JobSpec

#: what a shard does with its opened slide before reading tiles: (job, backend, uri, clocks)
Prepare = Callable[[JobSpec, SlideBackend, str, StageClocks], None]

#: slides opened at once: enough to hide object storage's latency, few enough for a login node
OPEN_THREADS = 4


@dataclass
class SlideChecks:
    """What opening the slides found: the ones a run would quarantine, and those not opened."""

    failed: list[dict[str, str]] = field(default_factory=list)
    opened: int = 0
    not_opened: int = 0  # remote slides a run would download whole first

    def note(self) -> str | None:
        if not self.not_opened:
            return None
        return (f"{self.not_opened} slide(s) not opened: a run downloads them whole first (input.access "
                "stage, a format only openslide reads, or a file that cannot be streamed); validate "
                "downloads nothing")


def would_download(uri: str, job: JobSpec) -> bool:
    """Whether a run stages this slide (downloads it whole) before opening it. A prefix named
    without a suffix (a DICOM folder named by its UID) is asked of the store: it is read in place."""
    from gpubatch.sources.slides.open import opens_in_place

    return (is_remote(uri) and not read_in_place(uri) and choose_access(uri, job.input.access) == "stage"
            and not opens_in_place(uri, job.input.storage, policy_for(job.run)))


def slide_problem(uri: str, job: JobSpec, prepare: Prepare) -> tuple[str | None, bool]:
    """(why a shard of this slide would be quarantined at its start, or None; whether it was
    opened). A slide ``access: auto`` cannot stream is not opened: a run would download it and
    open that, which validate does not do. One that opens is prepared, and what fails there
    fails the run's shard too, however the bytes came."""
    from gpubatch.sources.slides.open import is_storage_failure, opens_in_place

    if would_download(uri, job):
        return None, False
    access = "stream" if job.input.access == "auto" else job.input.access  # never a download
    policy = policy_for(job.run)
    try:
        backend = open_slide_input(uri, StageClocks(), access=access, options=job.input.storage,
                                   policy=policy, tissue=job.tiles.tissue.method != "none")
    except InputError as exc:
        if is_remote(uri) and job.input.access == "auto" and not is_storage_failure(exc) \
                and not opens_in_place(uri, job.input.storage, policy):
            return None, False
        return exc.message, True
    except Exception as exc:  # a reader that crashed on the file: a run would quarantine it too
        return f"{type(exc).__name__}: {exc}", True
    return _prepared(backend, uri, job, prepare), True


def _prepared(backend: SlideBackend, uri: str, job: JobSpec, prepare: Prepare) -> str | None:
    """What a shard does with its opened slide before the first tile (the source's configure
    and plan), closed after; why it fails, or None."""
    try:
        prepare(job, backend, uri, StageClocks())
    except InputError as exc:
        return exc.message
    except Exception as exc:  # noqa: BLE001 - as above
        return f"{type(exc).__name__}: {exc}"
    finally:
        backend.close()
    return None


def check_slides(uris: Sequence[str], job: JobSpec, prepare: Prepare) -> SlideChecks:
    """Open every slide of ``uris`` (a few at a time), in order, and ``prepare`` it as its
    shard would (the source's configure and plan); the ones a run would stage are counted, not
    opened."""
    checks = SlideChecks()
    with ContextPool(OPEN_THREADS, thread_name_prefix="gpubatch-validate") as pool, \
            phase("validate: opening the slides as their shards would", len(uris), "slide") as said:
        for uri, (problem, opened) in zip(uris, pool.map(lambda u: slide_problem(u, job, prepare), uris), strict=True):
            checks.opened += opened
            checks.not_opened += not opened
            if problem is not None:
                checks.failed.append({"input": redact(uri), "error": problem})
            said.advance()
    return checks
