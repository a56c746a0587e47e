"""URIs: the one scheme parser, local paths, and which URIs reach over a network.

Every module that needs to know whether a string names a local file or an object asks here, so
``s3://`` never silently becomes a local folder named ``s3:`` in one place and a bucket in another.
"""

from __future__ import annotations

import os
from urllib.parse import unquote

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


def local_path(uri: str) -> str:
    """The filesystem path of a local URI: the one place a ``file://`` URI becomes a path.

    A ``file://`` URI is percent-decoded (RFC 8089: ``file:///my%20slides/a.svs`` names
    ``/my slides/a.svs``; taken as written it named a folder that does not exist), and its
    ``localhost`` authority dropped; ``file:/path`` (no authority) is read the same. A plain path is a name, not a URI: ``%20`` in it stays literal.
    Decoding here, once, keeps globs and listings working on the decoded path.
    """
    if uri[: len(FILE_PREFIX)].lower() != FILE_PREFIX:
        # RFC 8089's short form, file:/path (no authority), as some tools write it
        return unquote(uri[len("file:"):]) if uri[: len("file:/")].lower() == "file:/" else uri
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
