"""A parsed ``.fai`` held as columns, not as an object per contig.

Why: a draft assembly or a transcriptome has 50,000 to millions of contigs. Held as a dict of
``FaiEntry`` objects the index cost ~253 traced bytes a contig (364 at the parse's peak), once in
the plan and once in each worker process (kept between its shards, :mod:`.indexes`). Held here as
a tuple of names, one ``int64`` array of four columns (length, offset, line bases, line width) and
one dict name -> row, it costs the names, the dict and 32 bytes a contig; a ``FaiEntry`` is made
only for a contig looked up (a read, a sampled check). The table reads as a ``Mapping`` of name ->
``FaiEntry`` in file order of the index, as the dict it replaces did.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from gpubatch.core.errors import InputError

REBUILD = "rebuild it with `samtools faidx` (bgzip files get .fai and .gzi)"


@dataclass(frozen=True)
class FaiEntry:
    """One ``.fai`` line: where a contig's bases start and how its lines are laid out."""

    length: int
    offset: int
    line_bases: int
    line_width: int

    def byte(self, pos: int) -> int:
        """Byte offset (in the uncompressed file) of 0-based base ``pos``."""
        return self.offset + (pos // self.line_bases) * self.line_width + pos % self.line_bases

    @property
    def last_byte(self) -> int:
        return self.byte(self.length - 1)


class FaiTable(Mapping[str, FaiEntry]):
    """A ``.fai``'s contigs: ``names`` in index order, ``columns`` (n x 4 int64: length, offset,
    line bases, line width) and ``rows`` (name -> row), shared read-only by every shard of a
    process that reads this version of the index (and by their contig tables)."""

    __slots__ = ("names", "columns", "rows", "__weakref__")

    def __init__(self, names: tuple[str, ...], columns: np.ndarray, rows: dict[str, int]):
        self.names, self.columns, self.rows = names, columns, rows
        self.columns.setflags(write=False)

    def __getitem__(self, name: str) -> FaiEntry:
        return self.entry(self.rows[name])

    def entry(self, row: int) -> FaiEntry:
        length, offset, line_bases, line_width = self.columns[row].tolist()
        return FaiEntry(length, offset, line_bases, line_width)

    def __contains__(self, name: object) -> bool:
        return name in self.rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def lengths(self) -> np.ndarray:
        return self.columns[:, 0]


def parse_fai(text: str, fai_uri: str) -> FaiTable:
    """The table of a ``.fai``'s text (``fai_uri`` names it in errors): a malformed line, a
    contig listed twice or an empty index is refused, naming the line and the fix."""
    names: list[str] = []
    values = array("q")  # 8 bytes a number while parsing, not a Python int each
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            numbers = [int(field) for field in fields[1:5]]
            if len(numbers) != 4:
                raise ValueError(line)
        except ValueError:
            raise InputError(fai_uri, f"line {n}: expected 5 tab-separated fields "
                                      f"(name, length, offset, linebases, linewidth), got {line!r}") from None
        names.append(fields[0])
        values.extend(numbers)
    if not names:
        raise InputError(fai_uri, f"the index lists no contigs (an empty .fai); {REBUILD}")
    rows = {name: row for row, name in enumerate(names)}
    if len(rows) != len(names):
        _refuse_twice(text, names, fai_uri)
    return FaiTable(tuple(names), np.frombuffer(values, dtype=np.int64).reshape(-1, 4), rows)


def _refuse_twice(text: str, names: list[str], fai_uri: str) -> None:
    """The error for a contig listed twice, naming the line of its second listing."""
    seen: set[str] = set()
    lines = [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    for n, name in zip(lines, names, strict=True):
        if name in seen:
            raise InputError(fai_uri, f"line {n}: contig '{name}' is listed twice; {REBUILD}")
        seen.add(name)
