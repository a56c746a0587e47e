"""A pydantic validation error of the job spec as the problems a user reads: each named by its
field path (``tiles.size``, ``input.paths[0]``), with what would be valid.

Apart from the spec's models so that they stay the spec: pydantic's own words name its union
tags and internal types (``function-after[...]``), call a missing section "model_type", and give a
typo no hint; these turn them into the field as written and the key most likely meant.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from gpubatch.core.value_hints import number_hint


def validation_problems(exc: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    """One (field path, message) per error of ``exc``, raised validating ``root``."""
    return [(_format_loc(e["loc"]), _explain(root, e)) for e in exc.errors()]


_UNION_TAGS = ("function-", "literal[", "list[", "dict[")


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc
             if not str(p).startswith(_UNION_TAGS) and str(p) not in ("int", "str", "float", "bool")]
    return ".".join(p if not p.isdigit() else f"[{p}]" for p in parts).replace(".[", "[")


def _section_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the spec section at ``loc`` (a path of keys from the top) accepts, or none when
    the path does not lead to a section of known keys (a mapping of free keys, a list)."""
    import typing

    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            return []
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
    return list(model.model_fields) if model is not None else []


def _unknown_key(root: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """An unknown key's message, naming the key it most likely meant: ``tiles.sise`` -> size."""
    import difflib

    loc = tuple(p for p in loc if not str(p).startswith(_UNION_TAGS))
    known = _section_keys(root, loc[:-1])
    near = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6) if loc else []
    if near:
        return f"unknown key; did you mean '{near[0]}'? (every key is listed in docs/spec.md)"
    if known:
        return f"unknown key; this section takes {', '.join(known)} (every key is listed in docs/spec.md)"
    return "unknown key (check the spelling; every key is listed in docs/spec.md)"


#: pydantic error types of a number key given something else
_NUMBER_TYPES = ("int_type", "float_type", "int_parsing", "float_parsing")


def _explain(root: type[BaseModel], err: Any) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "")
    got, loc = err.get("input"), tuple(err.get("loc") or ())
    if kind == "extra_forbidden":
        return _unknown_key(root, loc)
    if kind == "missing":
        return "required but missing"
    if kind == "model_type":  # a section given a value, or nothing (``model:`` and no key under it)
        keys = ", ".join(_section_keys(root, tuple(p for p in loc if not str(p).startswith(_UNION_TAGS))))
        return f"should be a section of keys ({keys}), got {'nothing' if got is None else repr(got)}"
    if got is None:
        return f"{msg}, got null (the key has no value): give one, or leave the key out for its default"
    if isinstance(got, str) and kind in _NUMBER_TYPES:
        return f"{msg}, got {got!r}{number_hint(got, str(loc[-1]) if loc else '')}"
    if isinstance(got, (int, float, str, bool)) and kind != "value_error":
        return f"{msg}, got {got!r}"
    return msg.removeprefix("Value error, ")
