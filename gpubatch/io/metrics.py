"""Storage metrics: requests, bytes, a mergeable latency histogram, requests in flight, HEADs,
and the report's storage line.

Counters live in a shard's StageClocks (summed across shards), so the histogram is kept as one
counter per log-spaced bucket rather than as raw samples: bounded in size, exact to merge.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from gpubatch.io.tallies import claim_tally, tally

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

# Latency histogram: log-spaced upper bounds (ms), factor sqrt(2), 0.25 ms .. ~92 s, plus +inf.
LATENCY_BOUNDS_MS = tuple(round(0.25 * 2 ** (i / 2), 3) for i in range(38)) + (math.inf,)
LATENCY_PREFIX = "storage.latency_ms.bucket_"


def record_request(clocks: StageClocks | None, nbytes: int, seconds: float | None = None,
                   requests: int = 1) -> None:
    """Count ``requests`` requests that brought ``nbytes`` together: requests, bytes and, when
    timed, latency histogram buckets and request-seconds (their sum over a run's wall time is the
    mean number of requests in flight, by Little's law). Without clocks (the plan's reads: a
    slide's header, a VCF, a BED, a FASTA's .fai and .gzi; an index read, a model fetched) they
    are counted per process and claimed as HEADs are (:func:`count_claimed_requests`): their
    requests and bytes, not their latency (the histogram is the shards' reads)."""
    if clocks is None:
        tally("storage.requests").add(requests)
        tally("storage.bytes").add(nbytes)
        return
    clocks.count("storage.requests", requests)
    clocks.count("storage.bytes", nbytes)
    if seconds is not None:
        ms = seconds * 1000.0
        upper = next(b for b in LATENCY_BOUNDS_MS if ms <= b)
        clocks.count(f"{LATENCY_PREFIX}{upper:g}", requests)
        clocks.count("storage.request_s", seconds * requests)


#: how long the run's end waits for worker processes' last counts (runtime.executors)
CLAIM_TIMEOUT_S = 10
#: the kinds of the requests counted on the wire (:func:`meter_s3_session`), as S3 bills them:
#: listings; HEADs; GETs; writes (PUT, COPY, POST: an upload's parts and its completion); deletes
WIRE_KINDS = ("list", "head", "get", "write", "delete", "other")
WIRE_PREFIX = "storage.ops."
#: the client's own share of each kind (its checks, listings, plan, preparation, ledger, lease)
CLIENT_WIRE_PREFIX = "storage.client_ops."
#: S3 operation -> kind; any operation not named here (a bucket's region, ...) is ``other``
S3_OPERATION_KINDS = {
    "ListObjectsV2": "list", "ListObjects": "list", "ListBuckets": "list", "ListObjectVersions": "list",
    "ListMultipartUploads": "list", "ListParts": "list", "HeadObject": "head", "HeadBucket": "head",
    "GetObject": "get", "PutObject": "write", "CopyObject": "write", "UploadPart": "write",
    "UploadPartCopy": "write", "CreateMultipartUpload": "write", "CompleteMultipartUpload": "write",
    "DeleteObject": "delete", "DeleteObjects": "delete", "AbortMultipartUpload": "delete",
}

#: the tallies (io.tallies: per run, else per process) of what was asked of storage with no
#: shard's clocks at hand: HEADs (:func:`record_head`), reads of bytes and their bytes
#: (:func:`record_request`), and the requests counted on the wire, by kind (:func:`meter_s3_session`)
_UNCLOCKED = ("storage.heads", "storage.requests", "storage.bytes", *(WIRE_PREFIX + kind for kind in WIRE_KINDS))
#: an S3 operation -> its tally's name, looked up once per request on the wire
_WIRE_TALLIES = {op: WIRE_PREFIX + kind for op, kind in S3_OPERATION_KINDS.items()}


def meter_s3_session(session: Any) -> None:
    """Count every request an aiobotocore session's clients send (s3fs's, on the filesystems
    :func:`gpubatch.io.storage.get_fs` makes), by kind, retries and failed answers too: what the
    server saw and bills. botocore emits ``before-send`` once per attempt on the wire; the handler
    is one dict lookup and a counter increment, and returns None (a value would be sent instead)."""
    session.register("before-send.s3", _count_s3_request)


def _count_s3_request(event_name: str = "", **_: Any) -> None:
    tally(_WIRE_TALLIES.get(event_name.rpartition(".")[2], WIRE_PREFIX + "other")).add()


def record_head() -> None:
    """Count one request that found an object's size and version (a HEAD: :func:`gpubatch.io.
    storage.stat`, a range reader's size; gcsfs asks its JSON API instead; obstore's 404 is
    counted, another failed one is a retry, as a failed GET is not in ``storage.requests``).
    Most are sent with no shard's clocks at hand (the plan's, a background identity lookup, a
    reader's size), so they are counted per process and claimed (:func:`count_claimed_requests`).
    An S3 client made by the storage entry point counts its own on the wire instead
    (:func:`meter_s3_session`), with its existence checks, listings and writes."""
    tally("storage.heads").add()


def forget_unclaimed_requests() -> None:
    """Drop the requests (HEADs, reads) counted in this process and not claimed yet: a run's
    client starts its count afresh, or a long-lived process (a notebook's ``validate`` before
    ``run``, an earlier run's requests after its report) would add them to the run's report."""
    for name in _UNCLOCKED:
        claim_tally(name)


def count_claimed_requests(clocks: StageClocks) -> dict[str, int]:
    """Add the requests counted in this process with no clocks since the last claim (HEADs, reads
    and their bytes, the requests counted on the wire) to ``clocks`` (a shard's after its commit;
    the client's before its shards start and before the report); what was claimed, returned."""
    claimed = claim_requests()
    for name, n in claimed.items():
        if n:
            clocks.count(name, n)
    return claimed


def claim_requests() -> dict[str, int]:
    """The requests counted in this process with no clocks since the last claim, claimed: what a
    worker process asked after its last shard's claim (that shard's commit record), which the
    client gathers at the run's end (runtime.executors.DaskExecutor.claim_worker_requests)."""
    return {name: claim_tally(name) for name in _UNCLOCKED}


_in_flight = 0
_gauge_lock = threading.Lock()
_thread = threading.local()


@contextlib.contextmanager
def requests_in_flight(clocks: StageClocks | None, n: int) -> Iterator[None]:
    """Count ``n`` requests in flight in this process while the block runs; the process's peak
    goes to the shard's ``storage.in_flight`` peak (a worker's two shards share the gauge)."""
    global _in_flight
    if n <= 0:
        yield
        return
    with _gauge_lock:
        _in_flight += n
        now = _in_flight
    if clocks is not None:
        clocks.peak("storage.in_flight", now)
    try:
        yield
    finally:
        with _gauge_lock:
            _in_flight -= n


@contextlib.contextmanager
def background() -> Iterator[None]:
    """Mark this thread's storage calls as background work (reading ahead): nobody waits on them,
    so their time is not ``storage.wait_s``; the reader that later takes the bytes counts its wait."""
    _thread.background = True
    try:
        yield
    finally:
        _thread.background = False


def in_background() -> bool:
    return bool(getattr(_thread, "background", False))


def latency_percentiles(counters: dict[str, float]) -> dict[str, float | None]:
    """p50 and p99 request latency (ms) from the histogram, log-interpolated inside a bucket."""
    buckets = sorted((float(k[len(LATENCY_PREFIX):]), v) for k, v in counters.items()
                     if k.startswith(LATENCY_PREFIX) and v > 0)
    total = sum(v for _, v in buckets)
    out: dict[str, float | None] = {"p50_ms": None, "p99_ms": None}
    if total <= 0:
        return out
    for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
        seen = 0.0
        for upper, count in buckets:  # buckets are sqrt(2) apart: interpolate inside this one
            if seen + count >= q * total:
                top = upper if math.isfinite(upper) else LATENCY_BOUNDS_MS[-2] * math.sqrt(2)
                lower = top / math.sqrt(2)
                out[name] = round(lower * math.sqrt(2) ** ((q * total - seen) / count), 3)
                break
            seen += count
    return out


#: what the storage line's figures count, as the report says it: what is not counted is named
COUNTED_WORDS = ("gpubatch's reads and HEADs (failed ones are its retries) on every store; on S3 every "
                 "request its clients send, retries too: listings, existence checks, the output's "
                 "reads and writes (its zarr too), fsspec files (BED, FASTA); not counted: zarr's and "
                 "wsidicom's own input reads, other stores' listings, checks and writes, requests "
                 "after this report (its files, the last ledger records, the lease's release), and a "
                 f"worker's after its last commit where it did not answer within {CLAIM_TIMEOUT_S} s")


def requests_by_kind(counters: dict[str, float], client: bool = False) -> dict[str, int]:
    """Every counted request by kind (get, head, list, write, delete, other), as a server's log
    shows them: gpubatch's reads and HEADs with those counted on the wire; ``client``: its share."""
    get = counters.get
    wire = CLIENT_WIRE_PREFIX if client else WIRE_PREFIX
    reads, heads = ("storage.client_requests", "storage.client_heads") if client else ("storage.requests",
                                                                                        "storage.heads")
    kinds = {kind: int(get(wire + kind, 0)) for kind in WIRE_KINDS}
    kinds["get"] += int(get(reads, 0))
    kinds["head"] += int(get(heads, 0))
    return {kind: n for kind, n in kinds.items() if n}


def storage_summary(counters: dict[str, float], wall_s: float,
                    peaks: dict[str, float] | None = None) -> dict[str, Any]:
    """The storage line of the report: requests (reads of bytes; the client's apart: checks, plan,
    preparation), bytes, MB/s, p50/p99, requests in flight (mean over the run, and the peak in one worker), bytes per request, HEADs (apart:
    they bring no bytes), retries, staging, waits."""
    get = counters.get
    nbytes = float(get("storage.bytes", 0.0))
    requests = int(get("storage.requests", 0))
    request_s = float(get("storage.request_s", 0.0))
    summary: dict[str, Any] = {
        "requests": requests, "bytes": int(nbytes),
        "heads": int(get("storage.heads", 0)) + int(get(WIRE_PREFIX + "head", 0)),  # however counted
        "client_requests": int(get("storage.client_requests", 0)),
        "mb_per_s": round(nbytes / 1e6 / wall_s, 3) if wall_s > 0 else None,
        "bytes_per_request": int(nbytes / requests) if requests else None,
        "in_flight_mean": round(request_s / wall_s, 2) if wall_s > 0 and request_s else None,
        "in_flight_peak": int((peaks or {}).get("storage.in_flight", 0)) or None,
        "read_ahead_peak_bytes": int((peaks or {}).get("storage.read_ahead_bytes", 0)) or None,
        **latency_percentiles(counters),
        "retries": int(get("storage.retries", 0)), "library_retries": int(get("storage.library_retries", 0)),
        "throttled": int(get("storage.throttled", 0)),
        "staged_bytes": int(get("storage.staged_bytes", 0)),
        "cache_hits": int(get("storage.cache_hits", 0)), "wait_s": round(float(get("storage.wait_s", 0.0)), 4),
    }
    by_kind = requests_by_kind(counters)
    if by_kind:
        summary["by_kind"], summary["client_by_kind"] = by_kind, requests_by_kind(counters, client=True)
    access = {k.rsplit(".", 1)[1]: int(v) for k, v in counters.items() if k.startswith("storage.access.")}
    if access:
        summary["access"] = access
    return summary
