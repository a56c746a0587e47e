"""URIs: the one scheme parser, local paths, and which URIs reach over a network.

Every module that needs to know whether a string names a local file or an object asks here, so
``s3://`` never silently becomes a local folder named ``s3:`` in one place and a bucket in another.
"""

from __future__ import annotations

import os
from urllib.parse import unquote

from gpubatch.core.errors import InputError

#: schemes fsspec (or obstore) reaches over a network; ``memory://`` behaves like one in tests
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "http", "https", "az", "abfs", "abfss", "memory")


def protocol_of(uri: str) -> str:
    """The scheme of a URI, lower-cased; ``file`` for plain paths and ``file://`` URIs."""
    head, sep, _ = uri.partition("://")
    if not sep or not head or not head.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return "file"
    return head.lower()


def is_remote(uri: str) -> bool:
    """True for URIs that are read over a network (existence is checked at run time)."""
    return protocol_of(uri) in REMOTE_SCHEMES


#: the scheme of a local URI, as written before its path
FILE_PREFIX = "file://"


def file_uri_host(uri: str) -> str:
    """The other machine a ``file://`` URI names: its authority, '' where it names none
    (``file:///p``) or ``localhost`` (RFC 8089: both are this machine), and '' for anything
    that is not a ``file://`` URI."""
    if uri[: len(FILE_PREFIX)].lower() != FILE_PREFIX:
        return ""
    host = uri[len(FILE_PREFIX):].split("/", 1)[0]
    return "" if host.lower() == "localhost" else host


def other_host_problem(uri: str) -> str | None:
    """Why a ``file://`` URI naming another machine cannot be read, with the fix; None for any
    other URI. ``file://server/p`` is ``/p`` on ``server`` (RFC 8089), never the relative path
    ``server/p`` it was read as: a file of the same name under the working directory was read
    (or written) in its place."""
    host = file_uri_host(uri)
    if not host:
        return None
    path = uri[len(FILE_PREFIX) + len(host):] or "/"
    return (f"names a file on the host {host!r}, and file:// URIs reach this machine only; drop the "
            f"host (file://{path}) if the file is here, or mount {host}'s share on this machine and "
            "give its local path")


def local_path(uri: str) -> str:
    """The filesystem path of a local URI: the one place a ``file://`` URI becomes a path.

    A ``file://`` URI is percent-decoded (RFC 8089: ``file:///my%20slides/a.svs`` names
    ``/my slides/a.svs``; taken as written it named a folder that does not exist), and its
    ``localhost`` authority dropped; ``file:/path`` (no authority) is read the same. Another
    host's authority is an InputError (``other_host_problem``; the spec checks refuse it
    first). A plain path is a name, not a URI: ``%20`` in it stays literal. Decoding here, once,
    keeps globs and listings working on the decoded path.
    """
    if uri[: len(FILE_PREFIX)].lower() != FILE_PREFIX:
        # RFC 8089's short form, file:/path (no authority), as some tools write it
        return unquote(uri[len("file:"):]) if uri[: len("file:/")].lower() == "file:/" else uri
    problem = other_host_problem(uri)
    if problem is not None:
        raise InputError(uri, problem)
    rest = uri[len(FILE_PREFIX):]
    if rest[: len("localhost/")].lower() == "localhost/":
        rest = rest[len("localhost"):]
    return unquote(rest)


def has_magic(text: str) -> bool:
    """True when ``text`` holds glob characters."""
    return any(c in text for c in "*?[")


#: the prefix that makes an input a glob even where a file has its literal name
GLOB_PREFIX = "glob:"


def split_glob(uri: str) -> tuple[str, bool]:
    """(the URI without a ``glob:`` prefix, whether the prefix was there)."""
    return (uri[len(GLOB_PREFIX):], True) if uri.startswith(GLOB_PREFIX) else (uri, False)


def uri_name(uri: str) -> str:
    """The last path component of a URI, without any query string (which may carry a signature)."""
    return os.path.basename(uri.split("?", 1)[0].rstrip("/"))


def spelled_as(written: str, uri: str) -> str:
    """``uri`` (a filesystem's name for an object) in the scheme ``written`` was given in: a
    filesystem names its objects in its first scheme (adlfs: ``abfs://`` for ``az://``), and the
    inputs' URIs are what outputs, the audit, ``--resume`` and error messages know them by."""
    if "://" not in written or "://" not in uri:
        return uri
    return f"{written.split('://', 1)[0]}://{uri.split('://', 1)[1]}"


def _path_and_query(uri: str) -> tuple[str, str]:
    """(``uri`` up to its path's end, the query and fragment after it): only an http(s) URL has
    them; an object key or a file name may hold ``?`` and ``#`` as plain characters."""
    if protocol_of(uri) not in ("http", "https"):
        return uri, ""
    cuts = [i for i in (uri.find("?"), uri.find("#")) if i >= 0]
    cut = min(cuts) if cuts else len(uri)
    return uri[:cut], uri[cut:]


def has_query(uri: str) -> bool:
    """Whether ``uri`` is an http(s) URL with a query: a presigned URL's signature, a SAS token
    (an object key's ``?`` is a plain character)."""
    return _path_and_query(uri)[1].startswith("?")


def suffixed(uri: str, suffix: str) -> str:
    """The file beside ``uri`` named as it is plus ``suffix`` (a FASTA's ``.fai``): the suffix
    goes on the path, before an http(s) URL's query (a presigned URL's signature, a SAS token),
    which is kept; appended to the whole string it landed inside the query's last value."""
    path, query = _path_and_query(uri)
    return path + suffix + query


def child(uri: str, name: str) -> str:
    """The file ``name`` inside the folder or prefix ``uri`` (a zarr's ``zarr.json``), an
    http(s) URL's query kept after the path, as :func:`suffixed` keeps it."""
    path, query = _path_and_query(uri)
    return f"{path.rstrip('/')}/{name}{query}"
