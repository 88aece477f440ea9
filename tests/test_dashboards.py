"""The committed dashboards are what dashboards/build.py generates, and they query only metrics that exist."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry

from alerts.build import RuleParams, recording_rules
from dashboards import build
from exporter.spanmetrics import SpanMetrics
from exporter.state import StateCollector
from exporter.workerhealth import WorkerHealth
from jobs.store import JobStore

DASHBOARD_DIR = Path(build.__file__).parent
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Series Prometheus makes itself for every scrape target.
PROMETHEUS_SERIES = frozenset({"up"})

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NAME = re.compile(r"(?<![\w:.$])[A-Za-z_:][\w:]*")
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


def test_metric_names_skip_functions_labels_keywords_and_variables() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (tenant, le) (rate(a_bucket{tenant="$tenant", x=~"b|c"}[$__rate_interval])))'
        " / on () group_left sum(b_total offset 5m) > bool 1e-09 unless tenant:c:ratio_rate5m and time() - d"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "tenant:c:ratio_rate5m", "d"}


def test_committed_dashboards_match_the_generator_byte_for_byte(tmp_path: Path) -> None:
    written = build.write(tmp_path)
    assert {p.name for p in written} == set(build.DASHBOARDS)
    for path in written:
        committed = DASHBOARD_DIR / path.name
        assert committed.exists(), f"{committed} is missing: run `python -m dashboards.build`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} differs from what dashboards/build.py generates: run `python -m dashboards.build`"
        )
    stray = {p.name for p in DASHBOARD_DIR.glob("*.json")} - set(build.DASHBOARDS)
    assert not stray, f"JSON files no generator writes: {stray}"


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_every_panel_queries_the_prometheus_datasource_variable(name: str) -> None:
    dashboard = committed_dashboards()[name]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        assert panel.get("datasource") == DATASOURCE, f"panel {panel['title']!r} has no Prometheus datasource"
        targets = panel.get("targets") or []
        assert targets, f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in targets]
        assert all(ref_ids), f"panel {panel['title']!r}: empty refId in {ref_ids}"
        assert len(set(ref_ids)) == len(ref_ids), f"panel {panel['title']!r}: repeated refIds {ref_ids}"


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_queries_reference_only_exported_or_recorded_metrics(name: str) -> None:
    known = known_series()
    dashboard = committed_dashboards()[name]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            unknown = metric_names(expr) - known
            assert not unknown, f"panel {panel['title']!r} queries unknown metrics {unknown}: {expr}"
            used = set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"}
            assert used <= variables, f"panel {panel['title']!r} uses undefined variables {used - variables}"
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"])
            assert match, f"variable {variable['name']!r}: unexpected query {variable['query']!r}"
            assert match.group(1) in known, f"variable {variable['name']!r} reads an unknown metric"


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_panels_have_unique_ids_and_fit_the_grid(name: str) -> None:
    dashboard = committed_dashboards()[name]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} overflows the grid: {grid}"


def test_tenant_dashboard_filters_every_query_by_the_tenant_variable() -> None:
    dashboard = committed_dashboards()["embedding-jobs-tenant.json"]
    assert "tenant" in {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels(dashboard):
        for target in panel["targets"]:
            assert 'tenant="$tenant"' in target["expr"], f"panel {panel['title']!r} ignores $tenant"


def test_duration_heatmaps_ask_for_exemplars() -> None:
    heatmaps = [p for d in committed_dashboards().values() for p in panels(d) if p["type"] == "heatmap"]
    assert len(heatmaps) == 2
    for panel in heatmaps:
        (target,) = panel["targets"]
        assert target["exemplar"] is True
        assert target["format"] == "heatmap"
        assert "embedding_job_duration_seconds_bucket" in target["expr"]
