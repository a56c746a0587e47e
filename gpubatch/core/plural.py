"""A count and its noun, agreeing: validate said "1 items", the report "1 retries".

One helper for every floor (a source's quarantine reason counts tiles; the report counts items,
requests and retries), so that the rule and its irregular plurals live in one place.
"""

from __future__ import annotations


def plural(count: object, noun: str, many: str | None = None) -> str:
    """``noun`` for a count of exactly one, else ``many`` (by default ``noun`` + "s"): the noun
    alone, where the count is formatted apart ("0 of 1 shard": pass the total). A count that is
    not known (None, "?") takes the plural."""
    return noun if count == 1 else (many if many is not None else f"{noun}s")


def counted(count: int, noun: str, many: str | None = None) -> str:
    """The count, in thousands (``1,234``), and its noun: "1 item", "2 items", "0 retries"."""
    return f"{count:,} {plural(count, noun, many)}"
