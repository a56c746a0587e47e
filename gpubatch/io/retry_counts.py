"""Retries no shard's clocks saw, counted per process for the report.

gpubatch's retry layer (io.retry) counts each retry into the clocks it is given. Two kinds were
left out, and are counted here:
- gpubatch's own retries of calls made without clocks (the output store's writes and reads, a
  file's existence check, a listing): :func:`note_retries`;
- the retries client libraries make themselves, for requests this layer does not make or cannot
  send again (wsidicom's and zarr's reads through s3fs, a streamed upload's parts, an fsspec
  file). Their clients keep botocore's retries on (``io.storage.library_options``). botocore says
  nothing about a retry except a debug line ("Retry needed, retrying request after delay of:
  ..."), in standard and legacy mode alike, and aiobotocore (s3fs) uses the same loggers. A
  filter on those loggers counts the lines. The loggers must pass debug records to reach it, so
  it lets through exactly what they would have passed before (their own level, or their
  parents' once those change): nothing more reaches a user's handlers.

The counts are per process (per run where a run is going: io.tallies). Each shard claims what was counted since the last claim, so shards
that overlap in one worker never count a retry twice (which shard's request it was is not known:
the library's requests run on a shared event loop); the client claims the rest before the report.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from gpubatch.io.tallies import claim_tally, tally

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

#: botocore's retry loggers (standard mode; legacy mode), and the line each writes per retry
RETRY_LINES = {"botocore.retries.standard": "Retry needed, retrying request",
               "botocore.retryhandler": "Retry needed, action of"}


class _RetryCounter(logging.Filter):
    def __init__(self, logger: logging.Logger, line: str):
        super().__init__()
        self.logger, self.line, self.own_level = logger, line, logger.level

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.line):
            tally(_LIBRARY).add()
        parent = self.logger.parent
        passes_at = self.own_level or (parent.getEffectiveLevel() if parent else logging.WARNING)
        return record.levelno >= passes_at


_COUNTERS: list[_RetryCounter] = []
_INSTALL = threading.Lock()
#: the tallies (io.tallies) of the libraries' retries, of gpubatch's own made without clocks, and
#: of how many of those followed a throttling answer
_LIBRARY, _UNATTRIBUTED, _UNATTRIBUTED_THROTTLED = "retries.library", "retries.unattributed", "retries.throttled"


def note_retries(n: int = 1, throttled: int = 0) -> None:
    """Count retries gpubatch's layer made for a call that had no clocks to count them in."""
    tally(_UNATTRIBUTED).add(n)
    if throttled:
        tally(_UNATTRIBUTED_THROTTLED).add(throttled)


def count_library_retries() -> None:
    """Start counting botocore's retries in this process (once; later calls do nothing)."""
    with _INSTALL:
        if _COUNTERS:
            return
        for name, line in RETRY_LINES.items():
            logger = logging.getLogger(name)
            counter = _RetryCounter(logger, line)
            logger.addFilter(counter)
            logger.setLevel(logging.DEBUG)
            _COUNTERS.append(counter)


def claim_library_retries() -> int:
    """botocore's retries counted in this process since the last claim."""
    return claim_tally(_LIBRARY)


def claim_unattributed_retries() -> int:
    """gpubatch's retries made without clocks in this process since the last claim."""
    return claim_tally(_UNATTRIBUTED)


def forget_unclaimed_retries() -> None:
    """Drop the retries counted in this process and not claimed yet: a run's client starts its
    count afresh, or a long-lived process's earlier ones (a notebook's ``validate`` before ``run``,
    an earlier run's after its report) would be added to the run's report."""
    claim_library_retries()
    claim_unattributed_retries()
    claim_tally(_UNATTRIBUTED_THROTTLED)


def count_claimed_retries(clocks: StageClocks) -> None:
    """Add the claimed retries to ``clocks``' storage retries, the library's also apart."""
    library, unattributed = claim_library_retries(), claim_unattributed_retries()
    throttled = claim_tally(_UNATTRIBUTED_THROTTLED)
    if library + unattributed:
        clocks.count("storage.retries", library + unattributed)
    if throttled:
        clocks.count("storage.throttled", throttled)
    if library:
        clocks.count("storage.library_retries", library)
