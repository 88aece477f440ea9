"""Panel, query and variable helpers the dashboards share: one data source, one look, one selector.

Every panel queries the Prometheus data source picked in the `datasource` variable, so the
JSON imports into any Grafana without editing, and every series it selects is narrowed by the
`cluster`, `namespace` and `job` variables, so deployments sharing a Prometheus stay apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from string import ascii_uppercase
from typing import Final

from grafana_foundation_sdk.builders import common, dashboard, heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import heatmap as heatmap_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Grafana's window for rate(): at least four scrape intervals, so a missed scrape never empties it.
RATE = "$__rate_interval"
# Panel widths on Grafana's 24-column grid.
FULL, HALF, THIRD, QUARTER, SIXTH = 24, 12, 8, 6, 4

Panel = Builder[dashboard_models.Panel]

# The deployment a series comes from: Prometheus sets `job`; `namespace` and `cluster` come from
# Kubernetes service discovery or external labels, and a single-cluster Prometheus may have neither.
DEPLOYMENT_LABELS: Final = ("cluster", "namespace", "job")
# Regex matchers with ".*" as the "All" value: ".*" matches the empty string, which is what
# Prometheus compares a missing label with, so "All" keeps series that lack the label entirely.
SELECTOR: Final = ", ".join(f'{label}=~"${label}"' for label in DEPLOYMENT_LABELS)
ALL: Final = ".*"
# Aggregations that keep series apart per deployment (absent labels just group as one).
BY_DEPLOYMENT: Final = ", ".join(DEPLOYMENT_LABELS)
# Legend suffix naming the deployment of a series; an absent label prints as nothing.
DEPLOYMENT_LEGEND: Final = "{{cluster}} {{namespace}} {{job}}"


def series(metric: str, *matchers: str) -> str:
    """metric narrowed to the selected deployments, with any further label matchers."""
    return f"{metric}{{{', '.join((*matchers, SELECTOR))}}}"


def query(
    expr: str,
    legend: str = "",
    *,
    instant: bool = False,
    table_format: bool = False,
    heatmap_format: bool = False,
    exemplar: bool = False,
) -> prometheus.Dataquery:
    """A PromQL target; range query unless instant."""
    target = prometheus.Dataquery().expr(expr)
    if legend:
        target = target.legend_format(legend)
    target = target.instant() if instant else target.range()
    if table_format:
        target = target.format(prometheus_models.PromQueryFormat.TABLE)
    if heatmap_format:
        target = target.format(prometheus_models.PromQueryFormat.HEATMAP)
    if exemplar:
        target = target.exemplar(True)
    return target


def _targets(queries: Sequence[prometheus.Dataquery]) -> list[Builder[Dataquery]]:
    # Stable refIds keep regenerated JSON identical and let transformations name a query.
    return [q.ref_id(ascii_uppercase[i]) for i, q in enumerate(queries)]


def timeseries_panel(
    title: str,
    description: str,
    queries: Sequence[prometheus.Dataquery],
    *,
    unit: str,
    width: int = HALF,
    height: int = 8,
    stacked: bool = False,
    bars: bool = False,
    max_value: float | None = None,
    thresholds: Sequence[tuple[float, str]] = (),
) -> timeseries.Panel:
    """A time series panel; thresholds, if any, are drawn as dashed lines."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .unit(unit)
        .min(0)
        .span(width)
        .height(height)
        .fill_opacity(10)
        .legend(
            common.VizLegendOptions()
            .display_mode(common_models.LegendDisplayMode.LIST)
            .placement(common_models.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    if max_value is not None:
        panel = panel.max(max_value)
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(common_models.StackingMode.NORMAL))
    if bars:
        panel = panel.draw_style(common_models.GraphDrawStyle.BARS).fill_opacity(60)
    if thresholds:
        panel = panel.thresholds(_thresholds(thresholds)).thresholds_style(
            common.GraphThresholdsStyleConfig().mode(common_models.GraphTresholdsStyleMode.DASHED)
        )
    return panel


def stat_panel(
    title: str,
    description: str,
    queries: Sequence[prometheus.Dataquery],
    *,
    unit: str,
    width: int = SIXTH,
    height: int = 4,
    thresholds: Sequence[tuple[float, str]] = (),
) -> stat.Panel:
    """A single-value panel showing each series' last value, with a sparkline."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .unit(unit)
        .span(width)
        .height(height)
        .graph_mode(common_models.BigValueGraphMode.AREA)
        .color_mode(common_models.BigValueColorMode.VALUE)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if thresholds:
        panel = panel.thresholds(_thresholds(thresholds))
    return panel


def table_panel(
    title: str,
    description: str,
    queries: Sequence[prometheus.Dataquery],
    *,
    transformations: Sequence[dashboard_models.DataTransformerConfig],
    width: int = FULL,
    height: int = 8,
) -> table.Panel:
    """A table of instant query results."""
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .span(width)
        .height(height)
        .show_header(True)
    )
    for transformation in transformations:
        panel = panel.with_transformation(transformation)
    return panel


def heatmap_panel(
    title: str,
    description: str,
    bucket_query: prometheus.Dataquery,
    *,
    unit: str,
    width: int = HALF,
    height: int = 8,
) -> heatmap.Panel:
    """A heatmap of pre-bucketed histogram counts; exemplars show as points to click through to a trace."""
    return (
        heatmap.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets([bucket_query]))
        .span(width)
        .height(height)
        # The buckets come from Prometheus: Grafana must not re-bucket them.
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit(unit))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(heatmap_models.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .fill("dark-orange")
            .exponent(0.5)
            .steps(64)
            .reverse(False)
        )
        .cell_values(heatmap.CellValues().unit("short"))
        .show_tooltip()
        .show_legend()
        .exemplars_color("rgba(255,0,255,0.7)")
    )


def _thresholds(steps: Sequence[tuple[float, str]]) -> dashboard.ThresholdsConfig:
    # The first step's value must be null: it is the colour below every threshold.
    base = [dashboard_models.Threshold(value=None, color="green")]
    return (
        dashboard.ThresholdsConfig()
        .mode(dashboard_models.ThresholdsMode.ABSOLUTE)
        .steps(base + [dashboard_models.Threshold(value=value, color=color) for value, color in steps])
    )


def datasource_variable() -> dashboard.DatasourceVariable:
    """The Prometheus data source every panel queries."""
    return dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")


def query_variable(name: str, label: str, definition: str) -> dashboard.QueryVariable:
    """A variable whose values come from a Prometheus label_values() query, refreshed with the time range."""
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(definition)
        .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dashboard_models.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
    )


# Every exporter serves this gauge (0 or 1), leader or not, so it lists every deployment.
_EVERY_EXPORTER = "embedding_exporter_state_leader"
_DEPLOYMENT_TITLES = {"cluster": "Cluster", "namespace": "Namespace", "job": "Scrape job"}


def deployment_variables(default_job: str = "") -> list[dashboard.QueryVariable]:
    """The cluster, namespace and job variables, each narrowing the next; All (".*") by default.

    default_job, when set, is the job selected when the dashboard opens instead of All.
    """
    variables = []
    for i, label in enumerate(DEPLOYMENT_LABELS):
        narrower = ", ".join(f'{outer}=~"${outer}"' for outer in DEPLOYMENT_LABELS[:i])
        metric = f"{_EVERY_EXPORTER}{{{narrower}}}" if narrower else _EVERY_EXPORTER
        selected = default_job if label == "job" and default_job else None
        current = (
            dashboard_models.VariableOption(selected=True, text=[selected], value=[selected])
            if selected
            else dashboard_models.VariableOption(selected=True, text=["All"], value=["$__all"])
        )
        variables.append(
            query_variable(label, _DEPLOYMENT_TITLES[label], f"label_values({metric}, {label})")
            .multi(True)
            .include_all(True)
            .all_value(ALL)
            .current(current)
        )
    return variables


def dashboard_link(title: str, uid: str, base_url: str = "") -> dashboard.DashboardLink:
    """A link in the dashboard's header that keeps the time range and variables (job, namespace, cluster)."""
    return (
        dashboard.DashboardLink(title)
        .type(dashboard_models.DashboardLinkType.LINK)
        .url(dashboard_url(uid, base_url))
        .icon("dashboard")
        .keep_time(True)
        .include_vars(True)
        .target_blank(False)
        .as_dropdown(False)
        .tooltip(title)
    )


def dashboard_url(uid: str, base_url: str = "") -> str:
    """The address of a dashboard: "/d/<uid>" (Grafana adds its own sub-path) or under base_url when given."""
    return f"{base_url.rstrip('/')}/d/{uid}"
