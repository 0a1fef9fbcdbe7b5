"""Read a YAML file that must hold a mapping, or fail with one line naming the file.

params.yaml, sites.yaml and the registry gates are all "a mapping at the top, written by a
person": each malformed shape (missing, a folder, binary, bad YAML, a list at the top, a key
written twice) becomes one line ``<path>: <problem>`` in the caller's own error class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"key {key!r} is written twice (line {line})")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key written twice (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<``: keys written after it override on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:  # an unhashable key: let PyYAML report it
                dup = False
            if dup:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            if not isinstance(key, (list, dict)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """``line N: what`` from a PyYAML error, on one line."""
    if isinstance(e, _DuplicateKey):
        return str(e)
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or type(e).__name__
    where = f"line {mark.line + 1}: " if mark is not None else ""
    return f"not valid YAML ({where}{problem})"


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The mapping in ``path`` ({} for an empty file); ``error("<path>: <problem>")`` otherwise.

    ``what`` names the file in messages ("params file", "sites file").
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise error(f"{p}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{p}: {what} is a folder, not a file") from None
    except PermissionError:
        raise error(f"{p}: {what} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise error(f"{p}: {what} is not text (binary content)") from None
    if "\x00" in text:
        raise error(f"{p}: {what} is not text (binary content)")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise error(f"{p}: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{p}: {what} must be a mapping of keys at the top, got {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    """'a list', 'a string', ... for messages."""
    names = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}
    return names.get(type(value), type(value).__name__)
