"""Error types and the exit codes of the user-facing contract.

Two kinds of failure matter to a batch user: a spec that is wrong (nothing should run, exit 2) and
an input that is bad (that one input is quarantined, the rest proceed, exit 3). Everything else is
exit 1.
"""

from __future__ import annotations

import errno

from gpubatch.io.redact import safe_text

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


def finished_run_exit_code(failed: int, done: int) -> int:
    """A finished run's exit code: 0 every input done, 3 some quarantined, 1 every one failed. The
    run's own and ``open_results``' of its output (which said 3 where the run had said 1)."""
    if not failed:
        return EXIT_OK
    return EXIT_PARTIAL if done else EXIT_ERROR


class GpubatchError(Exception):
    """Base of every error gpubatch raises on purpose."""

    exit_code = EXIT_ERROR


class SpecError(GpubatchError):
    """The job spec or the command line is wrong; nothing has run.

    ``problems`` holds one ``(field_path, message)`` pair per problem so that the CLI can list
    them all at once instead of making the user fix them one run at a time.
    """

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[tuple[str, str]] | str, source: str | None = None):
        if isinstance(problems, str):
            problems = [("", problems)]
        # Messages quote values, paths and URIs from the spec: no credentials, no control codes.
        self.problems = [(safe_text(p), safe_text(m, keep_newlines=True)) for p, m in problems]
        self.source = source
        super().__init__(self._format())

    def _format(self) -> str:
        head = f"invalid job spec {self.source}" if self.source else "invalid job spec"
        lines = [f"{head}:"]
        for path, message in self.problems:
            lines.append(f"  {path}: {message}" if path else f"  {message}")
        return "\n".join(lines)


class OutputRefused(GpubatchError):
    """An output this command may not write now (another process holds its lease, or it is no
    place to write); nothing was written. Exit 2 as for a refused spec: the command, not an
    input, has to change (wait, or give another output)."""

    exit_code = EXIT_USAGE


class NotAnOutputError(GpubatchError):
    """A folder given to ``status`` or ``report`` that holds no gpubatch output (missing, or no
    marker): the command line has to change, exit 2 as for usage; nothing was read or written."""

    exit_code = EXIT_USAGE


class UnfinishedOutputError(GpubatchError):
    """A run's merged outputs asked of an output whose latest run did not finish (running,
    interrupted, failed): predictions.parquet is written at a run's end, so it is missing there,
    or is the run before's, without what was committed since. Nothing is read silently partial."""


class InputError(GpubatchError):
    """One input (a slide, a region file, a VCF record batch) cannot be processed.

    Raised inside a shard; the runner quarantines the shard's input with this message and the run
    goes on. ``retryable`` says whether trying again could help (a storage timeout) or not (a
    corrupt file), so that permanent failures are not retried pointlessly.

    The URI is redacted and both parts made printable here, once, because the message travels
    to the audit trail, the report, the terminal and logs: none may carry a credential or a
    control character from a file name.
    """

    def __init__(self, input_uri: str, message: str, *, retryable: bool = False):
        self.input_uri = safe_text(input_uri)
        self.message = safe_text(message)
        self.retryable = retryable
        super().__init__(f"{input_uri}: {message}")


class InputChanged(InputError):
    """An input written over while its shard read it (or between its opening ahead and its shard):
    the outputs would mix two versions, or be of another version than the one recorded. Always
    retryable, and whatever the worker holds of the input (a staged copy, an opening) is stale.
    ``detail``: what the read found (a 412, another ETag), for a caller that words it anew (a
    reference read pinned to the plan's version: it changed since the plan)."""

    def __init__(self, input_uri: str, message: str, *, detail: str | None = None):
        super().__init__(input_uri, message, retryable=True)
        self.detail = detail


class OutputsNotWrittenError(GpubatchError):
    """The shards are committed, but the run's end-of-run outputs (predictions.parquet, the
    report, per-slide files) could not be written; ``--resume`` writes them without recomputing."""

    def __init__(self, output_uri: str, cause: BaseException, failed: int = 0):
        # no report is written: this line is all that says that inputs failed (``failed``)
        again = (f"no committed shard is computed again; the {failed} input(s) that failed in this run are tried "
                 "again" if failed else "no shard is computed again")
        super().__init__(
            f"every committed shard is kept, but writing the run's outputs to {safe_text(output_uri)} "
            f"kept failing ({safe_text(f'{type(cause).__name__}: {cause}')[:300]}); "
            + (f"{failed} input(s) failed too; " if failed else "")
            + f"rerun with --resume to write them ({again})")


class PartsDoNotMergeError(GpubatchError):
    """Committed parts whose columns differ (an earlier gpubatch's beside this one's, or another
    model's) cannot be merged into one predictions.parquet; a ``--resume`` refuses such an output
    before it computes (exit 2), so this is met only where a run's own parts differ (exit 1)."""

    def __init__(self, output_uri: str, problem: str):
        super().__init__(
            f"the committed parts in {safe_text(output_uri)} cannot be merged into one predictions.parquet: "
            f"{safe_text(problem)}; their rows would mix two kinds of output. Run again with --overwrite to "
            "compute every shard with this gpubatch and model, or give a new output.uri")


class ValidationGateError(GpubatchError):
    """A reduced-precision model disagreed with fp32 beyond the configured threshold."""

    def __init__(self, message: str, figures: dict):
        self.figures = figures
        super().__init__(message)


class MissingExtraError(GpubatchError, ImportError):
    """A backend's package is not installed; the message names the pip extra that brings it."""

    def __init__(self, what: str, package: str, extra: str):
        super().__init__(
            f"{what} needs the '{package}' package, which is not installed: "
            f"pip install 'gpubatch[{extra}]'"
        )


#: errors that say a disk (or a quota, or a file size limit) has no room left: the writer's
#: doing, never the input's
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFull(GpubatchError):
    """A disk the run writes to has no room left (the output's, or a worker's local one).

    No input is at fault, and every later shard would fail the same way: the run stops at once
    instead of retrying each shard and quarantining its input as if it were bad. What was
    committed stands; ``--resume`` continues once there is room."""


def disk_full(exc: BaseException) -> OSError | None:
    """The OSError in ``exc`` or its causes that says a disk is full, or None. Libraries wrap it
    (pyarrow's, zarr's, a storage error's ``from``), so the chain is followed."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and node.errno in DISK_FULL_ERRNOS:
            return node
        node = node.__cause__ or node.__context__
    return None


def disk_full_message(err: OSError, output_uri: str) -> str:
    """What to tell the user: which file could not be written, why, and that no input was blamed."""
    why = {errno.EDQUOT: "the disk quota is used up",
           errno.EFBIG: "a file reached the size limit (the filesystem's, or the process's ulimit -f)"}
    where = safe_text(str(err.filename)) if err.filename else "a file"
    return (f"the disk is full: {why.get(err.errno or 0, 'no space left on the device')} "
            f"({safe_text(err.strerror or str(err))}) writing {where} of the output {safe_text(output_uri)}. "
            "No input is at fault and none was quarantined; the run stops. Free space there (or give "
            "another output.uri) and run again with --resume: every committed shard stands")
