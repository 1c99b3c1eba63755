"""YAML as config files need it: UTF-8 text only, no duplicate keys, finite numbers only.

PyYAML's safe loader lets the last of two equal keys win without a word, reads `.nan` and `.inf` as floats
that pass every range check written as `lo <= x <= hi` (a NaN compares false to everything), and a file
that is not text fails somewhere inside the scanner. Each of these is refused here with one ConfigError
naming the file, the key and the line.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import yaml

from study.errors import ConfigError

_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader whose mappings refuse a key given twice (`<<` merges may still be overridden)."""

    source: str | None = None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not None:
                raise ConfigError(str(key), f"duplicate key at line {line} (first at line {first}); YAML would "
                                  "silently keep only the last one: remove one of them", self.source)
        return super().construct_mapping(node, deep)


def loads(text: str, source: str | Path | None = None) -> Any:
    """One YAML document with StrictLoader (duplicate keys refused; yaml.YAMLError for bad syntax)."""
    loader = StrictLoader(text)
    loader.source = str(source) if source else None
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_text(path: Path) -> str:
    """A config file's text: refused in one line when it is binary or not UTF-8."""
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError("", f"not a text file (a NUL byte at offset {nul}); a config file is UTF-8 YAML", path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save the file "
                          "as UTF-8", path) from None


def refuse_non_finite(tree: Any, prefix: str = "", source: str | Path | None = None) -> None:
    """Every number in a loaded config must be finite: `.nan` / `.inf` are refused, naming the dotted key."""
    if isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(prefix or "(value)", f"{tree!r} is not a finite number", source)
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            refuse_non_finite(v, f"{prefix}.{k}" if prefix else str(k), source)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            refuse_non_finite(v, f"{prefix}[{i}]", source)
