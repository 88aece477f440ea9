"""The committed dashboards, and the metric names a PromQL expression selects."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry

from alerts.build import RuleParams, recording_rules
from dashboards import build
from exporter.spanmetrics import SpanMetrics
from exporter.state import StateCollector
from exporter.workerhealth import WorkerHealth
from jobs.store import JobStore

DASHBOARD_DIR = Path(build.__file__).parent


# Series Prometheus makes itself for every scrape target.
PROMETHEUS_SERIES = frozenset({"up"})

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")
# A metric name and the label matchers right after it, if any.
_SELECTOR = re.compile(r'(?<![\w:.$])([A-Za-z_:][\w:]*)\s*(\{(?:[^{}"]|"(?:\\.|[^"\\])*")*\})?')


_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "on", "ignoring", "group_left", "group_right", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels, keywords or variables)."""
    # Label matchers, ranges and grouping clauses hold label names and durations, never metrics.
    text = _BRACES.sub(" ", _GROUPING.sub(" ", _STRINGS.sub('""', expr)))
    names = set()
    for match in _NAME.finditer(text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue  # a function call or an operator
        names.add(match.group())
    return names


def selectors(expr: str) -> list[tuple[str, str]]:
    """Each metric an expression selects with the matchers written after it ("" when none)."""
    metrics = metric_names(expr)
    # Grouping clauses hold label names only; taking them out keeps `by (job)` from reading as a metric.
    text = _GROUPING.sub(" ", expr)
    return [(m.group(1), m.group(2) or "") for m in _SELECTOR.finditer(text) if m.group(1) in metrics]


async def _no_depth() -> dict[str, int]:
    raise AssertionError("the series list is built without reading the queue")


def exporter_series() -> set[str]:
    """Every series name the exporter can serve, as Prometheus sees it (counters as _total, histograms bucketed)."""
    registry = CollectorRegistry()
    spans = SpanMetrics(registry)
    WorkerHealth(registry)
    state = StateCollector(cast(JobStore, object()), registry, limiter=spans.tenants, depth_source=_no_depth)
    # Queue depth is only served once a refresh has read it.
    state.depth = {"active": 0}
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def known_series(params: RuleParams | None = None) -> set[str]:
    """Series a dashboard or rule may query: the exporter's, the recording rules' and Prometheus' own."""
    records = {str(rule["record"]) for rule in recording_rules(params or RuleParams())}
    return exporter_series() | records | PROMETHEUS_SERIES


def committed_dashboards() -> dict[str, dict[str, Any]]:
    """The committed dashboard JSON files, by file name."""
    return {name: json.loads((DASHBOARD_DIR / name).read_text(encoding="utf-8")) for name in build.DASHBOARDS}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows left out), including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel
