"""What to write instead of text given where a spec key takes a number.

PyYAML reads YAML 1.1, where ``1e9`` (no dot, no signed exponent) is a string, and a quoted
``"64"`` is a string too; units (``16GB``, ``30s``) are strings everywhere. A strictly typed spec
refuses them all as "Input should be a valid integer, got '1e9'", which tells the user neither
why a number was not one nor what to write. These helpers say both, from the text and the key's
unit (read from its name: ``*_s`` seconds, ``*_mb`` MiB, ``*_bytes`` and ``max_worker_memory``
bytes).
"""

from __future__ import annotations

import math
import re

#: a float as YAML 1.1 (PyYAML) reads one: a dot, and an exponent only with its sign
_YAML11_FLOAT = re.compile(r"[-+]?(\d[\d_]*\.[\d_]*|\.[\d_]+)([eE][-+]\d+)?")
_WITH_UNIT = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))\s*([A-Za-z]+)")
_SECONDS = ("_s", "_timeout")
_BYTES = ("_bytes", "max_worker_memory")


def key_unit(key: str) -> str:
    """The unit a spec key's number is in, from its name ('' when the name does not say)."""
    if key.endswith(_SECONDS):
        return "seconds"
    if key.endswith("_mb"):
        return "MiB"
    if key.endswith(_BYTES):
        return "bytes"
    return ""


def yaml_number(value: float) -> str:
    """``value`` as YAML 1.1 reads it back as a number: an integer's digits, else a float with
    a dot and a signed exponent where it has one (``1.0e+300``, not ``1e+300``)."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def number_hint(text: str, key: str) -> str:
    """Why ``text`` (given for ``key``, which takes a number) is not one, and what to write; ''
    when the text is no number at all (a word: the error's own message says enough)."""
    stripped = text.strip()
    try:
        value = float(stripped)
    except ValueError:
        return _unit_hint(stripped, key)
    if not math.isfinite(value):
        return ""
    if "e" in stripped.lower() and not _YAML11_FLOAT.fullmatch(stripped):
        return (f" (YAML reads {stripped} as text: an exponent needs a dot and a sign, "
                f"so write {yaml_number(value)})")
    return f" (a quoted number is text: write {yaml_number(value)} without quotes)"


def _unit_hint(text: str, key: str) -> str:
    """A number with a unit (``16GB``, ``30s``): the plain number in the key's unit."""
    match = _WITH_UNIT.fullmatch(text)
    if match is None:
        return ""
    unit, plain = key_unit(key), _in_unit(match.group(1), match.group(2), key_unit(key))
    if plain is not None:
        return f" (give a plain number of {unit}, no unit: write {plain})"
    return f" (give a plain number{' of ' + unit if unit else ''}, without a unit)"


def _in_unit(number: str, suffix: str, unit: str) -> str | None:
    """``number suffix`` converted to ``unit``, as YAML would read it; None when unknown."""
    try:
        if unit == "bytes":
            from dask.utils import parse_bytes

            return str(parse_bytes(number + suffix))
        if unit == "MiB":
            from dask.utils import parse_bytes

            size = parse_bytes(number + (suffix if suffix.lower() != "mb" else "MiB"))
            return yaml_number(size / 2**20)
        if unit == "seconds":
            from dask.utils import parse_timedelta

            return yaml_number(float(parse_timedelta(number + suffix)))
    except (ValueError, KeyError, TypeError):
        return None
    return None
