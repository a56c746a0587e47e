"""A variant file as streams read in order, local or at any fsspec URL, never copied to disk.

A job's disk and memory are bounded by its configuration, never by its input: a 10 GB cohort
``.vcf.gz`` must not become a 10 GB copy in ``/tmp`` (or on a node's small local disk), nor a
remote file a download held whole in memory. Every read here is a stream:

* the layout checks (``variant_files.sniff``) read the first lines, the first bytes, or the
  last 28 (a bgzip file's end-of-file block), each a fresh open of the file;
* htslib (pysam) reads a text VCF or a BCF through a pipe that a thread fills with the file,
  each record's fields bounded and its genotype columns cut off (``variant_guard`` for text:
  one record with a 20 MB REF held about five copies of it in htslib and pysam; ``variant_bcf``
  for a BCF, whose records htslib read whole, samples and all). Without the pipe htslib could
  not read a plain-gzip file (``gzip``, not ``bgzip``: pysam asks the stream's offset, "seek not
  implemented in files compressed by method 1"), nor an ``s3://`` URL with the job's storage
  options. The pipe holds 64 KiB, so memory stays bounded whatever the file's size; a damaged
  stream is raised by the reader (:meth:`Feed.raise_error`) once htslib has read the whole lines
  (records) before it.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import logging
import os
import threading
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

from gpubatch.core.errors import SpecError
from gpubatch.io.redact import redact
from gpubatch.io.storage import open_file
from gpubatch.io.uris import is_remote, local_path
from gpubatch.sources.genome.variant_bcf import BcfGuard
from gpubatch.sources.genome.variant_guard import FieldGuard

log = logging.getLogger("gpubatch")

FIELD = "windows.variants"
GZIP_MAGIC = b"\x1f\x8b"
#: what reading a damaged gzip stream raises (EOFError: it breaks off; the others: it is corrupt)
GZIP_ERRORS = (EOFError, OSError, zlib.error)
#: bytes the feeding thread gathers before a write into htslib's pipe, and reads of a remote file
FEED_CHUNK = 1 << 16
#: seconds the reader waits for the feeding thread once htslib is closed (it stops at its next write)
FEED_JOIN_SECONDS = 30.0


@dataclass(frozen=True)
class VariantInput:
    """Where a variant file is, and how to open it: its URI and the job's storage options."""

    uri: str
    storage_options: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        """The file's name, as every message names a line of it."""
        return os.path.basename(self.uri.rstrip("/"))

    @property
    def local(self) -> str | None:
        """The local path htslib can open itself, or None for a remote file."""
        return None if is_remote(self.uri) else local_path(self.uri)

    @contextlib.contextmanager
    def raw(self) -> Iterator[IO[bytes]]:
        """The file's bytes as stored (compressed or not), a seekable stream."""
        if self.local is not None:
            with open(self.local, "rb") as f:
                yield f
            return
        with open_file(self.uri, self.storage_options, "rb") as f:
            yield cast(IO[bytes], f)

    @contextlib.contextmanager
    def text(self) -> Iterator[IO[bytes]]:
        """The file's text: gzip and bgzip (told by their first bytes, not the name) decompressed."""
        with self.raw() as raw:
            magic = raw.read(2)
            raw.seek(0)
            if magic != GZIP_MAGIC:
                yield raw
                return
            with gzip.GzipFile(fileobj=raw) as inflated:
                yield cast(IO[bytes], inflated)

    def head(self, size: int) -> bytes:
        """The file's first ``size`` bytes as stored."""
        with self.raw() as raw:
            return raw.read(size)

    def tail(self, size: int) -> bytes:
        """The file's last ``size`` bytes as stored (all of it when it is shorter)."""
        with self.raw() as raw:
            end = raw.seek(0, os.SEEK_END)
            raw.seek(max(0, end - size))
            return raw.read()

    def is_plain_gzip(self) -> bool:
        """gzip, but not BGZF (whose header carries the 'BC' extra field): htslib cannot open it."""
        head = self.head(14)
        return head[:2] == GZIP_MAGIC and not (len(head) == 14 and head[3] & 4 and head[12:14] == b"BC")


def gzip_damage(uri: str, after_line: int, exc: BaseException, tool: str = "gzip", unit: str = "line") -> SpecError:
    """The refusal of a compressed file whose stream fails after line ``after_line``: cut short
    (a copy, a download or a disk that ran out) or corrupt. Its later records are lost, and
    scoring the ones before would pass a part of the file for the whole."""
    name = os.path.basename(uri.rstrip("/"))
    what = (f"is cut short: the {tool} stream breaks off after {unit} {after_line}" if isinstance(exc, EOFError)
            else f"is damaged: its {tool} stream fails after {unit} {after_line} ({exc})")
    return SpecError([(FIELD, f"{uri} {what}; the records past it are lost. Copy or write the file again "
                              f"whole (`{tool} -t {name}` tests a copy)")])


def numbered_lines(source: VariantInput, line_bytes: int = -1,
                   long_line: Callable[[bytes], None] | None = None) -> Generator[tuple[int, bytes], None, None]:
    """(line number, line) of a text file, plain or gzip; a damaged gzip stream is refused
    saying after which line (it raised EOFError out of the plan). With ``line_bytes``, each line
    is its first ``line_bytes`` bytes, the rest read past as far: a look at a file's first lines
    held each whole (an unwrapped FASTA given as the variants: its contigs, 250 MB a line). With
    ``long_line`` too, a line longer than that (its newline counted) is passed to it whole, in
    pieces of a read each, before its first bytes are yielded: what a reader says of a line it
    leaves out is measured in bounded memory (a table's line too long for its alleles)."""
    number = 0
    try:
        with source.text() as f:
            lines = iter(f) if line_bytes < 0 else _line_starts(f, line_bytes, long_line)
            for number, raw in enumerate(lines, start=1):  # noqa: B007 (number names the break)
                yield number, raw
    except GZIP_ERRORS as exc:
        raise gzip_damage(source.uri, number, exc) from None


def _line_starts(f: IO[bytes], line_bytes: int, long_line: Callable[[bytes], None] | None = None) -> Iterator[bytes]:
    """Each line of ``f`` cut to its first ``line_bytes`` bytes, the rest read past: read in
    blocks (an fsspec file's ``readline`` takes no size), each what one read gives (``read1``):
    a gzip stream cut short then yields its lines before the break, where a whole block's
    ``read`` raised it first, naming no line read. A longer line goes to ``long_line`` whole."""
    read = getattr(f, "read1", f.read)
    start = b""  # the start of the line being read, ``line_bytes`` at most
    long = False  # whether the line being read is longer than ``line_bytes`` (passed to ``long_line``)
    while block := read(FEED_CHUNK):
        at = 0
        while (end := block.find(b"\n", at)) >= 0:
            if long_line is not None and (long or len(start) + end + 1 - at > line_bytes):
                _pass_long(long_line, long, start, block[at : end + 1], line_bytes)
            yield start + block[at : min(end + 1, at + line_bytes - len(start))]
            start, at, long = b"", end + 1, False
        if long_line is not None and (long or len(start) + len(block) - at > line_bytes):
            long = _pass_long(long_line, long, start, block[at:], line_bytes)
        start += block[at : at + line_bytes - len(start)]
    if start:
        yield start


def _pass_long(long_line: Callable[[bytes], None], long: bool, start: bytes, piece: bytes, line_bytes: int) -> bool:
    """``piece`` of a line whose first bytes are ``start`` to ``long_line`` where the line is (with
    it) longer than ``line_bytes``: its start first, when it just became so. Whether it is."""
    if not long:
        if len(start) + len(piece) <= line_bytes:
            return False
        long_line(start)
    long_line(piece)
    return True


class Feed:
    """The thread's side of htslib's pipe: what it writes, and the error that stopped it, which
    the reader raises (:meth:`raise_error`) once htslib has read to the pipe's end."""

    def __init__(self, source: VariantInput, max_allele: int):
        self.source = source
        #: the longest REF or ALT passed on (in a record otherwise too long to pass whole)
        self.max_allele = max_allele
        self.guard: FieldGuard | BcfGuard | None = None
        self.error: BaseException | None = None

    def run(self, fd: int) -> None:
        """Fill the pipe's write end ``fd``, then close it (htslib reads that as the file's end).
        The error is kept before the close, so the reader finds it as soon as htslib stops."""
        out = os.fdopen(fd, "wb", buffering=FEED_CHUNK)
        try:
            self._guarded(out)
        except BrokenPipeError:
            pass  # htslib was closed before the file's end: nothing more is read
        except Exception as exc:  # noqa: BLE001 -- handed to the reader, which raises it in the plan
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                out.close()

    def _guarded(self, out: IO[bytes]) -> None:
        """The file's text through a FieldGuard, or a BCF's bytes through a BcfGuard (told by
        their first bytes), read in blocks: a damaged gzip stream is refused after the last whole
        line or record passed on (htslib has read up to it)."""
        unit = "line"
        try:
            with self.source.text() as f:
                read = getattr(f, "read1", f.read)
                block = read(FEED_CHUNK)
                if block.startswith(b"BCF"):
                    unit, self.guard = "record", BcfGuard(out, self.max_allele, name=self.source.name)
                    self.guard.copy(block, read)
                    return
                guard = self.guard = FieldGuard(out, self.max_allele)
                while block:
                    guard.feed(block)
                    block = read(FEED_CHUNK)
        except BrokenPipeError:
            raise
        except GZIP_ERRORS as exc:
            raise gzip_damage(self.source.uri, self.guard.lines if self.guard else 0, exc, unit=unit) from None
        guard.close()

    def problem(self, line: int) -> str | None:
        """The problem of line ``line`` when the guard put a placeholder record in its place."""
        return self.guard.problems.pop(line, None) if self.guard is not None else None

    def raise_error(self) -> None:
        """The error that stopped the feed before the file's end, if one did."""
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def htslib_readable(source: VariantInput, max_allele: int) -> Iterator[tuple[IO[bytes], Feed]]:
    """What pysam opens for ``source``, a text VCF or a BCF (its REF and ALT held up to
    ``max_allele`` bases): the read end of a pipe a thread fills through the file's guard (with
    its Feed, whose error the caller raises where htslib stops). The pipe is closed on the way
    out, so the thread stops at its next write however far it got."""
    feed = Feed(source, max_allele)
    read_fd, write_fd = os.pipe()
    thread = threading.Thread(target=contextvars.copy_context().run, args=(feed.run, write_fd),  # the shard's storage
                              name="gpubatch-variants-feed", daemon=True)
    thread.start()
    try:
        with os.fdopen(read_fd, "rb") as reader:
            yield reader, feed
    finally:
        thread.join(FEED_JOIN_SECONDS)
        if thread.is_alive():  # a remote read that neither answers nor fails: left to end with the process
            log.warning("%s: the thread reading it for htslib did not stop within %.0f s; left behind",
                        redact(source.uri), FEED_JOIN_SECONDS)
