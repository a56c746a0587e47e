"""Records of a BED or variant file that cannot be used: left out and listed, or the job refused.

One malformed line in a million-line file must not cost a night's run, so such records are
quarantined: each is listed in report.json's ``failed`` by file and line (the run exits 3,
partial) and the rest run. Many of them are not noise but a wrong file or another genome build,
which would spoil every score, so past ``windows.max_bad_records`` (a share of the file's data
records) the job is refused before anything runs, with the first problems listed. A file whose
records are all bad is always refused.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from gpubatch.core.errors import SpecError
from gpubatch.core.plural import plural
from gpubatch.io.redact import excerpt
from gpubatch.sources.genome.reference import ContigTable

#: failed entries written for one file; the others are counted in one more entry
MAX_LISTED = 1000
#: problems a refusal lists before it says how many more there are
MAX_SHOWN = 20
#: contigs a refusal names, with their records, before it says how many more there are
MAX_CONTIGS_SHOWN = 8
#: contigs off the reference counted by name (names this long at most): a BED of a
#: transcriptome's or another assembly's names counted each of hundreds of thousands, ~120 bytes
#: apiece (1,000,000 names: 120 MB); records on the others are counted together
MAX_COUNTED_CONTIGS, MAX_COUNTED_NAME = 10_000, 256


@dataclass
class BadRecords:
    """The problems found in one file's records, counted against how many records it has."""

    key: str  # the spec key that names the file: every refusal points there
    uri: str
    total: int = 0  # data records read, good and bad
    count: int = 0
    listed: list[tuple[str, str]] = field(default_factory=list)  # (where, problem), the first MAX_LISTED
    #: the reference's contigs: with them, records off them are counted by contig, for a refusal
    #: that says once that the file and the reference name their contigs differently
    contigs: ContigTable | None = None
    missing: Counter[str] = field(default_factory=Counter)  # contig absent from the reference -> records
    missing_elsewhere: int = 0  # records on contigs absent from the reference past those counted by name

    def add(self, where: str, problem: str, chrom: str | None = None) -> None:
        """One bad record; ``chrom``, its contig, counted where the reference lacks it."""
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append((where, problem))
        if chrom is not None and self.contigs is not None and chrom not in self.contigs:
            if chrom in self.missing or (len(self.missing) < MAX_COUNTED_CONTIGS and len(chrom) <= MAX_COUNTED_NAME):
                self.missing[chrom] += 1
            else:
                self.missing_elsewhere += 1

    def allowed(self, limit: float) -> int:
        """How many bad records ``limit`` (a share) lets through: at least one unless it is 0."""
        return 0 if limit <= 0 else max(1, math.floor(limit * self.total))

    def admit(self, limit: float) -> list[dict[str, Any]]:
        """The quarantined records as report ``failed`` entries; a SpecError when there are more
        than ``limit`` allows, or nothing else in the file."""
        if not self.count:
            return []
        if self.count > self.allowed(limit) or self.count >= self.total:
            raise SpecError(self._refusal(limit))
        entries: list[dict[str, Any]] = [{"input": where, "error": problem} for where, problem in self.listed]
        if self.count > len(self.listed):
            left = self.count - len(self.listed)
            entries.append({"input": self.uri, "error": f"{left} more records left out, like those listed "
                                                        "before", "count": left})
        return entries

    def _refusal(self, limit: float) -> list[tuple[str, str]]:
        listed = [(self.key, f"{where}: {problem}") for where, problem in self.listed[:MAX_SHOWN]]
        shown = [(self.key, text) for text in (self._naming(),) if text] + listed
        if self.count > len(listed):
            shown.append((self.key, f"... and {self.count - len(listed)} more problems like these"))
        if limit > 0 and self.count < self.total:
            shown.append((self.key, f"{self.count} of {self.total} records are unusable, more than "
                                      f"windows.max_bad_records = {limit:g} allows: a wrong file or genome "
                                      "build? Mend the lines above, or raise windows.max_bad_records to "
                                      "leave them out and run the rest"))
        return shown

    def _naming(self) -> str | None:
        """One line, before the records, when records are on contigs the reference lacks: which,
        how many records each, and where the reference has them under another name (chr1 for 1,
        chrM for MT) both conventions and the rename; a whole file of another convention was
        twenty lines of one problem and a count."""
        if not (self.missing or self.missing_elsewhere) or self.contigs is None:
            return None
        names = self.missing.most_common()
        shown = ", ".join(f"{excerpt(name)} ({n} {plural(n, 'record')})" for name, n in names[:MAX_CONTIGS_SHOWN])
        more = f" and {len(names) - MAX_CONTIGS_SHOWN} more" if len(names) > MAX_CONTIGS_SHOWN else ""
        if self.missing_elsewhere:
            more += (f"{', ' if shown else ''}{self.missing_elsewhere} record(s) on contigs not counted by name "
                     f"(past the first {MAX_COUNTED_CONTIGS:,}, or names of over {MAX_COUNTED_NAME} characters)")
        text = (f"{sum(self.missing.values()) + self.missing_elsewhere} of {self.total} records are on contigs "
                f"the reference does not have: {shown}{more}")
        pairs = [(name, alt) for name, _ in names if (alt := self.contigs.alias(name)) is not None]
        if not pairs:
            return f"{text}; the reference's contigs are {self.contigs.listing()}"
        pairs_text = ", ".join(f"'{name}' as '{alt}'" for name, alt in pairs[:MAX_CONTIGS_SHOWN])
        renames = [f"{name} {alt}" for name, alt in pairs[:MAX_CONTIGS_SHOWN]]
        how = (f"`bcftools annotate --rename-chrs MAP`, MAP's lines {', '.join(map(repr, renames))}"
               if self.key == "windows.variants" else "in the first column")
        return (f"{text}. The reference has {pairs_text}: the file and the reference follow different contig "
                "naming conventions (UCSC's chr1, chrM against Ensembl's and NCBI's 1, MT). Rename the file's "
                f"contigs to the reference's ({how}), or use the reference the file was made for")
