"""YAML configuration files validated by pydantic, with errors that name the file and line."""

from __future__ import annotations

from typing import Any

import yaml


def line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line (1-based) of the YAML node at a validation error's location."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if not match:
                break
            line = match[0][0].start_mark.line + 1
            node = match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
            line = node.start_mark.line + 1 if node is not None else line
        # pydantic adds locations of its own (union members, validators): skip them
    return line


def problem(source: str, root: yaml.Node | None, loc: tuple[Any, ...], message: str) -> str:
    """One error as ``source:line: key.path: message`` (the line where the YAML has it)."""
    line = line_of(root, loc)
    where = f"{source}:{line}" if line else source
    return f"{where}: {'.'.join(str(p) for p in loc)}: {message}"
