"""A bounded, safe YAML reader for configs and ``--set`` values.

A config may come from anyone (a ConfigMap, a pasted snippet), so reading it is bounded: only a
regular file, at most ``MAX_BYTES``, UTF-8, nested at most ``MAX_DEPTH`` deep, at most
``MAX_NODES`` values once aliases are expanded (no "billion laughs"), no recursive aliases, no
duplicate keys (YAML would silently keep the last), and only plain YAML types (PyYAML's safe
loader: no Python objects). Every refusal is a :class:`ConfigError` naming what to fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ._schema import ConfigError

MAX_BYTES = 1 << 20  # 1 MiB: a config is a page of settings, not a data set
MAX_DEPTH = 32  # nesting levels, aliases expanded
MAX_NODES = 100_000  # values, aliases expanded


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with a depth bound and duplicate keys refused."""

    def __init__(self, stream: str, where: str) -> None:
        super().__init__(stream)
        self.where = where
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:  # type: ignore[override]
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"{self.where}: nested more than {MAX_DEPTH} levels deep (line {mark.line + 1}); "
                    "a config is a few levels of sections: flatten it"
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{key}: appears twice in one mapping of {self.where} (lines {seen[key]} and "
                    f"{line}); YAML would silently keep only the last: keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Node, where: str) -> int:
    """How many values the document holds with every alias expanded; refuses cycles and depth."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(
                f"{where}: an alias refers to itself (line {node.start_mark.line + 1}); "
                "a config cannot contain itself: remove the recursive alias"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{where}: nested more than {MAX_DEPTH} levels deep once aliases are expanded; "
                "flatten it"
            )
        active.add(key)
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_NODES:
                raise ConfigError(
                    f"{where}: expands to more than {MAX_NODES} values (aliases repeated inside "
                    "aliases?); a config is a page of settings: remove the repeated aliases"
                )
        active.discard(key)
        sizes[key] = total
        return total

    size(root, 0)
    return sizes[id(root)]


def parse_yaml(text: str, where: str) -> Any:
    """Parse one YAML document within the bounds; ``where`` names it in errors."""
    if len(text) > MAX_BYTES:
        raise ConfigError(
            f"{where}: longer than {MAX_BYTES} characters; a config is a page of settings"
        )
    loader = _Loader(text, where)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(exc)}); fix it there") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deep; flatten it") from None
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(str(problem).split())[:200] + where


def read_config_text(path: Path) -> str:
    """The text of a config file: a regular file, bounded, UTF-8; else one line saying the fix."""
    name = f"config file {str(path)!r}"
    if "\0" in str(path):
        raise ConfigError(f"{name[:80]}: the path holds a NUL byte; give a plain file path")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{name} does not exist; check the path") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot be read ({exc.strerror}); check the path") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{name} is a directory; name the YAML file in it")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(
            f"{name} is not a regular file (a pipe, device or socket); save the config to a file"
        )
    if info.st_size > MAX_BYTES:
        raise ConfigError(
            f"{name} is {info.st_size} bytes, more than {MAX_BYTES}; a config is a page of settings"
        )
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced since the stat
                raise ConfigError(f"{name} is not a regular file; save the config to a file")
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot be read ({exc.strerror}); fix its permissions") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{name} is more than {MAX_BYTES} bytes; a config is a page of settings")
    return _decode(data, name)


def _decode(data: bytes, name: str) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\0" in data:
        raise ConfigError(f"{name} is not UTF-8 text (UTF-16 or binary); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{name} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None


def load_mapping(path: Path) -> dict[str, Any]:
    """A config file's top level: a mapping of sections (an empty file or a list is refused)."""
    raw = parse_yaml(read_config_text(path), f"config file {str(path)!r}")
    if raw is None:
        raise ConfigError(
            f"config file {str(path)!r} is empty; a config needs at least `name: my-search`"
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {str(path)!r}: the config must be a mapping of keys (e.g. `name: my-search`), "
            f"not a {type(raw).__name__}"
        )
    return raw
