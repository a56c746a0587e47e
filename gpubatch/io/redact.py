"""Credential redaction and terminal-safe text: what may be printed, logged or written.

Secrets reach gpubatch from storage options (job, profile), the environment and URIs themselves
(userinfo, the query parameters of presigned S3/GCS URLs and Azure SAS tokens). Every value seen
in options, the AWS_* and AZURE_STORAGE_* environment or a URI's secret parts is registered here,
so free text (an exception message from a client library) is scrubbed of it too. A presigned URL is still *read*
with its signature: only what is printed, logged or written goes through :func:`redact`.

Names that come from users and files (job names, file names) may hold control characters: raw
newlines that forge log lines, ANSI escapes that rewrite the terminal, right-to-left overrides
that reverse what is shown. :func:`printable` escapes them wherever a name is printed.
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
import urllib.parse
from typing import Any

SENSITIVE_KEYS = frozenset({
    "key", "secret", "token", "password", "passwd", "access_key", "secret_key", "access_key_id",
    "secret_access_key", "session_token", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "security_token", "sas_token", "account_key", "credential",
    "credentials", "client_secret", "refresh_token", "api_key", "authorization", "username",
    "connection_string",
})
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_SECURITY_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY",
              "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
              "AZURE_STORAGE_CLIENT_SECRET")
MASK = "***"
#: query parameters whose values are credentials or identify them: presigned S3 (SigV2 and
#: SigV4), presigned GCS, Azure SAS (every field of the token), CloudFront, generic tokens
QUERY_SECRETS = frozenset({
    "awsaccesskeyid", "signature", "sig", "token", "access_token", "id_token", "refresh_token",
    "key", "apikey", "api_key", "secret", "password", "passwd", "pwd", "credential", "auth",
    "googleaccessid", "policy", "key-pair-id", "security-token",
    "sv", "ss", "srt", "sp", "se", "st", "spr", "sr", "si", "sdd", "skoid", "sktid", "skt",
    "ske", "sks", "skv", "saoid", "suoid", "scid",
})
#: parameter-name prefixes whose every parameter is redacted (X-Amz-Signature, X-Goog-Credential)
QUERY_SECRET_PREFIXES = ("x-amz-", "x-goog-")
#: of those, the ones whose values are registered as secrets to scrub from any text
_REGISTERED_PARAMS = frozenset({"awsaccesskeyid", "signature", "sig", "token", "access_token",
                                "x-amz-signature", "x-amz-credential", "x-amz-security-token",
                                "x-goog-signature", "x-goog-credential", "skoid", "sktid",
                                "password", "secret", "key", "apikey", "api_key"})
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
# a value ends at a delimiter; a ':' ',' '.' or ')' just before a space or the end is the
# sentence's, not the value's (signatures and tokens are hex or base64): "...?sig=***: not found"
_QUERY_PARAM = re.compile(
    r"(?P<lead>[?&;])(?P<name>[A-Za-z0-9_.-]+)=(?P<value>[^&#\s\"'<>]*?)(?=[:,.)]?(?:[&#\s\"'<>]|$))")
_ASSIGN_SECRET = re.compile(
    r"(?i)(\b[\"']?(?:aws_)?(?:secret_access_key|access_key_id|session_token|secret|password|token|key)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\"',}\s&]+?)(?=[:,.)]?(?:[\"',}\s&]|$))")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{12,}\b")
#: an Azure connection string's secret fields (``AccountKey=...;``, ``SharedAccessSignature=...;``),
#: which the assignment pattern misses (no word boundary before ``Key`` in ``AccountKey``)
_CONNECTION_SECRET = re.compile(r"(?i)\b(AccountKey|SharedAccessSignature)=([^;\s\"']+)")
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


#: values of a sensitive key that name a way to authenticate, not a secret (gcsfs's ``token``
#: modes): remembered, they would scrub every "anon" from every later message of the process
NOT_SECRETS = frozenset({"anon", "google_default", "cloud", "browser", "cache"})


def _remember(value: str) -> None:
    if len(value) >= 4 and value.lower() not in NOT_SECRETS:
        with _secrets_lock:
            _secrets.add(value)


def register_secrets(options: Any) -> None:
    """Remember secret values so that :func:`redact` can scrub them from free text too."""
    if isinstance(options, dict):
        for k, v in options.items():
            if str(k).lower() in SENSITIVE_KEYS and isinstance(v, str):
                _remember(v)
                for match in _CONNECTION_SECRET.finditer(v):  # a connection string's key, quoted alone
                    _remember(match.group(2))
            else:
                register_secrets(v)


def register_uri(uri: str) -> None:
    """Remember a URI's secret parts (userinfo password, signature and credential parameters),
    as given and percent-decoded, so a message that quotes them in any form is scrubbed."""
    parts = urllib.parse.urlsplit(uri) if "://" in uri else None
    if parts is None:
        return
    if parts.password:
        _remember(parts.password)
        _remember(urllib.parse.unquote(parts.password))
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=False):
        if name.lower() in _REGISTERED_PARAMS:
            _remember(value)
            _remember(urllib.parse.quote(value, safe=""))


def _is_secret_param(name: str) -> bool:
    low = name.lower()
    return low in QUERY_SECRETS or low.startswith(QUERY_SECRET_PREFIXES)


def _mask_param(m: re.Match[str]) -> str:
    if not _is_secret_param(m.group("name")):
        return m.group(0)
    return f"{m.group('lead')}{m.group('name')}={MASK}"


def redact(value: Any) -> Any:
    """A copy of ``value`` with credentials removed: safe for logs, reports and error messages.

    Mappings lose the values of sensitive keys (key, secret, token, password, ...), at any depth;
    strings lose URL userinfo, the values of secret query parameters (``X-Amz-*``,
    ``AWSAccessKeyId``, ``Signature``, ``sig``, ``token``, SAS fields), secret-looking
    assignments, AWS key ids, an Azure connection string's key and signature, and every secret
    value registered from options, URIs or the AWS_* and AZURE_STORAGE_* environment.
    """
    if isinstance(value, dict):
        return {k: (MASK if str(k).lower() in SENSITIVE_KEYS and v not in (None, "", False)
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if not isinstance(value, str):
        return value
    text = _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", value)
    text = _QUERY_PARAM.sub(_mask_param, text)
    text = _ASSIGN_SECRET.sub(lambda m: m.group(1) + MASK, text)
    text = _AWS_KEY_ID.sub(MASK, text)
    text = _CONNECTION_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)
    with _secrets_lock:
        known = set(_secrets)
    for env_secret in (os.environ.get(k) for k in SECRET_ENV):
        if env_secret and len(env_secret) >= 4:
            known.add(env_secret)
            known.update(m.group(2) for m in _CONNECTION_SECRET.finditer(env_secret))
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _escape_char(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: Any, *, keep_newlines: bool = False) -> str:
    """``text`` with control and format characters escaped (``\\n``, ``\\x1b``, ``\\u202e``).

    For names from users and files before they reach a terminal or a log line. With
    ``keep_newlines``, newlines (and tabs) of a multi-line message are kept; every other
    control character is still escaped.
    """
    out = []
    for c in str(text):
        if keep_newlines and c in "\n\t":
            out.append(c)
        elif unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co"):
            out.append(_escape_char(c))
        else:
            out.append(c)
    return "".join(out)


def safe_text(value: Any, *, keep_newlines: bool = False) -> str:
    """Redacted and printable: the form of any user- or file-derived text on a terminal or log."""
    return printable(redact(str(value)), keep_newlines=keep_newlines)


#: characters of a file's field that a message quotes: a 10 Mb REF, or a 1 MB BED column, was
#: quoted whole in each of up to 1,000 listed bad records, held, printed and written to report.json
EXCERPT_CHARS = 60


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` quoted as a message quotes a field of a file (its ``repr``); past ``limit``
    characters, its first ``limit`` and its length, so a message stays a line whatever the field."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}...({len(text):,} characters)"
