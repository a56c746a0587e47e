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
from dataclasses import dataclass, field
from typing import Any

from gpubatch.core.errors import SpecError

#: failed entries written for one file; the others are counted in one more entry
MAX_LISTED = 1000
#: problems a refusal lists before it says how many more there are
MAX_SHOWN = 20


@dataclass
class BadRecords:
    """The problems found in one file's records, counted against how many records it has."""

    key: str  # the spec key that names the file: every refusal points there
    uri: str
    total: int = 0  # data records read, good and bad
    count: int = 0
    listed: list[tuple[str, str]] = field(default_factory=list)  # (where, problem), the first MAX_LISTED

    def add(self, where: str, problem: str) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append((where, problem))

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
        shown = [(self.key, f"{where}: {problem}") for where, problem in self.listed[:MAX_SHOWN]]
        if self.count > len(shown):
            shown.append((self.key, f"... and {self.count - len(shown)} more problems like these"))
        if limit > 0 and self.count < self.total:
            shown.append((self.key, f"{self.count} of {self.total} records are unusable, more than "
                                      f"windows.max_bad_records = {limit:g} allows: a wrong file or genome "
                                      "build? Mend the lines above, or raise windows.max_bad_records to "
                                      "leave them out and run the rest"))
        return shown
