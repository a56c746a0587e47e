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

The counts are per process. Each shard claims what was counted since the last claim, so shards
that overlap in one worker never count a retry twice (which shard's request it was is not known:
the library's requests run on a shared event loop); the client claims the rest before the report.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

#: botocore's retry loggers (standard mode; legacy mode), and the line each writes per retry
RETRY_LINES = {"botocore.retries.standard": "Retry needed, retrying request",
               "botocore.retryhandler": "Retry needed, action of"}


class Tally:
    """A count in this process and what of it has been claimed, under a lock: what is counted
    without a shard's clocks, claimed by each shard (and the client) in turn, so none counts twice."""

    def __init__(self) -> None:
        self.counted = 0
        self.claimed = 0
        self.lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self.lock:
            self.counted += n

    def claim(self) -> int:
        with self.lock:
            new, self.claimed = self.counted - self.claimed, self.counted
        return new


class _RetryCounter(logging.Filter):
    def __init__(self, logger: logging.Logger, line: str):
        super().__init__()
        self.logger, self.line, self.own_level = logger, line, logger.level
        self.tally = Tally()

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.line):
            self.tally.add()
        parent = self.logger.parent
        passes_at = self.own_level or (parent.getEffectiveLevel() if parent else logging.WARNING)
        return record.levelno >= passes_at


_COUNTERS: list[_RetryCounter] = []
_INSTALL = threading.Lock()
#: gpubatch's own retries made without clocks, and how many of them followed a throttling answer
_UNATTRIBUTED = Tally()
_UNATTRIBUTED_THROTTLED = Tally()


def note_retries(n: int = 1, throttled: int = 0) -> None:
    """Count retries gpubatch's layer made for a call that had no clocks to count them in."""
    _UNATTRIBUTED.add(n)
    if throttled:
        _UNATTRIBUTED_THROTTLED.add(throttled)


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
    return sum(counter.tally.claim() for counter in _COUNTERS)


def claim_unattributed_retries() -> int:
    """gpubatch's retries made without clocks in this process since the last claim."""
    return _UNATTRIBUTED.claim()


def forget_unclaimed_retries() -> None:
    """Drop the retries counted in this process and not claimed yet: a run's client starts its
    count afresh, or a long-lived process's earlier ones (a notebook's ``validate`` before ``run``,
    an earlier run's after its report) would be added to the run's report."""
    claim_library_retries()
    claim_unattributed_retries()
    _UNATTRIBUTED_THROTTLED.claim()


def count_claimed_retries(clocks: StageClocks) -> None:
    """Add the claimed retries to ``clocks``' storage retries, the library's also apart."""
    library, unattributed = claim_library_retries(), claim_unattributed_retries()
    throttled = _UNATTRIBUTED_THROTTLED.claim()
    if library + unattributed:
        clocks.count("storage.retries", library + unattributed)
    if throttled:
        clocks.count("storage.throttled", throttled)
    if library:
        clocks.count("storage.library_retries", library)
