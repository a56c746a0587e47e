"""zarr groups on disk and on object storage: the one place gpubatch opens one.

zarr reaches object storage through its ``FsspecStore``, which asks fsspec for an *asynchronous*
filesystem. For az:// (adlfs) that instance cannot be closed: adlfs registers
``weakref.finalize(self, sync, self.loop, close_service_client, self)`` and an asynchronous
instance has no loop, so at interpreter exit every one of them printed
``RuntimeError: Loop is not running`` (fsspec/asyn.py, in ``sync``) with its traceback, after a
run that had written or read a zarr on az://, and kept its Azure client open until then. fsspec
also keeps asynchronous instances per thread, so a process made one such client per thread that
opened a group. Here az:// groups are served instead by gpubatch's own synchronous filesystem
(io.storage.get_fs: one per options and process, on fsspec's loop, whose finaliser closes it),
wrapped for zarr by fsspec's ``AsyncFileSystemWrapper``. s3fs's and gcsfs's asynchronous
instances close cleanly and stay with zarr's own path.
"""

from __future__ import annotations

from typing import Any

from gpubatch.io.storage import get_fs, library_fs, library_options
from gpubatch.io.uris import is_remote, local_path, protocol_of

#: schemes whose asynchronous fsspec filesystem cannot be closed (adlfs): served synchronously
WRAPPED_PROTOCOLS = ("az", "abfs", "abfss")


def open_zarr_group(uri: str, options: dict[str, Any] | None = None, mode: str = "r", *,
                    counted: bool = False, attempts: int | None = None, **kwargs: Any) -> Any:
    """``zarr.open_group`` of a local folder or an object-store prefix, on :func:`zarr_store`'s
    store (which says what ``options``, ``counted`` and ``attempts`` do). ``kwargs`` go to zarr
    (``attributes``)."""
    import zarr

    if not is_remote(uri):
        return zarr.open_group(local_path(uri), mode=mode, **kwargs)  # type: ignore[arg-type]
    store = zarr_store(uri, options, mode, counted=counted, attempts=attempts)
    return zarr.open_group(store, mode=mode, **kwargs)  # type: ignore[arg-type]


def zarr_store(uri: str, options: dict[str, Any] | None = None, mode: str = "r", *,
               counted: bool = False, attempts: int | None = None) -> Any:
    """The zarr store of a local folder or an object-store prefix (``options``: its fsspec
    storage options, as :func:`gpubatch.io.storage.library_options` completes them: zarr makes
    its own requests, so the client's retries stay on). ``counted``: zarr's requests go through
    the storage layer's counted client (:func:`gpubatch.io.storage.library_fs`: an output's, which
    the report counts; an S3 client's on the wire). ``attempts``: the client's own retries (an
    output's policy), else the run's."""
    from zarr.storage import FsspecStore, LocalStore

    read_only = mode == "r"
    if not is_remote(uri):
        return LocalStore(local_path(uri), read_only=read_only)
    storage_options = library_options(uri, options, attempts)
    if protocol_of(uri) in WRAPPED_PROTOCOLS:
        return _wrapped_store(uri, storage_options, mode)
    if not counted:
        return FsspecStore.from_url(uri, storage_options=storage_options, read_only=read_only)
    fs, path = library_fs(uri, options, asynchronous=True, attempts=attempts)
    return FsspecStore(fs, path=path, read_only=read_only)


def _wrapped_store(uri: str, storage_options: dict[str, Any], mode: str) -> Any:
    """A zarr store over gpubatch's synchronous filesystem for ``uri`` (see the module's note)."""
    from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
    from zarr.storage import FsspecStore

    fs, path = get_fs(uri, storage_options, client_retries=True)
    return FsspecStore(AsyncFileSystemWrapper(fs, asynchronous=True), path=path, read_only=mode == "r")
