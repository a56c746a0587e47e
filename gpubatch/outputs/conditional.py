"""Writes and deletes made only if an object is still the version a writer last saw.

An output's lease (outputs.lease) must never be replaced nor deleted by a writer that lost it
while it was not looking (a stalled request, a suspended process). A read, then a write, leaves
that gap open on any object store; the store's own compare-and-swap closes it. Three stores
reachable here have one: S3 (``If-None-Match: *`` / ``If-Match: <ETag>`` on PUT and DELETE,
412 when the condition fails), Azure Blob (the same headers on Put Blob and Delete Blob, 412,
or 409 BlobAlreadyExists for a create over an existing blob) and Google Cloud Storage, whose
conditions are on the object's generation, not its ETag (``ifGenerationMatch=0``: only if
there is none; ``ifGenerationMatch=<generation>`` on an upload and a delete; 412 when refused).
Each is sent through the client gpubatch's storage entry point already made for the output
(s3fs's botocore client, adlfs's Azure SDK client, gcsfs's HTTP session), so its credentials,
timeouts and retry settings are the ones every other request of the output has. A version is
what :func:`version_of` takes from the object's info: the ETag, or on GCS the generation.

Each function here is one attempt: the caller retries it (transient failures) under the output's
policy, and a refused condition is an answer (None / False), never retried.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any
from urllib.parse import quote

from gpubatch.io.retry import is_precondition_failed

S3_PROTOCOLS = ("s3", "s3a")
AZURE_PROTOCOLS = ("az", "abfs", "abfss")
GCS_PROTOCOLS = ("gs", "gcs")
#: the protocols whose objects can be written and deleted on a condition (see the module's text)
CONDITIONAL_PROTOCOLS = S3_PROTOCOLS + AZURE_PROTOCOLS + GCS_PROTOCOLS


def version_of(info: dict[str, Any], protocol: str) -> str | None:
    """The version a conditional write names, from an object's fsspec ``info``: on GCS its
    generation (gcsfs's key: GCS conditions uploads and deletes on it, not on the ETag),
    elsewhere its ETag (s3fs's ``ETag``, adlfs's ``etag``); None when the info has none."""
    keys = ("generation",) if protocol in GCS_PROTOCOLS else ("ETag", "etag")
    found = next((info[key] for key in keys if info.get(key)), None)
    return str(found) if found else None


def put_if(fs: Any, protocol: str, path: str, body: bytes, version: str | None) -> str | None:
    """Write ``body`` to ``path`` (fsspec's form: bucket or container, then key) only if the
    object there is still at ``version`` (an ETag; on GCS a generation), or, for None, only if
    there is none: the version of the object written, or None when the condition was refused. An ``If-Match`` on an object
    that is gone is refused too (412, or 404)."""
    try:
        if protocol in GCS_PROTOCOLS:
            return _gcs_put(fs, path, body, version)
        if protocol in AZURE_PROTOCOLS:
            return _azure_put(fs, path, body, version)
        return _s3_put(fs, path, body, version)
    except Exception as exc:  # noqa: BLE001 - a refused condition is an answer, the rest the caller retries
        if refused(exc, version):
            return None
        raise


def delete_if(fs: Any, protocol: str, path: str, version: str) -> bool:
    """Delete ``path`` only if it is still at ``version``: True when deleted, False when another
    writer's object is there now (412) or none is (412 or 404; a retried delete that landed
    meets that too). A server that ignores the condition deletes plainly."""
    try:
        if protocol in GCS_PROTOCOLS:
            return _gcs_delete(fs, path, version)
        if protocol in AZURE_PROTOCOLS:
            _azure_delete(fs, path, version)
        else:
            bucket, key = path.split("/", 1)
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
    except Exception as exc:  # noqa: BLE001 - a refused condition is an answer, the rest the caller retries
        if refused(exc, version):
            return False
        raise
    return True


def refused(exc: BaseException, version: str | None) -> bool:
    """Whether a conditional request failed its condition: 412 (s3fs: OSError(EINVAL) from
    botocore's PreconditionFailed; the Azure SDK: ResourceModifiedError); for a create
    (``If-None-Match: *``) s3fs and adlfs may say FileExistsError, for ``If-Match`` on an object
    that is gone FileNotFoundError (S3's NoSuchKey, Azure's BlobNotFound)."""
    if is_precondition_failed(exc):
        return True
    return isinstance(exc, FileExistsError if version is None else FileNotFoundError)


def _s3_put(fs: Any, path: str, body: bytes, version: str | None) -> str:
    bucket, key = path.split("/", 1)
    condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
    answer = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
    # S3 answers every PUT with its ETag; a server that would not is given the one S3 gives a
    # single-part PUT (if wrong, the next conditional write is refused and the caller's
    # read-back finds its own object)
    return str(answer.get("ETag") or f'"{hashlib.md5(body).hexdigest()}"')


def _azure_put(fs: Any, path: str, body: bytes, version: str | None) -> str:
    """One Put Blob through adlfs's ``pipe_file``, which hands the SDK's condition keywords on:
    ``If-None-Match: *`` (overwrite off) for a create, ``If-Match`` on ``version`` otherwise.
    The SDK answers with the new blob's ETag, quoted as adlfs's ``info`` gives it."""
    from azure.core import MatchConditions
    from azure.core.exceptions import ResourceNotFoundError

    if version is None:
        condition: dict[str, Any] = {"overwrite": False, "match_condition": MatchConditions.IfMissing}
    else:
        condition = {"overwrite": True, "etag": version, "match_condition": MatchConditions.IfNotModified}
    try:
        answer = fs.pipe_file(path, body, **condition)
    except ResourceNotFoundError as exc:  # If-Match on a blob that is gone, where a server says 404
        raise FileNotFoundError(path) from exc
    # Azure answers every Put Blob with its ETag; without one, a tag no blob has: the next
    # conditional write is refused and the caller's read-back finds its own object
    etag = answer.get("etag") if isinstance(answer, dict) else None
    return str(etag or '"unknown"')


def _azure_delete(fs: Any, path: str, version: str) -> None:
    """One Delete Blob with ``If-Match`` on ``version``, through adlfs's own Azure SDK client on
    its event loop (adlfs's ``rm`` takes no condition), bounded by the request timeouts adlfs
    gives its uploads (gpubatch.io.clouds.request_timeouts)."""
    from azure.core import MatchConditions
    from azure.core.exceptions import ResourceNotFoundError
    from fsspec.asyn import sync

    container, key, _ = fs.split_path(path)
    timeouts = dict(getattr(fs, "_timeout_kwargs", None) or {})

    async def delete() -> None:
        async with fs.service_client.get_blob_client(container, key) as blob:
            await blob.delete_blob(etag=version, match_condition=MatchConditions.IfNotModified, **timeouts)

    try:
        sync(fs.loop, delete)
    except ResourceNotFoundError as exc:
        raise FileNotFoundError(path) from exc
    finally:
        fs.invalidate_cache(path)


def _gcs_put(fs: Any, path: str, body: bytes, version: str | None) -> str | None:
    """One JSON-API upload through gcsfs's own session, on ``ifGenerationMatch``: ``0`` for a
    create, ``version`` (a generation) otherwise. The new object's generation, or None when the
    condition was refused: gcsfs raises FileExistsError for every 412, whatever the condition.

    gcsfs's ``pipe_file`` offers only the create (``mode="create"``), so this is its simple
    upload (multipart: metadata, then the bytes) with the condition given. Multipart rather
    than a media upload: GCS honours the condition on both, fake-gcs-server (which tests run)
    only on multipart."""
    bucket, key, _ = fs.split_path(path)
    boundary = uuid.uuid4().hex
    data = (f"--{boundary}\nContent-Type: application/json; charset=UTF-8\n\n"
            f"{json.dumps({'name': key, 'contentType': 'application/json'})}\n"
            f"--{boundary}\nContent-Type: application/json\n\n").encode() + body + f"\n--{boundary}--".encode()
    try:
        answer = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
                         uploadType="multipart", ifGenerationMatch=version or "0", data=data, json_out=True,
                         headers={"Content-Type": f'multipart/related; boundary="{boundary}"'})
    except FileExistsError:
        return None
    finally:
        fs.invalidate_cache(path)
    return str(answer["generation"])


def _gcs_delete(fs: Any, path: str, version: str) -> bool:
    """One Objects: delete with ``ifGenerationMatch`` on ``version`` (a generation): True when
    deleted, False when refused (412, which gcsfs raises as FileExistsError; a 404, the object
    gone, is raised to :func:`delete_if`, which takes it for refused). gcsfs's ``rm`` takes no
    condition, so the request goes through its session as its own delete does. fake-gcs-server
    (1.54, which tests run) deletes whatever the condition: only GCS itself refuses here."""
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
    except FileExistsError:
        return False
    finally:
        fs.invalidate_cache(path)
    return True
