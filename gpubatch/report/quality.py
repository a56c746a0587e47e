"""Data-quality counts in words: what the inputs held that was skipped or did not match.

report.json keeps the figures (``data_quality``); the terminal summary and report.html both say
them with these lines, so the two renderings never disagree.
"""

from __future__ import annotations

import os
from typing import Any

#: how each skip reason reads in a sentence
SKIP_WORDS = {
    "alt_missing": "no ALT ('.')", "symbolic": "symbolic (<DEL>, ...)", "spanning_deletion": "'*'",
    "breakend": "breakends", "iupac": "IUPAC ambiguity codes", "not_sequence": "not sequence",
}


def variant_lines(v: dict[str, Any]) -> list[str]:
    """Records read, scored, skipped by reason, and REF mismatches of a variant-mode run."""
    skipped = {k: n for k, n in (v.get("skipped") or {}).items() if n}
    total_skipped = sum(skipped.values())
    name = os.path.basename(str(v.get("file", "")).rstrip("/")) or "variants"
    layout = v.get("layout", "vcf")
    lines = [f"variants: {v.get('records', 0)} records in {name} ({layout}); {v.get('scored', 0)} "
             f"ALT alleles scored of {v.get('scorable', 0)} scorable"]
    if total_skipped:
        reasons = ", ".join(f"{n} {SKIP_WORDS.get(k, k)}" for k, n in skipped.items())
        lines.append(f"  skipped {total_skipped} ALT allele(s) that are not sequence: {reasons}")
    mismatches = int(v.get("ref_mismatches", 0))
    limit = v.get("max_ref_mismatch")
    share = float(v.get("ref_mismatch_share", 0.0))
    lines.append(f"  REF mismatches: {mismatches} of {v.get('scored', 0)} scored ({share:.1%}"
                 + (f"; the job is refused above {limit:.0%}" if limit is not None else "")
                 + ("), flagged ref_match = false" if mismatches else ")"))
    return lines


def quality_lines(report: dict[str, Any]) -> list[str]:
    """Every data-quality section of the report, as lines of text."""
    quality = report.get("data_quality") or {}
    lines: list[str] = []
    if quality.get("variants"):
        lines += variant_lines(quality["variants"])
    return lines
