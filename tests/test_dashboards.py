"""The committed dashboards are what dashboards/build.py generates, and they query only metrics that exist."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from alerts import dashboard_uids as uids
from dashboards import build
from dashboards.params import DashboardParams
from tests.components import require_binary
from tests.helpers.dashboards import DASHBOARD_DIR, committed_dashboards, known_series, metric_names, panels, selectors
from tests.prometheus_stack import INSTALL_HINT

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
DEPLOYMENT_MATCHERS = ('cluster=~"$cluster"', 'namespace=~"$namespace"', 'job=~"$job"')


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
            match = re.fullmatch(r"label_values\((\w+)(\{[^{}]*\})?, *(\w+)\)", variable["query"])
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


def test_selectors_pair_each_metric_with_its_own_matchers() -> None:
    expr = (
        'sum by (job, le) (rate(a_bucket{tenant="$tenant", x=~"{b}|c"}[$__rate_interval]))'
        ' / on (job) group_left b_total and up{job=~"$job"}'
    )
    assert selectors(expr) == [
        ("a_bucket", '{tenant="$tenant", x=~"{b}|c"}'),
        ("b_total", ""),
        ("up", '{job=~"$job"}'),
    ]


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_every_series_selected_is_narrowed_to_the_chosen_cluster_namespace_and_job(name: str) -> None:
    dashboard = committed_dashboards()[name]
    exprs = [(panel["title"], t["expr"]) for panel in panels(dashboard) for t in panel["targets"]]
    # The tenant list too; label_values(series, label) names a label after the series.
    exprs += [
        (f"variable {v['name']}", re.sub(r",\s*\w+\)$", ")", v["query"]))
        for v in dashboard["templating"]["list"]
        if v["name"] == "tenant"
    ]
    checked = 0
    for title, expr in exprs:
        found = selectors(expr)
        assert found, f"{title}: no metric found in {expr}"
        for metric, matchers in found:
            missing = [m for m in DEPLOYMENT_MATCHERS if m not in matchers]
            assert not missing, f"{title}: {metric} lacks {missing} in {expr}"
            checked += 1
    assert checked >= len(exprs)


@pytest.mark.parametrize("name", sorted(build.DASHBOARDS))
def test_deployment_variables_allow_many_default_to_all_and_all_matches_a_missing_label(name: str) -> None:
    variables = {v["name"]: v for v in committed_dashboards()[name]["templating"]["list"]}
    queries = [variables[label]["query"] for label in ("cluster", "namespace", "job")]
    # Each narrows the next: namespaces of the chosen clusters, jobs of the chosen namespaces.
    assert queries == [
        "label_values(embedding_exporter_state_leader, cluster)",
        'label_values(embedding_exporter_state_leader{cluster=~"$cluster"}, namespace)',
        'label_values(embedding_exporter_state_leader{cluster=~"$cluster", namespace=~"$namespace"}, job)',
    ]
    for label in ("cluster", "namespace", "job"):
        variable = variables[label]
        assert variable["multi"] is True
        assert variable["includeAll"] is True
        # Not Grafana's default "All" (a regex of the values found), which matches nothing when the
        # label is missing: ".*" also matches the empty value Prometheus gives a missing label.
        assert variable["allValue"] == ".*"
        assert variable["current"]["value"] == ["$__all"]


def test_generator_takes_the_default_job_and_the_grafana_address_for_links(tmp_path: Path) -> None:
    params = DashboardParams(default_job="prod/embedding-jobs", grafana_url="https://grafana.example.com/ops/")
    written = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in build.write(tmp_path, params)}
    overview, tenant = written["embedding-jobs-overview.json"], written["embedding-jobs-tenant.json"]
    for dashboard in (overview, tenant):
        job = next(v for v in dashboard["templating"]["list"] if v["name"] == "job")
        assert job["current"]["value"] == ["prod/embedding-jobs"]
        (link,) = dashboard["links"]
        assert link["includeVars"] is True
        assert link["keepTime"] is True
    assert overview["links"][0]["url"] == f"https://grafana.example.com/ops/d/{uids.TENANT}"
    assert tenant["links"][0]["url"] == f"https://grafana.example.com/ops/d/{uids.OVERVIEW}"
    (table,) = [p for p in panels(overview) if p["type"] == "table"]
    (link,) = [
        link
        for override in table["fieldConfig"]["overrides"]
        for prop in override["properties"]
        if prop["id"] == "links"
        for link in prop["value"]
    ]
    assert link["url"].startswith(f"https://grafana.example.com/ops/d/{uids.TENANT}?var-tenant=${{__value.raw}}")
    # The drill-down opens on the same data source, clusters, namespaces and jobs.
    assert "${__all_variables}" in link["url"]


def test_committed_links_are_root_relative_so_grafana_adds_its_sub_path() -> None:
    dashboards = committed_dashboards()
    assert dashboards["embedding-jobs-overview.json"]["links"][0]["url"] == f"/d/{uids.TENANT}"
    assert dashboards["embedding-jobs-tenant.json"]["links"][0]["url"] == f"/d/{uids.OVERVIEW}"


def resolve(expr: str, values: Mapping[str, str]) -> str:
    """expr with Grafana's variables replaced by values (longest names first, so $job never eats $jobs)."""
    for name, value in sorted(values.items(), key=lambda item: -len(item[0])):
        expr = expr.replace("$" + name, value)
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


def dashboard_query(name: str, title: str, ref_id: str = "A") -> str:
    """The committed query of one panel."""
    (panel,) = [p for p in panels(committed_dashboards()[name]) if p["title"] == title]
    return str(next(t["expr"] for t in panel["targets"] if t["refId"] == ref_id))


# A single-cluster Prometheus whose series have no cluster or namespace label ("local"), next to
# staging and prod of a shared one, and a scrape job of something else entirely.
_SERIES = [
    ('embedding_jobs_stuck{job="embedding-jobs", instance="local:9464", tenant="acme", status="pending"}', "1x20"),
    (
        'embedding_jobs_stuck{cluster="west", namespace="prod", job="embedding-jobs", instance="p:9464", '
        'tenant="acme", status="pending"}',
        "5x20",
    ),
    (
        'embedding_jobs_stuck{cluster="west", namespace="staging", job="embedding-jobs", instance="s:9464", '
        'tenant="acme", status="pending"}',
        "2x20",
    ),
    ('embedding_exporter_state_leader{job="embedding-jobs", instance="local:9464"}', "1x20"),
    (
        'embedding_exporter_state_leader{cluster="west", namespace="prod", job="embedding-jobs", instance="p:9464"}',
        "1x20",
    ),
    # prod's second replica went down 5 minutes in: its series end in a stale marker.
    (
        'embedding_exporter_state_leader{cluster="west", namespace="prod", job="embedding-jobs", instance="q:9464"}',
        "0x4 stale",
    ),
    ('up{job="embedding-jobs", instance="local:9464"}', "1x20"),
    ('up{cluster="west", namespace="prod", job="embedding-jobs", instance="p:9464"}', "1x20"),
    ('up{cluster="west", namespace="prod", job="embedding-jobs", instance="q:9464"}', "1x4 0x15"),
    ('up{cluster="west", namespace="prod", job="node", instance="n:9100"}', "1x20"),
]
_ALL = {"cluster": ".*", "namespace": ".*", "job": ".*", "__rate_interval": "1m"}
_STUCK = 'tenant="acme", status="pending"'


def _case(values: Mapping[str, str], title: str, expected: list[tuple[str, float]], ref_id: str = "A") -> object:
    return {
        "expr": resolve(dashboard_query("embedding-jobs-overview.json", title, ref_id), values),
        "eval_time": "15m",
        "exp_samples": [{"labels": labels, "value": value} for labels, value in expected],
    }


def test_selection_keeps_deployments_apart_and_all_shows_series_without_the_labels(tmp_path: Path) -> None:
    binary = require_binary("promtool", INSTALL_HINT)
    prod = {**_ALL, "cluster": "west", "namespace": "prod"}
    # Grafana joins several chosen values into one regex.
    both = {**_ALL, "cluster": "west", "namespace": "(prod|staging)", "job": "(embedding-jobs)"}
    cases = [
        _case(
            _ALL,
            "Stuck jobs",
            [
                (f'{{job="embedding-jobs", {_STUCK}}}', 1),
                (f'{{cluster="west", namespace="prod", job="embedding-jobs", {_STUCK}}}', 5),
                (f'{{cluster="west", namespace="staging", job="embedding-jobs", {_STUCK}}}', 2),
            ],
        ),
        _case(prod, "Stuck jobs", [(f'{{cluster="west", namespace="prod", job="embedding-jobs", {_STUCK}}}', 5)]),
        _case(
            both,
            "Stuck jobs",
            [
                (f'{{cluster="west", namespace="prod", job="embedding-jobs", {_STUCK}}}', 5),
                (f'{{cluster="west", namespace="staging", job="embedding-jobs", {_STUCK}}}', 2),
            ],
        ),
        # Grafana's own "All" (no custom value) would send a regex of the values found, which drops
        # every series without the label: the reason the variables send ".*" instead.
        _case(
            {**_ALL, "cluster": "(west)"},
            "Stuck jobs",
            [
                (f'{{cluster="west", namespace="prod", job="embedding-jobs", {_STUCK}}}', 5),
                (f'{{cluster="west", namespace="staging", job="embedding-jobs", {_STUCK}}}', 2),
            ],
        ),
        # Targets up: the embedding-jobs targets only (not node), the one down for 10 minutes included.
        _case(_ALL, "Targets up", [("{}", 2)], "A"),
        _case(_ALL, "Targets up", [("{}", 3)], "B"),
        _case(prod, "Targets up", [("{}", 2)], "B"),
    ]
    rules = tmp_path / "none.rules.yaml"
    rules.write_text("groups: []\n", encoding="utf-8")
    tests = {
        "rule_files": [rules.name],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": values} for series, values in _SERIES],
                "promql_expr_test": cases,
            }
        ],
    }
    path = tmp_path / "dashboards.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        [binary, "test", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
