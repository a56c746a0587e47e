"""YAML text read within bounds: job specs, profiles and ``--set`` values are user files, and a
few hundred bytes of aliases must not expand into gigabytes, nor deep nesting into a
RecursionError; a problem is a SpecError naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gpubatch.core.errors import SpecError

#: bounds on a YAML document (a spec, a profile, a --set value): a few hundred bytes of aliases
#: must not expand into gigabytes, nor deep nesting into a RecursionError
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that counts nodes as composed, an alias as the whole subtree it
    repeats, and refuses a document past MAX_YAML_NODES or nested past MAX_YAML_DEPTH before
    anything is expanded (the billion-laughs alias bomb, ``[[[[...]]]]``)."""

    def __init__(self, stream: str, name: str | None = None):
        super().__init__(stream)
        if name:
            self.name = name  # its problems' marks name the file, not "<unicode string>"
        self.depth = self.nodes = 0
        self.sizes: dict[int, int] = {}

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """A mapping, refused when it gives a key twice: PyYAML kept the last silently, so a
        second ``tiles:`` section replaced the first whole (its size, and its tissue method reset
        to the default) and ``validate`` passed. Keys a merge (``<<: *base``) brings in may be
        given again: overriding them is what a merge is for."""
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise ValueError(f"key {key!r} given twice, on lines {first[key]} and {line} "
                                     "(YAML would keep the second, silently): keep one")
                first[key] = line
        return super().construct_mapping(node, deep)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            anchored = self.anchors.get(self.peek_event().anchor)
            self._count(self.sizes.get(id(anchored), 1))
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise ValueError(f"nested deeper than {MAX_YAML_DEPTH} levels")
        before = self.nodes
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        self._count(1)
        self.sizes[id(node)] = self.nodes - before
        return node

    def _count(self, n: int) -> None:
        self.nodes += n
        if self.nodes > MAX_YAML_NODES:
            raise ValueError(f"more than {MAX_YAML_NODES} values once aliases are expanded "
                             "(an alias bomb?)")


def _hint(exc: yaml.YAMLError) -> str:
    """The fix for a YAML error whose words do not say it."""
    if "'\\t' that cannot start any token" in str(exc):
        return "\n  (YAML indents with spaces, never tabs: replace the tab on that line with spaces)"
    return ""


def load_yaml_text(text: str, source: str | None = None) -> Any:
    """Parse YAML within the bounds above; a problem is a SpecError naming ``source``."""
    if len(text.encode()) > MAX_YAML_BYTES:
        raise SpecError([("", f"larger than {MAX_YAML_BYTES >> 20} MiB: not a job spec")], source)
    try:  # the loader's reader refuses control characters (a binary file) as it is made
        loader = _BoundedLoader(text, source)
    except yaml.YAMLError as exc:
        raise SpecError([("", f"not a YAML text file: {exc}")], source) from None
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise SpecError([("", f"not valid YAML: {exc}{_hint(exc)}")], source) from None
    except ValueError as exc:
        raise SpecError([("", f"refused: {exc}")], source) from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():  # "not found" sent the user looking for a folder that is there
        found = ", ".join(sorted(x.name for x in p.glob("*.y*ml"))[:3])
        raise SpecError([("", f"{p} is a directory: give the job spec's YAML file"
                              + (f" (it holds {found})" if found else ", e.g. job.yaml"))], str(p))
    if not p.is_file():
        raise SpecError([("", f"job spec file not found: {p}")], str(p))
    if p.stat().st_size > MAX_YAML_BYTES:
        raise SpecError([("", f"larger than {MAX_YAML_BYTES >> 20} MiB: not a job spec")], str(p))
    data = load_yaml_text(p.read_text(errors="replace"), str(p))
    return data if data is not None else {}
