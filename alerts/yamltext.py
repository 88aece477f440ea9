"""A small YAML writer for rule and config documents: mappings, lists, strings and numbers.

Multi-line strings (PromQL) become literal blocks so the rendered rules read like hand-written
ones; other strings stay plain when YAML cannot mistake them for anything else, and are
single-quoted otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A plain scalar must not open with an indicator character nor contain ": " or " #".
_INDICATORS = frozenset("-?:,[]{}#&*!|>'\"%@`")
# Words YAML 1.1 readers turn into booleans or null, and anything a reader could take for a number.
_RESERVED = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null", "~"})
_NUMBER_LIKE = re.compile(r"[-+.]?[0-9][0-9_.:eE+-]*|[-+]?\.(inf|nan)", re.IGNORECASE)


def dump(document: Mapping[str, object]) -> str:
    """The YAML text of document."""
    return "\n".join(_block(document, 0)) + "\n"


def _block(value: Mapping[str, object] | Sequence[object], indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            lines.extend(_entry(f"{pad}{_key(key)}:", item, indent))
        return lines
    for item in value:
        if isinstance(item, Mapping) and item:
            nested = _block(item, indent + 2)
            nested[0] = f"{pad}- {nested[0][indent + 2 :]}"
            lines.extend(nested)
        else:
            lines.extend(_entry(f"{pad}-", item, indent))
    return lines


def _entry(prefix: str, value: object, indent: int) -> list[str]:
    if isinstance(value, Mapping | list | tuple) and value:
        return [prefix, *_block(value, indent + 2)]
    if isinstance(value, str) and "\n" in value:
        if value.startswith(" "):
            raise ValueError(f"a multi-line string must not start with a space: {value!r}")
        pad = " " * (indent + 2)
        return [f"{prefix} |-", *(pad + line if line else "" for line in value.split("\n"))]
    return [f"{prefix} {_scalar(value)}"]


def _key(key: object) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"unsupported mapping key: {key!r}")
    return key


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list | tuple):
        return "[]"
    if isinstance(value, str):
        if not value.isprintable():
            raise ValueError(f"unsupported characters in {value!r}")
        return value if _plain(value) else "'" + value.replace("'", "''") + "'"
    raise ValueError(f"unsupported value: {value!r}")


def _plain(text: str) -> bool:
    return not (
        not text
        or text != text.strip()
        or text[0] in _INDICATORS
        or ": " in text
        or " #" in text
        or text.endswith(":")
        or text.lower() in _RESERVED
        or _NUMBER_LIKE.fullmatch(text)
    )
