"""Renders the Prometheus rules (recording rules and alerts) from a few parameters.

    python -m alerts.build                 # rewrites alerts/embedding-jobs.rules.yaml with the defaults
    python -m alerts.build --slo 0.995 --selector 'job="my-scrape-job"' --output /tmp/rules.yaml

The committed file is the rendering of `RuleParams()`; tests/test_alerts.py checks that they agree.
The chart's copy (embedding-jobs.rules.tpl) is the same rendering with placeholders where the job
selector, the grouping labels, the deployment selector and the link bases go; the chart's
PrometheusRule template substitutes its values for them.
Counters are read with `increase ... or` their value when the series is new in the window: a tenant's
first attempt may create its series at 1 (on a follower, which never zero-initialises tenants), and
plain increase() would never see that first event.
State gauges and the store-refresh metrics come from the one exporter holding the state lease,
which changes hands: they are aggregated per job (`max by`, sums by job), never per instance,
so a handover neither resets nor duplicates an alert. Event counters are per replica and summed.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Final

from alerts import dashboard_uids as uids
from alerts.yamltext import dump

RULES_FILE: Final = Path(__file__).with_name("embedding-jobs.rules.yaml")
CHART_RULES_FILE: Final = Path(__file__).with_name("embedding-jobs.rules.tpl")
ERROR_OUTCOMES: Final = ("failed", "dead_lettered")
# A job ends once: completed, or dead-lettered after its last attempt. Failed attempts are retried.
FINAL_OUTCOMES: Final = ("completed", "dead_lettered")
ATTEMPTS: Final = "embedding_job_attempts_total"
# Windows the dashboards plot error ratios over; their recording rules exist whatever the alert windows.
DASHBOARD_WINDOWS: Final = ("5m", "1h")
_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
# What the chart's PrometheusRule template replaces with its values (see CHART_PARAMS).
PLACEHOLDERS: Final = {
    "selector": "__EMBEDDING_JOBS_SELECTOR__",
    "group_by": "__EMBEDDING_JOBS_GROUP_BY__",
    "deployment_selector": "__EMBEDDING_JOBS_DEPLOYMENT_SELECTOR__",
    "runbook_url": "__EMBEDDING_JOBS_RUNBOOK_URL__",
    "grafana_url": "__EMBEDDING_JOBS_GRAFANA_URL__",
}


@dataclass(frozen=True, kw_only=True)
class BurnWindow:
    """Error ratio above factor x error budget over both windows (SRE workbook, "Alerting on SLOs")."""

    long: str
    short: str
    factor: float


@dataclass(frozen=True, kw_only=True)
class RuleParams:
    """Everything a deployment (or a test) may tune; the defaults render the committed rules."""

    # SLO on what users feel: this share of finished jobs completes. A job is finished when it
    # completed or was dead-lettered; an attempt that fails and is retried costs no budget.
    slo: float = 0.99
    # The workbook's recommended tiers: 2% of a 30-day budget in 1 h or 5% in 6 h pages; 10% in
    # 1 day or in 3 days opens a ticket. The short window lets an alert resolve soon after recovery.
    page_windows: tuple[BurnWindow, ...] = (
        BurnWindow(long="1h", short="5m", factor=14.4),
        BurnWindow(long="6h", short="30m", factor=6),
    )
    page_for: str = "2m"
    ticket_windows: tuple[BurnWindow, ...] = (
        BurnWindow(long="1d", short="2h", factor=3),
        BurnWindow(long="3d", short="6h", factor=1),
    )
    ticket_for: str = "15m"
    # No burn-rate alert for a tenant with fewer finished jobs than this in the long window: at
    # six jobs an hour one dead-letter is 17% of them, which is no reason to wake anyone (the
    # dead-letter warning still tells).
    min_finished_jobs: int = 10
    # The share of attempts that fail (retries included): a warning of trouble upstream (throttling,
    # a flaky endpoint) before it turns into dead-lettered jobs.
    attempt_error_ratio: float = 0.25
    attempt_window: str = "1h"
    attempt_for: str = "15m"
    min_attempts: int = 20
    dead_letter_window: str = "15m"
    # A counter series without a sample in this long before a window is new in it (see `counted`).
    appearance_lookback: str = "1h"
    # The exporter only counts a job as stuck past its --stuck-after (15 min by default).
    stuck_for: str = "5m"
    stall_window: str = "15m"
    stall_for: str = "5m"
    duration_window: str = "10m"
    duration_p95_seconds: float = 120
    duration_for: str = "15m"
    dead_letter_queue_for: str = "10m"
    refresh_window: str = "5m"
    refresh_error_ratio: float = 0.5
    refresh_for: str = "10m"
    stale_after_seconds: float = 300
    stale_for: str = "1m"
    # A dead leader is replaced within two refresh intervals (30 s by default); minutes without
    # one mean the lease cannot be taken at all.
    no_leader_for: str = "3m"
    # Label matchers every selector carries, to pick this deployment's series: the scrape job
    # (the scrape config's job_name, or the chart's serviceMonitor.job) or any other matchers.
    selector: str = 'job="embedding-jobs"'
    # Labels every aggregation keeps besides its own (tenant, queue), so that deployments sharing
    # a Prometheus (staging and prod, two clusters) never merge. Missing labels are harmless.
    group_by: tuple[str, ...] = ("job", "namespace", "cluster")
    # kube-state-metrics matchers of the worker Deployment: no exporter target while it is scaled
    # to zero (KEDA minReplicaCount 0, an idle queue) is not "absent". Without kube-state-metrics the
    # clause matches nothing and Absent behaves as plain absent().
    deployment_selector: str = 'deployment="embedding-jobs"'
    target_down_for: str = "5m"
    target_absent_for: str = "15m"
    runbook_url: str = "alerts/runbooks.md"
    grafana_url: str = "http://localhost:3000"

    @property
    def error_budget(self) -> Decimal:
        """The share of finished jobs allowed to be dead-lettered."""
        return 1 - Decimal(str(self.slo))

    @property
    def ratio_windows(self) -> list[str]:
        """Windows with an attempt error-ratio recording rule, shortest first."""
        return sorted({self.attempt_window, *DASHBOARD_WINDOWS}, key=seconds)

    @property
    def slo_windows(self) -> list[str]:
        """Windows with a final-outcome (dead-lettered among finished) recording rule, shortest first."""
        windows = {w for burn in self.page_windows + self.ticket_windows for w in (burn.long, burn.short)}
        # The dashboards' burn-rate panels read these windows whatever the alerts' tiers are.
        return sorted(windows | set(DASHBOARD_WINDOWS), key=seconds)

    def matchers(self, *extra: str) -> str:
        """The label matchers of a selector: the deployment's own, then extra ones."""
        return "{" + ", ".join(m for m in (self.selector, *extra) if m) + "}"

    def by(self, *labels: str) -> str:
        """A grouping clause keeping labels and the deployment's grouping labels."""
        return "(" + ", ".join((*labels, *self.group_by)) + ")"


# The rendering the chart embeds: its template puts the values in (helm/embedding-jobs/templates/prometheusrule.yaml).
CHART_PARAMS: Final = RuleParams(
    selector=PLACEHOLDERS["selector"],
    group_by=(PLACEHOLDERS["group_by"],),
    deployment_selector=PLACEHOLDERS["deployment_selector"],
    runbook_url=PLACEHOLDERS["runbook_url"],
    grafana_url=PLACEHOLDERS["grafana_url"],
)


def seconds(duration: str) -> float:
    """A Prometheus duration such as "90s", "1h30m" or "3d" in seconds."""
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(number) * _UNITS[unit] for number, unit in parts)


def error_ratio_record(window: str) -> str:
    """Name of the recording rule holding each tenant's share of failed attempts (retries included) over window."""
    return f"tenant:embedding_job_attempt_errors:ratio_rate{window}"


def attempts_record(window: str) -> str:
    """Name of the recording rule holding each tenant's number of attempts over window."""
    return f"tenant:embedding_job_attempts:increase{window}"


def finished_record(window: str) -> str:
    """Name of the recording rule holding each tenant's number of finished jobs over window."""
    return f"tenant:embedding_jobs_finished:increase{window}"


def dead_letter_ratio_record(window: str) -> str:
    """Name of the recording rule holding each tenant's share of finished jobs dead-lettered over window."""
    return f"tenant:embedding_jobs_dead_lettered:ratio{window}"


def duration_p95_record(window: str) -> str:
    """Name of the recording rule holding each tenant's p95 attempt duration over window."""
    return f"tenant:embedding_job_duration_seconds:p95_rate{window}"


def _number(value: Decimal | float) -> str:
    # Decimal keeps 14.4 x 0.01 at 0.144 instead of 0.14400000000000002.
    return format(Decimal(str(value)).normalize(), "f")


def _percent(value: Decimal) -> str:
    return _number(value * 100) + "%"


def _is(label: str, value: str) -> str:
    return f'{label}="{value}"'


def _runbook(params: RuleParams, alert: str) -> str:
    # Markdown hosts derive a heading's anchor by lower-casing it.
    return f"{params.runbook_url}#{alert.lower()}"


def _dashboard(params: RuleParams, *, tenant: bool) -> str:
    base = params.grafana_url.rstrip("/")
    if tenant:
        return f"{base}/d/{uids.TENANT}?var-tenant={{{{ $labels.tenant }}}}"
    return f"{base}/d/{uids.OVERVIEW}"


def _alert(
    params: RuleParams,
    name: str,
    expr: str,
    *,
    for_: str,
    severity: str,
    summary: str,
    description: str,
    tenant: bool,
) -> dict[str, object]:
    rule: dict[str, object] = {"alert": name, "expr": expr.strip()}
    if seconds(for_) > 0:
        rule["for"] = for_
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": _runbook(params, name),
        "dashboard_url": _dashboard(params, tenant=tenant),
    }
    return rule


def counted(params: RuleParams, matchers: str, window: str, *, metric: str = ATTEMPTS) -> str:
    """Per series, what a counter counted over window, its first value included when it is new in the window.

    A series first scraped at 1 (a tenant's first attempt on an exporter that had no zero series
    for it, or a new pod) has increase() 0: a series absent before the window counts its value instead.
    """
    series = metric + params.matchers(matchers)
    # A series is new when it had no sample in the hour before the window: a scrape gap shorter
    # than that never makes an old series count its whole total.
    before = f"present_over_time({series}[{params.appearance_lookback}] offset {window})"
    return f"(increase({series}[{window}]) and {before})\n  or\n  ({series} unless {before})"


def _counted_sum(params: RuleParams, matchers: str, window: str, *labels: str, metric: str = ATTEMPTS) -> str:
    return f"sum by {params.by(*labels)} (\n  {counted(params, matchers, window, metric=metric)}\n)"


def recording_rules(params: RuleParams) -> list[dict[str, object]]:
    """Per tenant: attempts and their error ratio, finished jobs and their dead-lettered share, p95 duration."""
    p = params
    errors = "|".join(ERROR_OUTCOMES)
    finals = "|".join(FINAL_OUTCOMES)
    rules: list[dict[str, object]] = []
    for window in p.ratio_windows:
        rules.append({"record": attempts_record(window), "expr": _counted_sum(p, "", window, "tenant")})
        rules.append(
            {
                "record": error_ratio_record(window),
                "expr": _counted_sum(p, f'outcome=~"{errors}"', window, "tenant")
                # No ratio (rather than NaN) for a tenant without attempts in the window.
                + f"\n/\n({attempts_record(window)} > 0)",
            }
        )
    for window in p.slo_windows:
        rules.append(
            {"record": finished_record(window), "expr": _counted_sum(p, f'outcome=~"{finals}"', window, "tenant")}
        )
        rules.append(
            {
                "record": dead_letter_ratio_record(window),
                "expr": _counted_sum(p, 'outcome="dead_lettered"', window, "tenant")
                + f"\n/\n({finished_record(window)} > 0)",
            }
        )
    window = p.duration_window
    rules.append(
        {
            "record": duration_p95_record(window),
            "expr": (
                "histogram_quantile(0.95,\n"
                f"  sum by {p.by('tenant', 'le')} "
                f"(rate(embedding_job_duration_seconds_bucket{p.matchers()}[{window}]))\n"
                ")"
            ),
        }
    )
    return rules


def _burn_expr(params: RuleParams, windows: Sequence[BurnWindow]) -> str:
    terms = []
    for burn in windows:
        threshold = _number(Decimal(str(burn.factor)) * params.error_budget)
        terms.append(
            "(\n"
            f"  {dead_letter_ratio_record(burn.long)} > {threshold}\n"
            "and\n"
            f"  {dead_letter_ratio_record(burn.short)} > {threshold}\n"
            "and\n"
            f"  {finished_record(burn.long)} >= {params.min_finished_jobs}\n"
            ")"
        )
    return "\nor\n".join(terms)


def _burn_alert(
    params: RuleParams, name: str, windows: Sequence[BurnWindow], *, for_: str, severity: str
) -> dict[str, object]:
    longs = " or ".join(burn.long for burn in windows)
    slowest = min(burn.factor for burn in windows)
    return _alert(
        params,
        name,
        _burn_expr(params, windows),
        for_=for_,
        severity=severity,
        summary="Tenant {{ $labels.tenant }} is burning its embedding error budget "
        f"at {_number(slowest)}x the sustainable rate or faster",
        description="Tenant {{ $labels.tenant }}: {{ $value | humanizePercentage }} of finished jobs were "
        f"dead-lettered over the last {longs}, against an error budget of {_percent(params.error_budget)} "
        f"(SLO: {_percent(Decimal(str(params.slo)))} of finished jobs complete; tenants with fewer than "
        f"{params.min_finished_jobs} finished jobs in the window are not judged).",
        tenant=True,
    )


def alerting_rules(params: RuleParams) -> list[dict[str, object]]:
    """Every alert, each with severity, summary, description, runbook and dashboard links."""
    p = params
    return [
        _burn_alert(p, "EmbeddingJobsErrorBudgetBurnFast", p.page_windows, for_=p.page_for, severity="critical"),
        _burn_alert(p, "EmbeddingJobsErrorBudgetBurnSlow", p.ticket_windows, for_=p.ticket_for, severity="warning"),
        _alert(
            p,
            "EmbeddingJobsAttemptsFailing",
            f"{error_ratio_record(p.attempt_window)} > {_number(p.attempt_error_ratio)}\n"
            f"and\n{attempts_record(p.attempt_window)} >= {p.min_attempts}",
            for_=p.attempt_for,
            severity="warning",
            summary="Many embedding job attempts of tenant {{ $labels.tenant }} fail",
            description="Tenant {{ $labels.tenant }}: {{ $value | humanizePercentage }} of job attempts failed "
            f"over the last {p.attempt_window} (threshold {_percent(Decimal(str(p.attempt_error_ratio)))}). "
            "Retries may still complete the jobs; dead-lettered jobs, if any, burn the error budget.",
            tenant=True,
        ),
        _alert(
            p,
            "EmbeddingJobsDeadLettered",
            _counted_sum(p, 'outcome="dead_lettered"', p.dead_letter_window, "tenant") + " > 0",
            for_="0s",
            severity="warning",
            summary="Tenant {{ $labels.tenant }} has dead-lettered embedding jobs",
            description='Tenant {{ $labels.tenant }}: about {{ $value | printf "%.0f" }} job(s) were dead-lettered '
            f"in the last {p.dead_letter_window}, after using up their attempts or failing permanently. "
            "They will not be retried without a manual retry.",
            tenant=True,
        ),
        _alert(
            p,
            "EmbeddingJobsStuckPending",
            f"max by {p.by('tenant')} (embedding_jobs_stuck{p.matchers(_is('status', 'pending'))}) > 0",
            for_=p.stuck_for,
            severity="warning",
            summary="Tenant {{ $labels.tenant }} has embedding jobs stuck in pending",
            description="Tenant {{ $labels.tenant }}: {{ $value }} job(s) have been pending for longer than the "
            "exporter's stuck threshold (--stuck-after) without a worker starting them.",
            tenant=True,
        ),
        _alert(
            p,
            "EmbeddingJobsStuckProcessing",
            f"max by {p.by('tenant')} (embedding_jobs_stuck{p.matchers(_is('status', 'processing'))}) > 0",
            for_=p.stuck_for,
            severity="warning",
            summary="Tenant {{ $labels.tenant }} has embedding jobs stuck in processing",
            description="Tenant {{ $labels.tenant }}: {{ $value }} job(s) have been processing for longer than the "
            "exporter's stuck threshold (--stuck-after) without finishing.",
            tenant=True,
        ),
        _alert(
            p,
            "EmbeddingJobsWorkerStalled",
            f"max by {p.by('queue')} (embedding_queue_messages{p.matchers(_is('state', 'active'))}) > 0\n"
            f"unless on {p.by()}\n" + _counted_sum(p, 'outcome="completed"', p.stall_window) + " > 0",
            for_=p.stall_for,
            severity="critical",
            summary="Embedding queue {{ $labels.queue }} has a backlog but no job completes",
            description="Queue {{ $labels.queue }} holds {{ $value }} active message(s) and no embedding job "
            f"completed in the last {p.stall_window}: the workers are down, stalled or failing every job.",
            tenant=False,
        ),
        _alert(
            p,
            "EmbeddingJobsSlow",
            f"{duration_p95_record(p.duration_window)} > {_number(p.duration_p95_seconds)}",
            for_=p.duration_for,
            severity="warning",
            summary="Embedding jobs of tenant {{ $labels.tenant }} are slow",
            description="Tenant {{ $labels.tenant }}: the 95th percentile of job attempt durations over the last "
            f"{p.duration_window} is {{{{ $value | humanizeDuration }}}} "
            f"(threshold {_number(p.duration_p95_seconds)}s).",
            tenant=True,
        ),
        _alert(
            p,
            "EmbeddingQueueDeadLetterMessages",
            f"max by {p.by('queue')} (embedding_queue_messages{p.matchers(_is('state', 'dead_letter'))}) > 0",
            for_=p.dead_letter_queue_for,
            severity="warning",
            summary="Embedding queue {{ $labels.queue }} has messages in its dead-letter sub-queue",
            description="Queue {{ $labels.queue }}: {{ $value }} message(s) wait in the dead-letter sub-queue. "
            "Their jobs will not run again until someone retries or discards them.",
            tenant=False,
        ),
        _alert(
            p,
            "EmbeddingExporterStoreRefreshFailing",
            f"sum by {p.by()} (rate(embedding_exporter_store_refresh_errors_total{p.matchers()}"
            f"[{p.refresh_window}]))\n/\n"
            f"sum by {p.by()} (rate(embedding_exporter_store_refresh_duration_seconds_count{p.matchers()}"
            f"[{p.refresh_window}]))\n> {_number(p.refresh_error_ratio)}",
            for_=p.refresh_for,
            severity="warning",
            summary="The embedding-jobs exporters of {{ $labels.job }} cannot read the job store",
            description="Job {{ $labels.job }}: {{ $value | humanizePercentage }} of the state leader's reads of "
            f"the job store failed or timed out over the last {p.refresh_window}; the job gauges are going stale.",
            tenant=False,
        ),
        _alert(
            p,
            "EmbeddingExporterStateStale",
            f"time() - max by {p.by()} (embedding_exporter_store_last_success_timestamp_seconds{p.matchers()})\n"
            f"> {_number(p.stale_after_seconds)}",
            for_=p.stale_for,
            severity="warning",
            summary="Job gauges of {{ $labels.job }} are stale",
            description="The state leader of job {{ $labels.job }} last read the job store "
            "{{ $value | humanizeDuration }} ago. The job and stuck-job gauges show old values, "
            "and the alerts built on them are blind.",
            tenant=False,
        ),
        # Queue depth is read apart from the store, so these name the queue, and a store outage
        # never fires them (nor a queue outage the two above).
        _alert(
            p,
            "EmbeddingExporterQueueDepthFailing",
            f"sum by {p.by('queue')} (rate(embedding_exporter_queue_depth_errors_total{p.matchers()}"
            f"[{p.refresh_window}]))\n/\n"
            f"sum by {p.by('queue')} (rate(embedding_exporter_queue_depth_duration_seconds_count{p.matchers()}"
            f"[{p.refresh_window}]))\n> {_number(p.refresh_error_ratio)}",
            for_=p.refresh_for,
            severity="warning",
            summary="The embedding-jobs exporters of {{ $labels.job }} cannot read the depth of queue "
            "{{ $labels.queue }}",
            description="Job {{ $labels.job }}: {{ $value | humanizePercentage }} of the state leader's reads of "
            f"the depth of queue {{{{ $labels.queue }}}} failed or timed out over the last {p.refresh_window}; "
            "the queue gauges are going stale. The job store is not involved.",
            tenant=False,
        ),
        _alert(
            p,
            "EmbeddingExporterQueueDepthStale",
            f"time() - max by {p.by('queue')} "
            f"(embedding_exporter_queue_depth_last_success_timestamp_seconds{p.matchers()})\n"
            f"> {_number(p.stale_after_seconds)}",
            for_=p.stale_for,
            severity="warning",
            summary="Queue depth of {{ $labels.queue }} is stale",
            description="The state leader of job {{ $labels.job }} last read the depth of queue {{ $labels.queue }} "
            "{{ $value | humanizeDuration }} ago. The queue gauges show old values, so the stall and "
            "dead-letter queue alerts are blind; the job gauges are not affected.",
            tenant=False,
        ),
        _alert(
            p,
            "EmbeddingExporterNoStateLeader",
            f"sum by {p.by()} (embedding_exporter_state_leader{p.matchers()}) == 0",
            for_=p.no_leader_for,
            severity="warning",
            summary="No embedding-jobs exporter of {{ $labels.job }} reads the job store",
            description="Exporters of job {{ $labels.job }} are up, but none has held the state lease for "
            f"{p.no_leader_for}: no job, stuck-job or queue gauges are exported, and the alerts built on them "
            "are blind.",
            tenant=False,
        ),
        _alert(
            p,
            "EmbeddingExporterDown",
            f"up{p.matchers()} == 0",
            for_=p.target_down_for,
            severity="critical",
            summary="Prometheus cannot scrape the embedding-jobs exporter {{ $labels.instance }}",
            description="Scrapes of {{ $labels.instance }} (job {{ $labels.job }}) have failed for "
            f"{p.target_down_for}: "
            "no metrics, and no alerts from them, for that pod.",
            tenant=False,
        ),
        _alert(
            p,
            "EmbeddingExporterAbsent",
            f"absent(up{p.matchers()})\n"
            # Scaled to zero on purpose (KEDA, an idle queue): no target is expected.
            f"unless on ()\nmax(kube_deployment_spec_replicas{{{p.deployment_selector}}}) == 0",
            for_=p.target_absent_for,
            severity="warning",
            summary=f"Prometheus has no embedding-jobs scrape target matching {{{p.selector}}}",
            description=f"No target matching {{{p.selector}}} has existed for {p.target_absent_for} while the worker "
            "Deployment is not scaled to zero: either nothing is deployed, service discovery lost it, the pods "
            "cannot start, or the rules were rendered for another job label.",
            tenant=False,
        ),
    ]


# A dropped tracking write is never repaired by itself; the window only decides how long the alert
# stays up after the last drop (worker reports arrive every 10 s, scrapes every 15-60 s).
TRACKING_DROP_WINDOW: Final = "10m"


def tracking_alerts(params: RuleParams) -> list[dict[str, object]]:
    """The worker's job tracking: status writes it gave up on (exporter/workerhealth.py)."""
    return [
        _alert(
            params,
            "EmbeddingWorkerTrackingWritesDropped",
            # Counted like the attempts: a worker whose first report already holds drops is seen.
            _counted_sum(params, "", TRACKING_DROP_WINDOW, metric="embedding_worker_tracking_dropped_writes_total")
            + " > 0",
            for_="0m",
            severity="warning",
            summary="Embedding workers of {{ $labels.job }} dropped job-status writes",
            description="Job {{ $labels.job }}: workers gave up {{ $value | humanize }} job-status write(s) in the "
            f"last {TRACKING_DROP_WINDOW} (tracking buffer full, or the store refused them). Job records and "
            "per-tenant counts are wrong until `embedding-jobs recount` runs after the store recovers.",
            tenant=False,
        )
    ]


def rule_groups(params: RuleParams) -> dict[str, object]:
    """The rule file's document: one group of recording rules, one of alerts."""
    return {
        "groups": [
            {"name": "embedding-jobs.rules", "rules": recording_rules(params)},
            {"name": "embedding-jobs.alerts", "rules": alerting_rules(params) + tracking_alerts(params)},
        ]
    }


def render(params: RuleParams) -> str:
    """The rule file's text for params."""
    header = (
        "# Generated by `python -m alerts.build` from alerts/build.py: do not edit by hand.\n"
        f"# SLO: {_percent(Decimal(str(params.slo)))} of finished jobs complete; "
        f"selector: {{{params.selector}}}; grouping labels: {', '.join(params.group_by)}.\n"
    )
    return header + dump(rule_groups(params))


def render_chart() -> str:
    """The rules the chart embeds: the defaults, with placeholders its template replaces by values.

    Every string value is a literal block, so the template can put any one-line value in as it is.
    """
    header = (
        "# Generated by `python -m alerts.build` from alerts/build.py: do not edit by hand.\n"
        "# The chart's PrometheusRule template replaces the __EMBEDDING_JOBS_*__ placeholders with its values.\n"
    )
    return header + dump(rule_groups(CHART_PARAMS), quote_all=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the rules rendered with the defaults (and the chart's copy), or with the values a deployment changes."""
    defaults = RuleParams()
    parser = argparse.ArgumentParser(prog="python -m alerts.build", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help=f"file to write (default: {RULES_FILE})")
    parser.add_argument("--slo", type=float, default=defaults.slo, help="share of finished jobs that must complete")
    parser.add_argument("--selector", default=defaults.selector, help="label matchers of the exporter's series")
    parser.add_argument(
        "--group-by",
        default=",".join(defaults.group_by),
        help="comma-separated labels every aggregation keeps (default: %(default)s)",
    )
    parser.add_argument(
        "--deployment-selector",
        default=defaults.deployment_selector,
        help="kube-state-metrics matchers of the worker Deployment",
    )
    parser.add_argument("--runbook-url", default=defaults.runbook_url, help="URL of alerts/runbooks.md")
    parser.add_argument("--grafana-url", default=defaults.grafana_url, help="base URL of Grafana")
    args = parser.parse_args(argv)
    if not 0 < args.slo < 1:
        parser.error("--slo must be between 0 and 1, e.g. 0.99")
    if not args.selector.strip():
        parser.error('--selector must hold at least one matcher, e.g. job="embedding-jobs"')
    params = RuleParams(
        slo=args.slo,
        selector=args.selector,
        group_by=tuple(label.strip() for label in args.group_by.split(",") if label.strip()),
        deployment_selector=args.deployment_selector,
        runbook_url=args.runbook_url,
        grafana_url=args.grafana_url,
    )
    outputs = {args.output or RULES_FILE: render(params)}
    if args.output is None:
        outputs[CHART_RULES_FILE] = render_chart()
    for path, text in outputs.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
