"""A BCF's records with their shared fields bounded and no sample data, before htslib reads them.

htslib reads a BCF record whole (its shared part, and its per-sample part even where no sample
is asked for) and pysam makes a Python string of each allele: one record with a 50 MB REF cost
the client about 190 MB before its length could be checked, and a cohort's sample names went into
htslib's dictionary and every record's genotypes through memory. Memory is bounded by the job's
configuration, not by one record, so a BCF (BGZF or uncompressed, local or remote) reaches htslib
through :class:`BcfGuard`, the binary twin of the text VCF's ``FieldGuard``. BCF gives each
record's lengths up front (``l_shared``, ``l_indiv``: SAM/VCF spec, BCF2 section 6.3), and each
value's length in its type byte, so nothing is read to find where a record or a field ends:

* the header's text is passed through a ``FieldGuard``: its ``#CHROM`` line loses FORMAT and the
  sample names (htslib then holds no sample dictionary), ``##`` lines pass whole as they do there;
* every record loses its sample data (``l_indiv`` bytes, read past unheld) and says it has no
  FORMAT fields and no samples, as a sites-only BCF's;
* a record whose shared part is up to ``SHORT_LINE`` bytes is otherwise passed as it is (every
  record of an ordinary BCF; the plan checks each allele's length itself);
* in a longer one, the fields are read one at a time, each held up to its limit (``field_limit``:
  REF and ALT, all ALT alleles with their commas as a text VCF writes them, up to ``max_allele``;
  ID and FILTER up to ``SHORT_LINE``), the rest read past. A field over its limit makes the record
  a bad one (``field_verdict``: the text VCF's rule and message): a placeholder record htslib reads in a
  few bytes takes its place and its problem is kept in ``problems`` by record number; an INFO
  over ``SHORT_LINE`` bytes is dropped (the record says it has no INFO), counted as in a text VCF.
  A record whose values run past its ``l_shared`` is a bad one too (malformed).

The output is an uncompressed BCF (htslib reads it as such from the pipe), one record a record,
so every record keeps its number.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from gpubatch.core.errors import SpecError
from gpubatch.sources.genome.variant_guard import SHORT_LINE, FieldGuard, GuardState, field_verdict

FIELD = "windows.variants"
#: a record's fixed fields: CHROM, POS, rlen, QUAL, n_allele << 16 | n_info, n_fmt << 24 | n_sample
FIXED = struct.Struct("<iiiIII")
LENGTHS = struct.Struct("<II")  # l_shared, l_indiv
#: the bytes of each BCF value type by its code (missing, int8, int16, int32, int64, float, char)
TYPE_BYTES = {0: 0, 1: 1, 2: 2, 3: 4, 4: 8, 5: 4, 7: 1}
INT_FORMATS = {1: "<b", 2: "<h", 3: "<i"}
QUAL_MISSING = 0x7F800001
#: a placeholder's ID (missing), alleles (REF 'N') and FILTER (none), as typed values
PLACEHOLDER_VALUES = b"\x07" + b"\x17N" + b"\x00"
#: bytes read at a time while reading past a record's unheld parts
SKIP_CHUNK = 1 << 16


class _Malformed(Exception):
    """A record's values do not fit its lengths: it is a bad record, read past by its lengths."""


class _Input:
    """The BCF's decompressed bytes, taken a bounded piece at a time or read past unheld."""

    def __init__(self, read: Callable[[int], bytes], first: bytes, name: str):
        self._read, self._buf, self._at, self.name = read, bytearray(first), 0, name
        self.number = 0  # the record being read, for the message of a file cut short

    def _more(self) -> bool:
        block = self._read(SKIP_CHUNK)
        if block:
            del self._buf[: self._at]
            self._buf += block
            self._at = 0
        return bool(block)

    def at_end(self) -> bool:
        return self._at == len(self._buf) and not self._more()

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes (the caller bounds ``size``)."""
        while len(self._buf) - self._at < size:
            if not self._more():
                self._cut_short()
        piece = bytes(self._buf[self._at : self._at + size])
        self._at += size
        return piece

    def skip(self, size: int) -> None:
        """Read past the next ``size`` bytes, holding a block at most."""
        while size:
            if self._at == len(self._buf) and not self._more():
                self._cut_short()
            step = min(size, len(self._buf) - self._at)
            self._at, size = self._at + step, size - step

    def _cut_short(self) -> None:
        where = f"inside record {self.number}" if self.number else "inside its header"
        raise SpecError([(FIELD, f"{self.name} is cut short: the BCF ends {where}; the records past it are lost. "
                                 "Copy or write the file again whole")])


@dataclass
class _Shared:
    """One long record's shared part, read a value at a time within its ``left`` bytes."""

    src: _Input
    left: int

    def take(self, size: int) -> bytes:
        if size > self.left:
            raise _Malformed(f"a value of {size:,} bytes runs past the record's shared length")
        self.left -= size
        return self.src.take(size)

    def skip(self, size: int) -> None:
        if size > self.left:
            raise _Malformed(f"a value of {size:,} bytes runs past the record's shared length")
        self.left -= size
        self.src.skip(size)

    def typed(self, limit: int) -> tuple[bytes | None, int]:
        """The next typed value, encoded, when its data is up to ``limit`` bytes (else None,
        read past), and its data's bytes."""
        head = self.take(1)
        kind, count = head[0] & 0x0F, head[0] >> 4
        if kind not in TYPE_BYTES:
            raise _Malformed(f"a value of unknown type {kind}")
        if count == 15:  # the count follows, as a typed integer
            count_head = self.take(1)
            if count_head[0] & 0x0F not in INT_FORMATS or count_head[0] >> 4 != 1:
                raise _Malformed("a value's length is not an integer")
            count_bytes = self.take(TYPE_BYTES[count_head[0] & 0x0F])
            head += count_head + count_bytes
            count = struct.unpack(INT_FORMATS[count_head[0] & 0x0F], count_bytes)[0]
            if count < 0:
                raise _Malformed(f"a value's length is {count}")
        size = count * TYPE_BYTES[kind]
        if size > limit:
            self.skip(size)
            return None, size
        return head + self.take(size), size


@dataclass
class BcfGuard(GuardState):
    """Copies a BCF to ``out`` as an uncompressed BCF, records bounded (see module); ``lines``
    counts the records passed on, and ``problems`` and ``info_dropped_lines`` hold record numbers."""

    name: str = ""
    _in: _Input | None = field(default=None, repr=False)

    def copy(self, first: bytes, read: Callable[[int], bytes]) -> None:
        """Pass on the BCF whose decompressed bytes start with ``first``, the rest from ``read``."""
        self._in = source = _Input(read, first, self.name)
        self.out.write(source.take(5))  # 'BCF', major and minor version
        self._header(struct.unpack("<I", source.take(4))[0])
        while not source.at_end():
            source.number = self.lines + 1
            self._record(source, *LENGTHS.unpack(source.take(LENGTHS.size)))
            self.lines += 1

    def _header(self, size: int) -> None:
        """The header's text, through a FieldGuard (no sample names), with its new length."""
        text = io.BytesIO()
        lines = FieldGuard(text, self.max_allele)
        assert self._in is not None
        while size:
            piece = self._in.take(min(size, SKIP_CHUNK))
            lines.feed(piece)
            size -= len(piece)
        lines.close()
        self.out.write(struct.pack("<I", len(text.getvalue())) + text.getvalue())

    def _record(self, source: _Input, l_shared: int, l_indiv: int) -> None:
        """One record: a short one as it is but its samples, a long one a field at a time."""
        if FIXED.size <= l_shared <= SHORT_LINE:
            shared = bytearray(source.take(l_shared))
            shared[20:24] = b"\0\0\0\0"  # no FORMAT fields, no samples
            source.skip(l_indiv)
            self.out.write(LENGTHS.pack(l_shared, 0) + shared)
        elif l_shared < FIXED.size:
            source.skip(l_shared + l_indiv)
            self._placeholder(0, 0, f"malformed BCF record (its shared part is {l_shared} bytes, under the "
                                    f"{FIXED.size} of its fixed fields)")
        else:
            self._long_record(source, l_shared, l_indiv)

    def _long_record(self, source: _Input, l_shared: int, l_indiv: int) -> None:
        """A record over SHORT_LINE bytes, its fields each held up to its limit (see module)."""
        chrom, pos, rlen, qual, allele_info, _ = FIXED.unpack(source.take(FIXED.size))
        fields = _Shared(source, l_shared - FIXED.size)
        try:
            values, info_size = self._values(fields, allele_info >> 16)
        except _Malformed as exc:
            source.skip(fields.left + l_indiv)
            self._placeholder(chrom, pos, f"malformed BCF record ({exc}): left out. Mend or rewrite the file "
                                          "(`bcftools view -Ob`)")
            return
        problem, info_over = field_verdict([0, 0, *values.sizes, info_size], self.max_allele)
        if problem is not None or info_over:
            fields.skip(fields.left)
        source.skip(l_indiv)
        if problem is not None:
            self._placeholder(chrom, pos, problem)
            return
        if info_over:
            self.drop_info(self.lines + 1)
            allele_info &= 0xFFFF0000  # n_info 0: no INFO
        body = values.encoded + (b"" if info_over else fields.take(fields.left))
        head = FIXED.pack(chrom, pos, rlen, qual, allele_info, 0)
        self.out.write(LENGTHS.pack(FIXED.size + len(body), 0) + head + body)

    def _values(self, shared: _Shared, n_allele: int) -> tuple[_Values, int]:
        """ID, the alleles and FILTER of a long record, each held up to its limit; and INFO's bytes
        (the rest of the shared part, not yet read)."""
        values = _Values()
        values.add(*shared.typed(SHORT_LINE))  # ID
        ref, ref_size = shared.typed(self.max_allele) if n_allele else (b"", 0)
        alt_size = 0
        alts = []
        for i in range(max(0, n_allele - 1)):
            alt, size = shared.typed(max(0, self.max_allele - alt_size - (i > 0)))
            alt_size += size + (i > 0)  # the ALT field as a text VCF writes it: alleles joined by commas
            alts.append(alt)
        values.encoded += (ref or b"") + b"".join(a or b"" for a in alts)
        values.sizes += [ref_size, alt_size, 0]  # QUAL: fixed
        values.add(*shared.typed(SHORT_LINE))  # FILTER
        return values, shared.left

    def _placeholder(self, chrom: int, pos: int, problem: str) -> None:
        """A record htslib reads in a few bytes, in a bad record's place (its problem is reported)."""
        self.problems[self.lines + 1] = problem
        head = FIXED.pack(chrom, pos, 1, QUAL_MISSING, 1 << 16, 0)  # one allele, no INFO
        self.out.write(LENGTHS.pack(FIXED.size + len(PLACEHOLDER_VALUES), 0) + head + PLACEHOLDER_VALUES)


@dataclass
class _Values:
    """A long record's ID, alleles and FILTER as passed on (encoded), and each field's bytes."""

    encoded: bytes = b""
    sizes: list[int] = field(default_factory=list)

    def add(self, encoded: bytes | None, size: int) -> None:
        self.encoded += encoded or b""
        self.sizes.append(size)
