"""YAML rendering for rule and config documents, on PyYAML."""

from __future__ import annotations

from collections.abc import Mapping

import yaml


class _Dumper(yaml.SafeDumper):
    """Keeps key order and writes multi-line strings (PromQL) as literal blocks."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


class _QuotingDumper(yaml.SafeDumper):
    """Keeps key order and writes every string value as a literal block, so any one-line text can go into it."""


def _represent_quoted(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")


_QuotingDumper.add_representer(str, _represent_quoted)


def dump(document: Mapping[str, object], *, quote_all: bool = False) -> str:
    """The YAML text of document; quote_all writes every string value as a literal block."""
    dumper = _QuotingDumper if quote_all else _Dumper
    return yaml.dump(dict(document), Dumper=dumper, sort_keys=False, width=120, allow_unicode=True)
