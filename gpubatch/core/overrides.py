"""``--set key.path=value`` overrides of a job mapping, before it is validated.

Apart from the spec's models: an override is parsed as YAML and set into the nested mapping the
spec file gave, so the spec's own validation then names a bad value by its field, as it would
have in the file.
"""

from __future__ import annotations

from typing import Any

from gpubatch.core.errors import SpecError
from gpubatch.core.yaml_text import load_yaml_text


def parse_override(text: str, flag: str = "--set") -> tuple[list[str], Any]:
    """``tiles.size=256`` -> (["tiles", "size"], 256); the value is parsed as YAML. ``flag``: the
    option the text came with, named in the error (``--storage anon`` was called a --set)."""
    if "=" not in text:
        raise SpecError([(flag, f"expected key.path=value, got {text!r}")])
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise SpecError([(flag, f"empty key in {text!r}")])
    return path, load_yaml_text(raw, flag) if raw.strip() else ""


#: keys of which a job gives one: an override of one clears the other, so that
#: ``--set tiles.level=0`` works on a spec that names ``tiles.mpp`` (and the default mpp)
EXCLUSIVE_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("tiles", "level"): ("tiles", "mpp"), ("tiles", "mpp"): ("tiles", "level")}


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Set nested keys in a job mapping from ``--set`` strings or a {dotted.key: value} dict."""
    pairs = (
        [parse_override(o) for o in overrides]
        if isinstance(overrides, list)
        else [(k.replace("__", ".").split("."), v) for k, v in overrides.items()]
    )
    given = {tuple(path) for path, _ in pairs}
    for path, value in pairs:
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
        other = EXCLUSIVE_KEYS.get(tuple(path))
        if other is not None and value is not None and other not in given:
            node.pop(other[-1], None)  # the override replaces the file's choice of resolution
    return data
