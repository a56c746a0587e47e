"""The one retry layer for storage: which failures are transient, backoff, and clear final errors.

Client libraries' own retries are switched off where gpubatch creates the client (s3fs/botocore,
obstore), so that every retry is counted in the run's metrics, the backoff is exponential with
jitter, and the number of attempts is bounded by ``run.storage_attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import errno
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol, TypeVar

from gpubatch.core.errors import InputChanged, InputError
from gpubatch.io.redact import redact
from gpubatch.io.retry_counts import note_retries
from gpubatch.io.uris import has_query

if TYPE_CHECKING:
    from gpubatch.core.clocks import StageClocks

T = TypeVar("T")

TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                    errno.ECONNREFUSED, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH,
                    getattr(errno, "EREMOTEIO", 121)}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestTimeTooSkewed", "503", "500", "502", "504",
                   "TooManyRequests", "RequestLimitExceeded", "429"}
#: error codes (S3's, botocore's, Azure's, GCS's) that mean "too many requests: slow down"; any
#: code that begins with "Throttl" means it too (Throttling, ThrottlingException, ThrottledRequest)
THROTTLE_CODES = {"SlowDown", "ServiceUnavailable", "TooManyRequests", "RequestLimitExceeded",
                  "ServerBusy", "rateLimitExceeded", "503", "429"}
#: HTTP statuses a server refuses with when it is asked too often (or too busy to answer)
THROTTLE_STATUSES = {429, 503}
#: exception class names (anywhere in the cause chain) that mean "try again"; names, so that no
#: client library has to be imported to recognise its errors
TRANSIENT_NAMES = {"HTTPClientError", "ClientConnectionError", "ClientPayloadError",
                   "ServerDisconnectedError", "FSTimeoutError", "IncompleteRead",
                   "ResponseParserError", "ReadTimeoutError", "ConnectTimeoutError",
                   "EndpointConnectionError", "ConnectionClosedError", "ProtocolError"}
#: obstore errors that no retry can fix (404 arrives as the builtin FileNotFoundError)
OBSTORE_PERMANENT = {"PermissionDeniedError", "UnauthenticatedError", "InvalidPathError",
                     "NotSupportedError", "UnknownConfigurationKeyError", "PreconditionError",
                     "NotModifiedError", "AlreadyExistsError", "NotFoundError"}
#: errors that say an object is no longer the version its reader was pinned to: gpubatch's own
#: (an answer of another ETag) and obstore's 412 to an If-Match
CHANGED_NAMES = {"ObjectChanged", "PreconditionError"}
#: obstore's other failures are one GenericError whose text carries the HTTP status or the
#: reqwest/hyper error kind (a Rust debug dump); these kinds and phrases mean "try again"
_OBSTORE_STATUS = re.compile(r"(?:non-2xx status code: |status: )(\d{3})")
_OBSTORE_KIND = re.compile(r"kind: (\w+)")
OBSTORE_TRANSIENT_KINDS = {"Connect", "Request", "Timeout", "Interrupted", "Decode", "Body", "TimedOut",
                           "ConnectionReset", "ConnectionAborted", "ConnectionRefused", "BrokenPipe",
                           "UnexpectedEof", "NotConnected"}
OBSTORE_TRANSIENT_TEXT = ("timed out", "connection reset", "broken pipe", "error sending request",
                          "body error", "connection closed", "incompletemessage", "unexpected eof",
                          "slowdown", "service unavailable", "dispatch task is gone")


#: a throttled retry's backoff starts this many times ``base_s`` (1 s for the default 0.05 s)
THROTTLE_FACTOR = 20
#: the longest any retry waits unless the policy says otherwise (``run.storage_max_wait_s``)
MAX_WAIT_S = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits U(0, min(cap, base * 2**n)).

    A throttled request (429, 503 SlowDown, Throttling*: :func:`is_throttled`) waits longer: its
    server asked for fewer requests, and retries milliseconds apart (0.4 s over five attempts)
    only add to the load it refused, then give up on an object that a few seconds' patience reads.
    It waits what the answer's Retry-After asks where the error carries one (:func:`retry_after_s`),
    else U(t/2, t) for t = ``throttle_base_s * 2**n`` (never instantly); both at most ``max_wait_s``,
    so a server that asks for an hour cannot hold a reader that long.
    ``throttle_base_s`` None: :data:`THROTTLE_FACTOR` times ``base_s``, so a policy made fast (a
    test's) or patient is so for both kinds of failure.
    """

    attempts: int = 5
    base_s: float = 0.05
    cap_s: float = 5.0
    throttle_base_s: float | None = None
    max_wait_s: float = MAX_WAIT_S

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """The wait before attempt ``attempt + 1``, after ``exc`` (if given) failed attempt ``attempt``."""
        if exc is None or not is_throttled(exc):
            return min(self.max_wait_s, random.uniform(0.0, min(self.cap_s, self.base_s * 2 ** attempt)))
        asked = retry_after_s(exc)
        if asked is not None:  # a little past it, spread: a fleet of readers does not return at once
            return min(self.max_wait_s, asked + random.uniform(0.0, min(1.0, 0.1 * asked)))
        base = self.throttle_base_s if self.throttle_base_s is not None else self.base_s * THROTTLE_FACTOR
        ceiling = min(self.max_wait_s, base * 2 ** attempt)
        return random.uniform(ceiling / 2, ceiling)

    def delay_for(self, attempt: int, errors: Iterable[BaseException]) -> float:
        """The wait before retrying several failed requests together: the longest any asks for."""
        return max((self.delay(attempt, exc) for exc in errors), default=self.delay(attempt))


class RunRetrySettings(Protocol):
    """The job spec's ``run`` settings a retry policy is made of (gpubatch.spec.RunSpec)."""

    storage_attempts: int
    storage_max_wait_s: float


def policy_for(run: RunRetrySettings) -> RetryPolicy:
    """The retry policy a job's ``run`` section asks for: one place, so that a setting added
    there reaches every reader the job opens."""
    return RetryPolicy(attempts=run.storage_attempts, max_wait_s=run.storage_max_wait_s)


#: this process's policy (:func:`use_run_policy`), taken outside a run's block; None: the defaults
_run_policy: RetryPolicy | None = None
#: the policy of the run (or shard) this thread (task) works for (:func:`run_policy`); None
#: outside one. Per run, not per process: two runs at once in one process (two jobs' shards on a
#: worker, two API runs on one client) each retry under their own, and neither's end changes
#: the other's; the threads a run's work runs on carry it (core.threads.ContextPool)
_context_policy: contextvars.ContextVar[RetryPolicy | None] = contextvars.ContextVar(
    "gpubatch_run_policy", default=None)


def default_policy() -> RetryPolicy:
    """The policy a storage call that names none retries under: the run's (:func:`run_policy`),
    else this process's (:func:`use_run_policy`), else the defaults. Only the slide source passed
    its job's policy: a genome reference, its indexes, a VCF and a remote model were read with
    five attempts and 30 s waits whatever ``run.storage_attempts`` and ``run.storage_max_wait_s``
    said."""
    return _context_policy.get() or _run_policy or RetryPolicy()


def use_run_policy(policy: RetryPolicy | None) -> RetryPolicy | None:
    """Make ``policy`` this process's :func:`default_policy` outside any run's block; returns the
    one it replaces. A run's work takes :func:`run_policy` instead."""
    global _run_policy
    before, _run_policy = _run_policy, policy
    return before


@contextlib.contextmanager
def run_policy(policy: RetryPolicy | None) -> Iterator[None]:
    """``policy`` as :func:`default_policy` in the block and in the threads its work runs on (a
    run's client: its checks, plan and preparation; ``validate``; ``tune``; a worker's shard:
    RunContext.storage_policy); None: what is in force around it."""
    token = _context_policy.set(policy or _context_policy.get())
    try:
        yield
    finally:
        _context_policy.reset(token)


def _is_obstore(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("obstore")


def _obstore_transient(exc: BaseException) -> bool:
    """obstore's errors, by class name and text: no obstore import is needed to recognise them."""
    name = type(exc).__name__
    if name in OBSTORE_PERMANENT:
        return False
    if name == "JoinError":
        return True
    status = _status_and_code(exc)[0]
    if status is not None:
        return status >= 500 or status in (408, 429)
    text = str(exc)
    if set(_OBSTORE_KIND.findall(text)) & OBSTORE_TRANSIENT_KINDS:
        return True
    return any(t in text.lower() for t in OBSTORE_TRANSIENT_TEXT)


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    if _is_obstore(exc):
        found = _OBSTORE_STATUS.findall(str(exc))
        return (int(found[-1]) if found else None), None
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata", {})
        return meta.get("HTTPStatusCode"), response.get("Error", {}).get("Code")
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if status is None and type(exc).__name__ == "HttpError":  # gcsfs's: the HTTP status as .code
        status = getattr(exc, "code", None)
    return (status if isinstance(status, int) else None), None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    node: BaseException | None = exc
    while node is not None and node not in out and len(out) < 8:
        out.append(node)
        node = node.__cause__ or node.__context__
    return out


def is_transient(exc: BaseException) -> bool:
    """True when trying again could succeed: 5xx/SlowDown, timeouts, resets, broken connections.

    s3fs translates botocore errors into OSError subclasses (SlowDown -> EBUSY, 500 -> EREMOTEIO,
    403 -> PermissionError, 404 -> FileNotFoundError) and passes connection errors through as
    botocore/aiohttp exceptions, so the whole cause chain is inspected, class names included.
    obstore raises FileNotFoundError for 404 and its own classes for the rest (parsed above).
    """
    for node in _chain(exc):
        if _hides_cause(node):
            continue  # judged by its cause, next in the chain
        if isinstance(node, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return False
        if _is_obstore(node):
            return _obstore_transient(node)
        status, code = _status_and_code(node)
        if code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429)):
            return True
        if status is not None and 400 <= status < 500:
            return False
        if isinstance(node, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
            return True
        if {c.__name__ for c in type(node).__mro__} & TRANSIENT_NAMES:
            return True
        if isinstance(node, OSError) and node.errno in TRANSIENT_ERRNOS:
            return True
    return False


#: S3's answers to a conditional write whose condition did not hold: the object exists
#: (If-None-Match), or it changed (If-Match), or another conditional write to it is in flight
PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


def is_precondition_failed(exc: BaseException) -> bool:
    """True when a conditional write was refused because its condition did not hold (412, or
    S3's 409 ConditionalRequestConflict): another writer's object is there, not a failure to
    retry. s3fs raises these as FileExistsError or OSError(EINVAL), the botocore error as cause."""
    for node in _chain(exc):
        status, code = _status_and_code(node)
        if code in PRECONDITION_CODES or status == 412:
            return True
    return False


def is_throttled(exc: BaseException) -> bool:
    """True when a server refused a request for being asked too often, or too busy to take it:
    429, 503 (S3's SlowDown and ServiceUnavailable), a Throttling* code. A retry of one should
    wait seconds, not milliseconds (:class:`RetryPolicy`). s3fs's OSError(EBUSY) is judged by the
    botocore error it was raised from; obstore's by the status and text of its message."""
    for node in _chain(exc):
        status, code = _status_and_code(node)
        if _is_obstore(node):
            text = str(node).lower()
            return status in THROTTLE_STATUSES or any(t in text for t in _THROTTLE_TEXT)
        if code is not None and (code in THROTTLE_CODES or code.startswith("Throttl")):
            return True
        if status in THROTTLE_STATUSES:
            return True
    return False


_THROTTLE_TEXT = ("slowdown", "throttl", "too many requests", "reduce your request rate")
#: a Retry-After in an error's text (obstore's message carries no headers: see _retry_after_header)
_RETRY_AFTER_TEXT = re.compile(r'retry-after"?\s*[:=]\s*"?(\d+(?:\.\d+)?|\w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT)',
                               re.IGNORECASE)
_CODE_TEXT = re.compile(r"<Code>(\w+)</Code>")


def retry_after_s(exc: BaseException) -> float | None:
    """The seconds a failed request's answer asked to wait (its Retry-After header: seconds or an
    HTTP-date), from wherever the error keeps the headers: botocore's response metadata, aiohttp's
    (fsspec's HTTP client, gpubatch's HttpRangeReader) and other clients' ``headers``, or the text
    of an error that has none. None when no answer in the cause chain carries one."""
    for node in _chain(exc):
        value = _retry_after_header(node)
        seconds = parse_retry_after(value) if value else None
        if seconds is not None:
            return seconds
    return None


def _retry_after_header(node: BaseException) -> str | None:
    if _is_obstore(node):
        # obstore (0.12) raises its errors with a message only (no status or headers attributes):
        # the message holds the HTTP status and the body (S3's <Code>SlowDown</Code>) but never
        # the response's headers, so a Retry-After header cannot be honoured (a 503 or 429 with
        # "Retry-After: 7" reads the same as one without). The status makes the error throttled
        # (is_throttled), so obstore's retries take the throttled backoff instead, bounded by
        # the policy's max_wait_s (run.storage_max_wait_s) as a Retry-After read by fsspec is;
        # only a body that spells a Retry-After out is read, here.
        found = _RETRY_AFTER_TEXT.search(str(node))
        return found.group(1) if found else None
    response = getattr(node, "response", None)
    if isinstance(response, dict):  # botocore's ClientError: headers lower-cased
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}
        return headers.get("retry-after")
    for holder in (node, response):
        headers = getattr(holder, "headers", None)
        if headers is not None and callable(getattr(headers, "get", None)):
            value = headers.get("Retry-After") or headers.get("retry-after")
            if value:
                return str(value)
    return None


def parse_retry_after(value: str) -> float | None:
    """Retry-After's seconds from now (RFC 9110: a number of seconds or an HTTP-date), never
    negative; None when it is neither."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no answer


def throttle_label(exc: BaseException) -> str:
    """What a throttling answer was, for messages: ``503 SlowDown``, ``429``, ``ThrottlingException``."""
    status: int | None = None
    code: str | None = None
    for node in _chain(exc):
        found_status, found_code = _status_and_code(node)
        if _is_obstore(node):
            codes = _CODE_TEXT.findall(str(node))
            found_code = codes[0] if codes else None
        status, code = status or found_status, code or found_code
    words = [str(status)] if status else []
    if code and code != str(status):
        words.append(code)
    return " ".join(words) or "throttled"


class RangesIgnored(InputError):
    """The object's server answered a byte-range request with more bytes than asked: it ignores
    ``Range`` (a 200 with the whole object; obstore refuses such an answer itself). No retry helps
    and no streamed read can work; a staged download takes the object whole instead
    (:mod:`gpubatch.io.stage_cache`)."""

    def __init__(self, uri: str, detail: str):
        super().__init__(redact(uri), f"its server ignores byte ranges ({detail}): it cannot be "
                                      "streamed; input.access: stage downloads it whole")


#: how object_store words its refusal of a 200 answer to a ranged GET: its HTTP store's
#: NotSupported, its S3/GCS/Azure client's generic error
_RANGES_REFUSED = ("Range request not supported", "non-partial response when range requested")


def ranges_refused(exc: BaseException) -> bool:
    """obstore's refusal of a 200 answer to a ranged GET (the server ignores Range)."""
    return _is_obstore(exc) and any(text in str(exc) for text in _RANGES_REFUSED)


def _hides_cause(exc: BaseException) -> bool:
    """A FileNotFoundError that is not a 404: fsspec's HTTP filesystem raises one for any failed
    HEAD or GET of a size (a 403 of an expired presigned URL, a 503, a timeout), ``from`` the
    real failure, which is what says whether to retry and what to tell. (fsspec's memory
    filesystem's ``from`` a KeyError is a missing file.)"""
    cause = exc.__cause__
    if not isinstance(exc, FileNotFoundError) or cause is None or isinstance(cause, FileNotFoundError):
        return False
    status = _status_and_code(cause)[0]
    return status != 404 if status is not None else is_transient(cause)  # a KeyError: missing


def storage_error(uri: str, exc: BaseException, attempts: int = 1) -> InputError:
    """A clear, credential-free InputError for a failed storage call (retryable when transient)."""
    if isinstance(exc, InputError):
        return exc
    while _hides_cause(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    uri = redact(uri)
    # obstore's messages end in a Rust debug dump (request URL, headers): the first line says it
    text = str(exc).split("\n\nDebug source:", 1)[0].strip().split("\n", 1)[0]
    detail = redact(f"{type(exc).__name__}: {text}")[:300]
    status = _status_and_code(exc)[0]
    if type(exc).__name__ in CHANGED_NAMES:  # obstore's text is a URL and a dump: the status says it
        return changed_while_read(uri, text if type(exc).__name__ == "ObjectChanged" else
                                  "412 Precondition Failed: it is no longer the ETag the read began at")
    if ranges_refused(exc):
        return RangesIgnored(uri, "a ranged GET was answered 200 with the whole object")
    if isinstance(exc, FileNotFoundError) or (status == 404 and _is_obstore(exc)):
        return InputError(uri, "object not found (404): check the URI, bucket and prefix")
    denied = type(exc).__name__ in ("PermissionDeniedError", "UnauthenticatedError") and _is_obstore(exc)
    gcsfs_denied = type(exc) is OSError and str(exc).startswith("Forbidden: ")  # gcsfs's 403
    if isinstance(exc, PermissionError) or denied or gcsfs_denied or status in (401, 403):
        return InputError(uri, f"access denied ({status or 403}): {_who_may_not_read(uri)}")
    if is_transient(exc) and is_throttled(exc):
        return InputError(uri, f"throttled: its server kept refusing requests ({throttle_label(exc)}) after "
                               f"{attempts} attempt(s), each retry backing off (up to run.storage_max_wait_s): "
                               f"fewer run.readers or workers ask less of it ({detail})", retryable=True)
    if is_transient(exc):
        return InputError(uri, f"storage kept failing after {attempts} attempt(s) ({detail})"
                               f"{_timeout_hint(uri) if timed_out(exc) else ''}", retryable=True)
    return InputError(uri, f"storage error ({detail})")


#: where a scheme's storage options set how long a read may wait on a silent server ({section}:
#: input.storage, or output.storage for a URI under an output, see :func:`register_output`)
READ_TIMEOUT_SETTING = {"s3": "{section} config_kwargs.read_timeout (seconds; 60 unless set)",
                        "http": "a silence of 60 s (connection 10 s)"}
#: the roots of the outputs this process writes (redacted, with a trailing slash)
_output_roots: set[str] = set()


def register_output(uri: str) -> None:
    """Note an output's root: a request under it that times out names output.storage's setting,
    not input.storage's (a commit record that timed out told the user to change the input's)."""
    _output_roots.add(redact(uri).rstrip("/") + "/")


def timed_out(exc: BaseException) -> bool:
    """Whether a failure is a client's timeout (a server that accepted and stopped answering):
    the builtin and asyncio timeouts, botocore's and aiohttp's (by class name), obstore's by the
    reqwest kind its message carries."""
    for node in _chain(exc):
        if _is_obstore(node):
            return "TimedOut" in str(node) or "kind: Timeout" in str(node)
        if isinstance(node, (TimeoutError, asyncio.TimeoutError)):
            return True
        if any("Timeout" in c.__name__ for c in type(node).__mro__):
            return True
    return False


def _timeout_hint(uri: str) -> str:
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    setting = READ_TIMEOUT_SETTING.get(_SCHEME_FAMILY.get(scheme, scheme))
    output = any(f"{redact(uri).rstrip('/')}/".startswith(root) for root in _output_roots)
    where = f"; {setting.format(section='output.storage' if output else 'input.storage')} bounds each wait" \
        if setting else ""
    return f": the server timed out (no answer in time){where}"


#: where each scheme's client finds credentials that no option gave, for a denied read's message
CREDENTIALS_ENVIRONMENT = {"s3": "the AWS_* environment", "gs": "GOOGLE_APPLICATION_CREDENTIALS (or gcloud's "
                           "application-default login)", "az": "the AZURE_STORAGE_* environment"}
_SCHEME_FAMILY = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "https": "http"}


def _who_may_not_read(uri: str) -> str:
    """Why a read was denied: a presigned URL's signature (an http(s) URL with a query: no
    storage option signs it), else the credentials the options and environment give."""
    if has_query(uri):
        return "the URL's signature (its query) may have expired or not cover this object: sign it again"
    return (f"the credentials from input.storage, the profile or {_credentials_environment(uri)} "
            "may not read this object")


def _credentials_environment(uri: str) -> str:
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return CREDENTIALS_ENVIRONMENT.get(_SCHEME_FAMILY.get(scheme, scheme), "the environment")


def changed_while_read(uri: str, detail: str) -> InputChanged:
    """The error of a read that found its object written over: retryable, because the next attempt
    reads the new version from the start (as a local file written over is read again)."""
    detail = redact(detail)[:200]
    return InputChanged(redact(uri), f"the object changed while it was read ({detail}): its outputs would "
                                     "mix two versions; the shard is read again", detail=detail)


def count_retries(clocks: StageClocks | None, n: int = 1, throttled: int = 0) -> None:
    """Count ``n`` retries (``throttled`` of them after a throttling answer) in ``clocks``, or, for
    a call made without them, in the process's count that the next shard or the client's report
    claims (io.retry_counts)."""
    if clocks is not None:
        clocks.count("storage.retries", n)
        if throttled:
            clocks.count("storage.throttled", throttled)
    else:
        note_retries(n, throttled)


def call_with_retries(fn: Callable[[], T], uri: str, policy: RetryPolicy | None = None,
                      clocks: StageClocks | None = None) -> T:
    """Run a synchronous storage call under the retry policy (the run's where none is named:
    :func:`default_policy`); failures become InputError."""
    policy = policy or default_policy()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt + 1 >= policy.attempts:
                raise storage_error(uri, exc, attempt + 1) from None
            count_retries(clocks, throttled=int(is_throttled(exc)))
            time.sleep(policy.delay(attempt, exc))
    raise AssertionError("unreachable")
