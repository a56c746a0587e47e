"""The plan's variants, held compactly: typed arrays and Arrow strings, not Python objects per variant.

Planning a variants job reads every record of the file on the client (the ID check across the
file and the REF check against the reference need them all), and a shard's payload is cut from
the table when the shard is asked for. Held as Python lists (a str and an int object per field),
a variant cost about 270 bytes and twice that while IDs were told apart: 600 MB of client for a
million variants. Here positions, lines and contigs are machine integers in ``array`` columns
(contig names once, as codes), and IDs and alleles are gathered ``CHUNK_ROWS`` at a time into
Arrow string arrays: about 40 bytes for a SNV with an rsID. The table still grows with the file
(the plan needs every variant), at a constant 7x smaller.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: rows gathered as Python strings before they become Arrow arrays (the only per-row objects held)
CHUNK_ROWS = 65536
TEXT = ("variant_id", "ref", "alt")
#: the columns a shard's payload carries, in its order
PAYLOAD = ("variant_id", "chrom", "pos", "ref", "alt")
#: skip reasons, counted zero or not so report.json keeps one shape (see ``variants``)
SKIP_REASONS = ("alt_missing", "symbolic", "spanning_deletion", "breakend", "iupac", "not_sequence")


@dataclass
class VariantTable:
    """Scorable variants (one per ALT allele) in file order, plus what was skipped and why.

    Rows are added with ``add``; ``finish`` turns the gathered strings into Arrow arrays. The
    whole-column properties (``pos``, ``ref``, ...) build Python lists, for small tables and
    tests; the plan reads rows with ``row``, ``slice_payload`` and the array accessors.
    """

    counts: dict[str, Any] = field(default_factory=lambda: {
        "records": 0, "variants": 0, "skipped": dict.fromkeys(SKIP_REASONS, 0)})
    layout: str = "vcf"
    notes: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)  # records left out, as report entries
    _pos: array = field(default_factory=lambda: array("q"))
    _line: array = field(default_factory=lambda: array("q"))  # the file line (or BCF record) of each
    _chrom: array = field(default_factory=lambda: array("i"))  # codes into _names
    _names: list[str] = field(default_factory=list)
    _codes: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in TEXT})
    _chunks: dict[str, list[pa.Array]] = field(default_factory=lambda: {k: [] for k in TEXT})
    _text: dict[str, pa.ChunkedArray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._pos)

    def add(self, vid: str, chrom: str, pos: int, ref: str, alt: str, line: int = 0) -> None:
        code = self._codes.get(chrom)
        if code is None:
            code = self._codes[chrom] = len(self._names)
            self._names.append(chrom)
        self._chrom.append(code)
        self._pos.append(pos)
        self._line.append(line)
        for name, value in zip(TEXT, (vid, ref, alt), strict=True):
            self._pending[name].append(value)
        self.counts["variants"] += 1
        if len(self._pending["ref"]) >= CHUNK_ROWS:
            self._gather()

    def _gather(self) -> None:
        for name, values in self._pending.items():
            if values:
                self._chunks[name].append(pa.array(values, pa.string()))
                values.clear()

    def finish(self) -> None:
        """The gathered strings as Arrow columns; rows are read only after this."""
        self._gather()
        self._text = {k: pa.chunked_array(v, pa.string()) for k, v in self._chunks.items()}
        self._chunks = {k: [] for k in TEXT}

    def skip(self, reason: str) -> None:
        self.counts["skipped"][reason] += 1

    @property
    def skipped(self) -> int:
        return int(sum(self.counts["skipped"].values()))

    def text(self, name: str) -> pa.ChunkedArray:
        """A string column (``variant_id``, ``ref``, ``alt``) as Arrow."""
        return self._text[name]

    def set_ids(self, ids: pa.ChunkedArray) -> None:
        self._text["variant_id"] = ids

    def positions(self) -> np.ndarray:
        """POS of every variant, a view of the table's own buffer (no copy)."""
        return np.frombuffer(self._pos, dtype=np.int64) if len(self) else np.zeros(0, np.int64)

    def line_numbers(self) -> np.ndarray:
        """The file line (or BCF record) of every variant, a view of the table's own buffer."""
        return np.frombuffer(self._line, dtype=np.int64) if len(self) else np.zeros(0, np.int64)

    def chrom_ranks(self) -> np.ndarray:
        """Each variant's contig as its rank among the table's contig names in sorted order: sorting
        by it sorts by name, as the REF check's reads go."""
        codes = np.frombuffer(self._chrom, dtype=np.int32) if len(self) else np.zeros(0, np.int32)
        rank = np.empty(len(self._names), dtype=np.int32)
        rank[sorted(range(len(self._names)), key=self._names.__getitem__)] = np.arange(len(self._names))
        return rank[codes]

    def ranked_names(self) -> list[str]:
        """The table's contig names in sorted order: ``chrom_ranks`` indexes this list."""
        return sorted(self._names)

    def chrom_at(self, i: int) -> str:
        return self._names[self._chrom[i]]

    def row(self, i: int) -> dict[str, Any]:
        """One variant's fields (its ``line`` too)."""
        return {"variant_id": self._text["variant_id"][i].as_py(), "chrom": self.chrom_at(i),
                "pos": self._pos[i], "ref": self._text["ref"][i].as_py(), "alt": self._text["alt"][i].as_py(),
                "line": self._line[i]}

    def slice_payload(self, lo: int, hi: int) -> dict[str, list[Any]]:
        """The variants [lo, hi) as plain lists: a shard's payload, small and JSON-able."""
        n = max(0, hi - lo)
        return {"variant_id": self._text["variant_id"].slice(lo, n).to_pylist(),
                "chrom": [self._names[c] for c in self._chrom[lo:hi]], "pos": self._pos[lo:hi].tolist(),
                "ref": self._text["ref"].slice(lo, n).to_pylist(), "alt": self._text["alt"].slice(lo, n).to_pylist()}

    def rows(self, lo: int = 0, hi: int | None = None) -> Iterator[dict[str, Any]]:
        """The variants [lo, hi) one at a time, ``CHUNK_ROWS`` converted at once."""
        hi = len(self) if hi is None else hi
        for a in range(lo, hi, CHUNK_ROWS):
            part = self.slice_payload(a, min(a + CHUNK_ROWS, hi))
            for k in range(len(part["pos"])):
                yield {name: part[name][k] for name in PAYLOAD}

    # whole columns as lists: for small tables and tests (a list per column costs what the table saved)
    @property
    def variant_id(self) -> list[str]:
        return self._text["variant_id"].to_pylist()

    @property
    def chrom(self) -> list[str]:
        return [self._names[c] for c in self._chrom]

    @property
    def pos(self) -> list[int]:
        return self._pos.tolist()

    @property
    def ref(self) -> list[str]:
        return self._text["ref"].to_pylist()

    @property
    def alt(self) -> list[str]:
        return self._text["alt"].to_pylist()

    @property
    def line(self) -> list[int]:
        return self._line.tolist()


def tell_alleles_apart(table: VariantTable) -> None:
    """Suffix ``:ALT`` to an ID that other ALT alleles share, as a multi-allelic record's are: a
    file split into biallelic records (``bcftools norm -m-``, the usual step before scoring) gave
    every allele of rs123 the id 'rs123', and a join on ``variant_id`` paired each with all.

    IDs that repeat are found by sorting (a copy of the ID column and its order), and only their
    rows are grouped: grouping every ID in a hash table took about 150 bytes a variant, more than
    the table itself."""
    ids, alts = table.text("variant_id"), table.text("alt")
    repeated = _repeated(ids)
    if not len(repeated):
        return
    mask = pc.is_in(ids, value_set=repeated)
    some = pa.table({"id": ids.filter(mask), "alt": alts.filter(mask)})
    groups = some.group_by("id").aggregate([("alt", "count_distinct")])
    shared = groups.filter(pc.greater(groups["alt_count_distinct"], 1))["id"].combine_chunks()
    if len(shared):
        joined = pc.binary_join_element_wise(ids, alts, ":")
        table.set_ids(pc.if_else(pc.is_in(ids, value_set=shared), joined, ids))


def _repeated(ids: pa.ChunkedArray) -> pa.Array:
    """The IDs that occur more than once (each once)."""
    if len(ids) < 2:
        return pa.array([], pa.string())
    ordered = ids.take(pc.sort_indices(ids)).combine_chunks()
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    return pc.unique(ordered.slice(1).filter(same))
