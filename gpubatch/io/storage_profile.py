"""The profile's storage settings in force: a worker process's (the default outside a shard) and
each shard's own (:func:`shard_storage`), which the storage entry point (io.storage) merges under
a job's options and asks for its range-read client.

A profile's ``storage`` (fsspec options, credentials among them) and ``range_reader`` were the
worker process's alone, replaced when another job's shard came: two jobs on one cluster then read
with each other's endpoint and credentials. Kept per shard in a context variable, they follow
the shard's work onto the threads that carry its context (core.threads.ContextPool).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from typing import Any

from gpubatch.io.redact import register_secrets

__all__ = ["RANGE_READERS", "configure_storage", "current_profile", "range_reader_choice", "shard_storage",
           "storage_profile"]

#: range-read clients a profile's ``range_reader`` may name
RANGE_READERS = ("auto", "obstore", "fsspec")

#: this process's profile settings (:func:`configure_storage`): the default outside a shard
_profile_options: dict[str, Any] = {}
_settings: dict[str, str] = {}
#: the profile settings (storage options, range reader) of the shard this thread (task) runs,
#: set by :func:`shard_storage`; None outside one: the process's. Per shard, not per process:
#: two jobs' shards on one worker read each with its own job's options and credentials
_shard_profile: contextvars.ContextVar[tuple[dict[str, Any], dict[str, str]] | None] = contextvars.ContextVar(
    "gpubatch_shard_storage", default=None)


def _profile_settings(profile: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(storage options, settings) of a profile: its ``storage`` (fsspec options, under the job's
    own) and ``range_reader`` (auto, obstore or fsspec); the options' secrets registered."""
    profile = profile or {}
    options = dict(profile.get("storage") or {})
    register_secrets(options)
    settings = {"range_reader": str(profile["range_reader"])} if profile.get("range_reader") else {}
    return options, settings


def current_profile() -> tuple[dict[str, Any], dict[str, str]]:
    """The profile settings in force here: the shard's (:func:`shard_storage`), else the process's."""
    return _shard_profile.get() or (_profile_options, _settings)


def configure_storage(profile: dict[str, Any] | None) -> None:
    """Take a profile's ``storage`` and ``range_reader`` as this process's: the default of code
    outside a shard (a shard's are its job's: :func:`shard_storage`)."""
    _set_process_profile(*_profile_settings(profile))


def _set_process_profile(options: dict[str, Any], settings: dict[str, str]) -> None:
    _profile_options.clear()
    _profile_options.update(options)
    _settings.clear()
    _settings.update(settings)


@contextlib.contextmanager
def shard_storage(profile: dict[str, Any] | None) -> Iterator[None]:
    """Within the block (one shard on a worker), every storage call takes ``profile``'s options
    and range reader instead of the process's; so do the threads the shard's work runs on, which
    carry its context (core.threads.ContextPool). Replacing the process's when another job's
    shard came made the first job's running shards read with the other's endpoint and
    credentials (failing, or reading another bucket's object of the same name)."""
    token = _shard_profile.set(_profile_settings(profile))
    try:
        yield
    finally:
        _shard_profile.reset(token)


@contextlib.contextmanager
def storage_profile(profile: dict[str, Any] | None) -> Iterator[None]:
    """:func:`configure_storage` for a block, then this process's settings as they were: for a
    client that reads inputs as a worker would (``validate``) and must not keep a profile's
    credentials past it."""
    options, settings = dict(_profile_options), dict(_settings)
    configure_storage(profile)
    try:
        yield
    finally:
        _set_process_profile(options, settings)


def range_reader_choice() -> str:
    """The range-read client this process uses for remote objects: the profile's
    ``range_reader``, else ``GPUBATCH_RANGE_READER``, else ``auto`` (obstore where it can)."""
    choice = current_profile()[1].get("range_reader") or os.environ.get("GPUBATCH_RANGE_READER") or "auto"
    if choice not in RANGE_READERS:
        raise ValueError(f"range_reader must be one of {RANGE_READERS}, not {choice!r}")
    return choice
