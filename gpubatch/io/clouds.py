"""Where a gs:// URI's server is, and what that means for both of its clients.

gcsfs (listing, globs, writes, the fallback reads) and obstore's GCS store (range reads, HEADs)
must reach the same server with the same credentials, or a job reads through one what the other
cannot find. Google's libraries name a server other than Google's (fake-gcs-server, a
GCS-compatible store) with ``STORAGE_EMULATOR_HOST``; gcsfs and gpubatch's ``endpoint_url``
storage option name it per job. This module reads both the way gcsfs does, once, for both
clients (:mod:`gpubatch.io.obstore`, :func:`gpubatch.io.storage.get_fs`). The clients' other
per-cloud settings live here too: their own retries off, request timeouts, and an S3 client's
requests counted on the wire (:func:`meter_requests`).
"""

from __future__ import annotations

import math
import os
from typing import Any
from urllib.parse import urlsplit

from gpubatch.io.metrics import meter_s3_session

#: Google's own hosts (storage.googleapis.com, its mTLS and Private Service Connect forms)
GOOGLE_DOMAIN = "googleapis.com"


def gcs_endpoint(options: dict[str, Any]) -> str | None:
    """The GCS server of these options: ``endpoint_url``, else ``STORAGE_EMULATOR_HOST`` (unset,
    empty or ``default``: Google's), with ``http://`` where it names only host:port, as gcsfs
    and Google's client libraries read it; None for Google's own endpoint."""
    endpoint = options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
    if not endpoint or endpoint == "default":
        return None
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def off_google(endpoint: str | None) -> bool:
    """The endpoint is a server other than Google's: an emulator or a GCS-compatible store."""
    return endpoint is not None and not (urlsplit(endpoint).hostname or "").endswith(GOOGLE_DOMAIN)


def google_credentials_found() -> bool:
    """Application Default Credentials are configured on this machine (the environment's file,
    or gcloud's ``application-default login`` file): what gcsfs tries before going anonymous."""
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return True
    config = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    return os.path.isfile(os.path.join(config, "application_default_credentials.json"))


def anonymous_off_google(options: dict[str, Any]) -> bool:
    """Whether gcsfs would reach this server unsigned though no option says ``anon``: a server
    off Google, no token given, and no Application Default Credentials. (gcsfs tries those
    credentials, then goes anonymous; object_store would ask Google's metadata server for a
    token, which off Google Cloud fails, and every read with it.)"""
    return (options.get("token") is None and off_google(gcs_endpoint(options))
            and not google_credentials_found())


def serve_off_google(options: dict[str, Any]) -> None:
    """Make fsspec's gs:// filesystem ask Google's layout API of Google only, once these options
    name a server that is not Google's; every gs:// filesystem made after (gpubatch's, and those
    zarr, wsidicom and ``fsspec.open`` make from storage options) is then of the class below.

    gcsfs 2026.3 made its default class ask Google's gRPC Storage Control API for a bucket's
    layout (zonal, hierarchical) before opens, infos, globs and writes. A server other than
    Google's does not answer it, and the ask is retried for about a minute per call before gcsfs
    goes on as for a plain bucket; buckets of those layouts exist only on Google. A filesystem
    whose server is Google's asks as before.
    """
    if not off_google(gcs_endpoint(options)):
        return
    import fsspec

    try:
        cls = fsspec.get_filesystem_class("gs")
    except (ImportError, ValueError):  # no gcsfs: get_fs says which extra to install
        return
    if hasattr(cls, "_lookup_bucket_type") and not getattr(cls, "asks_layout_of_google_only", False):
        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, _layout_of_google_only(), clobber=True)


_classes: dict[str, type] = {}


def _layout_of_google_only() -> type:
    """gcsfs's default class, asking a bucket's layout only where its server is Google's (made
    once, on first need: gcsfs is an extra; :func:`__getattr__` finds it for pickle)."""
    if "GCSFileSystem" not in _classes:
        from fsspec import asyn
        from gcsfs.extended_gcsfs import BucketType, ExtendedGcsFileSystem

        class GCSFileSystem(ExtendedGcsFileSystem):  # type: ignore[misc]
            asks_layout_of_google_only = True

            async def _lookup_bucket_type(self, bucket: str) -> Any:
                if off_google(self._location):
                    return BucketType.NON_HIERARCHICAL
                return await super()._lookup_bucket_type(bucket)

            _sync_lookup_bucket_type = asyn.sync_wrapper(_lookup_bucket_type)

        GCSFileSystem.__module__, GCSFileSystem.__qualname__ = __name__, "GCSFileSystem"
        _classes["GCSFileSystem"] = GCSFileSystem
    return _classes["GCSFileSystem"]


def __getattr__(name: str) -> Any:
    """``GCSFileSystem`` (the class above) for an unpickler in a process that never made it."""
    if name == "GCSFileSystem":
        return _layout_of_google_only()
    raise AttributeError(name)


def client_retries_off(fs: Any) -> None:
    """gcsfs's and adlfs's own retries off on a filesystem gpubatch retries itself, as s3fs's
    are (``retries = 1``): otherwise a 503 is retried inside the client, unseen and uncounted,
    before gpubatch's policy sees it, after sleeps gpubatch does not bound.

    gcsfs retries every request 6 times (sleeping up to 31 s) in a decorator whose count is fixed
    when its class is defined (its ``retries`` attribute changes nothing): the instance gets the
    undecorated request. adlfs's Azure SDK client retries 3 times from 15 s apart (up to a minute
    per request): its retry policy, shared by the clients it derives, is set to none. Where a
    client's shape is not the one known here, its own retries stay.
    """
    import sys
    import types

    gcsfs = sys.modules.get("gcsfs.core")  # loaded, where fs is one of its filesystems
    if gcsfs is not None and isinstance(fs, gcsfs.GCSFileSystem):
        plain = getattr(type(fs)._request, "__wrapped__", None)
        if plain is not None:
            fs._request = types.MethodType(plain, fs)
    pipeline = getattr(getattr(fs, "service_client", None), "_pipeline", None)
    for policy in getattr(pipeline, "_impl_policies", None) or ():
        if hasattr(policy, "total_retries") and hasattr(policy, "status_retries"):
            policy.total_retries = policy.connect_retries = policy.read_retries = policy.status_retries = 0


def request_timeouts(protocol: str, options: dict[str, Any], connect_s: float, read_s: float) -> dict[str, Any]:
    """``options`` with gcsfs's or adlfs's request timeouts set to the bounds every other client
    here has (a connection within ``connect_s``, no silence longer than ``read_s``), unless they
    set their own: a server that accepts and never answers held a read unbounded otherwise.

    gcsfs: ``requests_timeout`` is what its every request passes aiohttp as ``timeout``; left
    None, aiohttp takes that as no bound at all (not even the session's 300 s), so it gets the
    ``aiohttp.ClientTimeout`` the http(s) client has. adlfs: ``connection_timeout`` and
    ``read_timeout`` (int seconds; azure-core's default is 300 s each), which adlfs passes to
    its blob downloads and uploads only (a listing or a HEAD keeps azure-core's default)."""
    if protocol in ("gs", "gcs") and "requests_timeout" not in options:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)
        return {**options, "requests_timeout": timeout}
    if protocol in ("az", "abfs", "abfss"):
        return {"connection_timeout": math.ceil(connect_s), "read_timeout": math.ceil(read_s), **options}
    return options


def meter_requests(fs: Any) -> None:
    """Count an s3fs client's requests on the wire (io.metrics.meter_s3_session): the session its
    clients are made from is given before the first is made, and kept by s3fs (not owned, so a
    refreshed client is made from it again). Not carried when the filesystem is pickled: a copy
    elsewhere counts nothing, rather than counting twice. Other protocols are not metered."""
    if "s3" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        return
    import aiobotocore.session

    session = aiobotocore.session.AioSession(**getattr(fs, "kwargs", {}))
    meter_s3_session(session)
    fs.session, fs._session_is_owned = session, False
    fs.gpubatch_metered = True


def wire_counted(fs: Any) -> bool:
    """Whether every request of ``fs`` is counted on the wire (an S3 client :func:`gpubatch.io.storage.get_fs` made),
    so that its callers count none themselves."""
    return bool(getattr(fs, "gpubatch_metered", False))
