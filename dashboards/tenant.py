"""The per-tenant drill-down dashboard: one tenant, picked in the `tenant` variable.

Same aggregation rules as the overview: `max by` for the state gauges (from the state leader),
`sum` for per-replica counters and histograms. A tenant name may exist in several deployments:
state gauges and burn rates keep the deployment labels (cluster, namespace, job) apart; counters
and histograms add up over the deployments selected in the variables.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard, prometheus
from grafana_foundation_sdk.models import dashboard as dashboard_models

from alerts import dashboard_uids as uids
from alerts.build import DASHBOARD_WINDOWS, dead_letter_ratio_record
from dashboards.panels import (
    BY_DEPLOYMENT,
    DEPLOYMENT_LEGEND,
    FULL,
    HALF,
    RATE,
    SELECTOR,
    THIRD,
    dashboard_link,
    datasource_variable,
    deployment_variables,
    heatmap_panel,
    query,
    query_variable,
    series,
    stat_panel,
    timeseries_panel,
)
from dashboards.params import DashboardParams

T = 'tenant="$tenant"'
BY = BY_DEPLOYMENT
ATTEMPTS = "embedding_job_attempts_total"
COMPLETED = 'outcome="completed"'
DEAD_LETTERED = 'outcome="dead_lettered"'
STATUS_LEGEND = f"{{{{status}}}} {DEPLOYMENT_LEGEND}"


def tenant(dashboard_params: DashboardParams) -> dashboard.Dashboard:
    """The drill-down dashboard; the rule parameters supply the SLO and the alert thresholds it draws."""
    params = dashboard_params.rules
    budget = float(params.error_budget)
    pages = " or ".join(f"{burn.factor:g} over {burn.long} and {burn.short}" for burn in params.page_windows)
    return (
        dashboard.Dashboard("Embedding jobs — tenant")
        .uid(uids.TENANT)
        .description("One tenant's embedding jobs: status, attempts, error budget, latency and stuck jobs.")
        .tags(["embedding-jobs"])
        .time("now-6h", "now")
        .refresh("30s")
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .timezone("browser")
        .editable()
        .link(dashboard_link("Overview", uids.OVERVIEW, dashboard_params.grafana_url))
        .variables(
            [
                datasource_variable(),
                *deployment_variables(dashboard_params.default_job),
                query_variable("tenant", "Tenant", f"label_values(embedding_jobs{{{SELECTOR}}}, tenant)"),
            ]
        )
        .with_row(dashboard.Row("Status"))
        .with_panel(
            stat_panel(
                "Jobs by status",
                "Current job counts of the tenant, from the store.",
                [query(f"max by ({BY}, status) ({series('embedding_jobs', T)})", STATUS_LEGEND)],
                unit="short",
                width=HALF,
            )
        )
        .with_panel(
            stat_panel(
                "Success ratio",
                "Share of the tenant's attempts that completed.",
                [
                    query(
                        f"sum(rate({series(ATTEMPTS, T, COMPLETED)}[{RATE}]))\n"
                        f"/\nsum(rate({series(ATTEMPTS, T)}[{RATE}]))"
                    )
                ],
                unit="percentunit",
            )
        )
        .with_panel(
            stat_panel(
                "Stuck jobs",
                "Jobs pending or processing for longer than the exporter's stuck threshold.",
                [query(f"sum(max by ({BY}, status) ({series('embedding_jobs_stuck', T)}))")],
                unit="short",
                thresholds=[(1, "red")],
            )
        )
        .with_panel(
            stat_panel(
                "Vectors / s",
                "Embedding vectors produced per second for the tenant.",
                [query(f"sum(rate({series('embedding_vectors_total', T)}[{RATE}]))")],
                unit="short",
            )
        )
        .with_row(dashboard.Row("Attempts and error budget"))
        .with_panel(
            timeseries_panel(
                "Attempts by outcome",
                "The tenant's attempts per second: completed, failed (a retry follows) and dead-lettered.",
                [query(f"sum by (outcome) (rate({series(ATTEMPTS, T)}[{RATE}]))", "{{outcome}}")],
                unit="ops",
                stacked=True,
            )
        )
        .with_panel(
            timeseries_panel(
                "Error budget burn rate",
                f"Dead-lettered share of finished jobs divided by the error budget ({budget * 100:g}%); "
                f"1 uses the budget up exactly in the SLO period. "
                f"The fast-burn alert pages when the burn rate exceeds {pages}.",
                [
                    query(
                        f"{series(dead_letter_ratio_record(window), T)} / {budget:g}",
                        f"{window} {DEPLOYMENT_LEGEND}",
                    )
                    for window in DASHBOARD_WINDOWS
                ],
                unit="short",
                thresholds=[(max(burn.factor for burn in params.page_windows), "red")],
            )
        )
        .with_panel(
            timeseries_panel(
                "Jobs by status",
                "The tenant's job counts over time.",
                [query(f"max by ({BY}, status) ({series('embedding_jobs', T)})", STATUS_LEGEND)],
                unit="short",
            )
        )
        .with_panel(
            timeseries_panel(
                "Dead-lettered attempts",
                "Jobs of the tenant given up: attempts used up, a permanent failure or an unreadable message.",
                [
                    query(
                        f"sum(increase({series(ATTEMPTS, T, DEAD_LETTERED)}[{RATE}]))",
                        "dead-lettered",
                    )
                ],
                unit="short",
                bars=True,
            )
        )
        .with_row(dashboard.Row("Latency"))
        .with_panel(
            timeseries_panel(
                "Attempt duration",
                "50th and 95th percentile of the tenant's attempt durations, every outcome together.",
                [_quantile(q, "embedding_job_duration_seconds_bucket") for q in (0.5, 0.95)],
                unit="s",
                width=THIRD,
                thresholds=[(params.duration_p95_seconds, "red")],
            )
        )
        .with_panel(
            timeseries_panel(
                "Queue wait",
                "Percentiles of the time from enqueue (or the scheduled retry time) to the start of an attempt.",
                [_quantile(q, "embedding_job_queue_wait_seconds_bucket") for q in (0.5, 0.95, 0.99)],
                unit="s",
                width=THIRD,
            )
        )
        .with_panel(
            timeseries_panel(
                "Stuck jobs",
                "Stuck jobs by status, and how long the oldest has waited.",
                [
                    query(f"max by ({BY}, status) ({series('embedding_jobs_stuck', T)})", STATUS_LEGEND),
                    query(
                        f"max by ({BY}, status) ({series('embedding_jobs_stuck_oldest_age_seconds', T)})",
                        f"oldest {{{{status}}}} (s) {DEPLOYMENT_LEGEND}",
                    ),
                ],
                unit="short",
                width=THIRD,
            ).override_by_regexp("oldest.*", [dashboard_models.DynamicConfigValue(id_val="unit", value="s")])
        )
        .with_panel(
            heatmap_panel(
                "Attempt duration heatmap",
                "The tenant's attempts per duration bucket. Exemplars (points) open the trace of one attempt.",
                query(
                    f"sum by (le) (increase({series('embedding_job_duration_seconds_bucket', T)}[{RATE}]))",
                    "{{le}}",
                    heatmap_format=True,
                    exemplar=True,
                ),
                unit="s",
                width=FULL,
            )
        )
    )


def _quantile(q: float, bucket: str) -> prometheus.Dataquery:
    return query(f"histogram_quantile({q:g}, sum by (le) (rate({series(bucket, T)}[{RATE}])))", f"p{q * 100:g}")
