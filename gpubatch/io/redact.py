"""Credential redaction: what may be printed, logged or written about a URI, an option or an error.

Secrets reach gpubatch from storage options (job, profile), the environment and URIs themselves
(userinfo, presigned query parameters). Every value seen in options or the AWS_* environment is
registered here, so free text (an exception message from a client library) is scrubbed of it too.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

SENSITIVE_KEYS = frozenset({
    "key", "secret", "token", "password", "passwd", "access_key", "secret_key", "access_key_id",
    "secret_access_key", "session_token", "aws_access_key_id", "aws_secret_access_key",
    "aws_session_token", "security_token", "sas_token", "account_key", "credential",
    "credentials", "client_secret", "refresh_token", "api_key", "authorization", "username",
})
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_SECURITY_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY")
MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId|"
    r"sig|token|access_token|key|secret|password)=([^&\s\"']+)")
_ASSIGN_SECRET = re.compile(
    r"(?i)(\b[\"']?(?:aws_)?(?:secret_access_key|access_key_id|session_token|secret|password|token|key)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\"',}\s]+)")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{12,}\b")
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secrets(options: Any) -> None:
    """Remember secret values so that :func:`redact` can scrub them from free text too."""
    if isinstance(options, dict):
        for k, v in options.items():
            if str(k).lower() in SENSITIVE_KEYS and isinstance(v, str) and len(v) >= 4:
                with _secrets_lock:
                    _secrets.add(v)
            else:
                register_secrets(v)


def redact(value: Any) -> Any:
    """A copy of ``value`` with credentials removed: safe for logs, reports and error messages.

    Mappings lose the values of sensitive keys (key, secret, token, password, ...), at any depth;
    strings lose URL userinfo, secret-looking query parameters and assignments, AWS key ids, and
    every secret value seen in storage options or the AWS_* environment.
    """
    if isinstance(value, dict):
        return {k: (MASK if str(k).lower() in SENSITIVE_KEYS and v not in (None, "", False)
                    else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if not isinstance(value, str):
        return value
    text = _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", value)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}={MASK}", text)
    text = _ASSIGN_SECRET.sub(lambda m: m.group(1) + MASK, text)
    text = _AWS_KEY_ID.sub(MASK, text)
    with _secrets_lock:
        known = set(_secrets)
    known.update(v for v in (os.environ.get(k) for k in SECRET_ENV) if v and len(v) >= 4)
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
