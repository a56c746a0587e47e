"""A secret from any source is scrubbed from free text by redact().

The secrets here are shaped so that no pattern of redact() recognises them (no ``key=``, no AKIA
prefix, no URL): only the registry of known values can remove them from a message such as a
client library's exception text. Each source registers through the code a run uses: the AWS_*
environment, a cluster profile's ``storage`` options (configure_storage, as a worker does), a
job's ``input.storage`` options (resolve_options, as every open does) and a URI's own secret parts.
"""

from __future__ import annotations

import uuid

import pytest

from gpubatch.io.redact import MASK, redact
from gpubatch.io.storage import library_options, resolve_options
from gpubatch.io.storage_profile import configure_storage


def _secret(tag: str) -> str:
    """A value unique to this test run, that looks like nothing in particular."""
    return f"{tag}{uuid.uuid4().hex[:12]}"


def _leaks(secret: str) -> str:
    return redact(f"botocore said: request signed with {secret} was refused (see {secret}/x)")


def test_secret_from_the_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = _secret("envsecret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    text = _leaks(secret)
    assert secret not in text and text.count(MASK) == 2


def test_secret_from_profile_storage_options_is_scrubbed() -> None:
    secret = _secret("profsecret")
    configure_storage({"storage": {"client_kwargs": {"aws_secret_access_key": secret}}})
    try:
        text = _leaks(secret)
    finally:
        configure_storage(None)
    assert secret not in text and text.count(MASK) == 2


def test_secret_from_job_input_storage_is_scrubbed() -> None:
    secret, token = _secret("jobsecret"), _secret("jobtoken")
    resolve_options("s3://bucket/slide.svs", {"key": "AKIDplain", "secret": secret, "token": token})
    for value in (secret, token):
        text = _leaks(value)
        assert value not in text and text.count(MASK) == 2


def test_secret_from_library_options_is_scrubbed() -> None:
    secret = _secret("zarrpass")
    library_options("s3://bucket/g.zarr", {"password": secret})
    assert secret not in _leaks(secret)


def test_secret_from_a_uri_is_scrubbed_in_any_form() -> None:
    password = _secret("pw/") + "+x"
    resolve_options(f"https://user:{password.replace('/', '%2F').replace('+', '%2B')}@host/slide.svs", None)
    assert password not in _leaks(password)


def test_unregistered_text_is_left_alone() -> None:
    text = f"an ordinary message about {_secret('nothing')}"
    assert redact(text) == text


def test_the_sentence_around_a_masked_value_keeps_its_punctuation() -> None:
    """A secret query value or assignment followed by ':' or '.' took the sentence's punctuation
    with it ("...?token=*** FASTA index not found"); the secret itself is still masked whole."""
    cases = {
        "https://h/g.fa?token=s3cr3t: FASTA index not found": "https://h/g.fa?token=***: FASTA index not found",
        "(see https://h/x?sig=abc/+=)": "(see https://h/x?sig=***)",
        "password: hunter2.": "password: ***.",
        "https://h/g.fa?token=ab:cd not found": "https://h/g.fa?token=*** not found",  # ':' inside: masked
        "secret=abc:def": "secret=***",
    }
    assert {text: redact(text) for text in cases} == cases


def test_an_azure_connection_string_s_key_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Azure's connection string carries the account key (``AccountKey=...;``): the option's
    value is masked as a whole, the key is scrubbed from free text alone or in the string, from
    the option or the environment, and a SAS in one too."""
    key, sas = _secret("azkey") + "/x+y==", "sv=2024&sig=" + _secret("azsig")
    conn = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={key};EndpointSuffix=core.windows.net"
    assert redact({"connection_string": conn}) == {"connection_string": MASK}
    resolve_options("az://container/slide.svs", {"connection_string": conn})
    assert key not in _leaks(key)
    unregistered = _secret("other") + "=="
    text = redact(f"failed: AccountName=acct;AccountKey={unregistered};SharedAccessSignature={sas}")
    assert unregistered not in text and "azsig" not in text and "AccountName=acct" in text
    env_key = _secret("envkey")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", f"AccountName=a;AccountKey={env_key}")
    assert env_key not in redact(f"AccountName=a;AccountKey={env_key}") and env_key not in _leaks(env_key)


def test_a_token_mode_is_not_a_secret_but_a_token_is() -> None:
    """gcsfs's ``token: anon`` (and its other modes) names how to sign, not a secret: remembered,
    it scrubbed "anon" from every later message, the hint "anon: true" included."""
    from gpubatch.io.redact import redact, register_secrets

    register_secrets({"token": "anon", "nested": {"token": "google_default"}})
    register_secrets({"token": "ya29.a0-real-looking-oauth-token"})
    text = "public bucket? set anon: true, or token google_default; ya29.a0-real-looking-oauth-token"
    assert redact(text) == "public bucket? set anon: true, or token google_default; ***"


def test_a_library_warning_during_a_read_names_the_file_without_its_secrets(caplog: pytest.LogCaptureFixture) -> None:
    """tifffile's and imagecodecs' records are re-logged naming the file the thread reads
    (core.logs.reading); a presigned URL's signature never goes with the name. (The name is
    redacted when a record is logged, not each time a tile's decode begins.)"""
    import logging

    from gpubatch.core.logs import ROUTED, reading, route_library_logs

    signature = _secret("sig")
    route_library_logs(python_warnings=False)
    with caplog.at_level(logging.DEBUG, logger=ROUTED), reading(f"https://host/a.svs?X-Amz-Signature={signature}"):
        logging.getLogger("tifffile").warning("TiffPage 3: invalid tag value")
    routed = [r.getMessage() for r in caplog.records if r.name == ROUTED]
    assert len(routed) == 1 and "a.svs" in routed[0] and "invalid tag value" in routed[0]
    assert signature not in routed[0]
