"""Renders the Prometheus rules (recording rules and alerts) from a few parameters.

    python -m alerts.build                 # rewrites alerts/embedding-jobs.rules.yaml with the defaults
    python -m alerts.build --slo 0.995 --job my-scrape-job --output /tmp/rules.yaml

The committed file is the rendering of `RuleParams()`; tests/test_alerts.py checks that they agree.
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

from alerts.yamltext import dump
from dashboards import uids

RULES_FILE: Final = Path(__file__).with_name("embedding-jobs.rules.yaml")
ERROR_OUTCOMES: Final = ("failed", "dead_lettered")
# Windows the dashboards plot error ratios over; their recording rules exist whatever the alert windows.
DASHBOARD_WINDOWS: Final = ("5m", "1h")
_UNITS: Final = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


@dataclass(frozen=True, kw_only=True)
class BurnWindow:
    """Error ratio above factor x error budget over both windows (SRE workbook, "Alerting on SLOs")."""

    long: str
    short: str
    factor: float


@dataclass(frozen=True, kw_only=True)
class RuleParams:
    """Everything a deployment (or a test) may tune; the defaults render the committed rules."""

    # SLO: this share of job attempts succeeds; failed and dead-lettered attempts are errors.
    slo: float = 0.99
    # The workbook's recommended pairs: 2% of a 30-day budget in 1 h or 5% in 6 h pages,
    # 10% in 3 days opens a ticket; the short window lets the alert resolve soon after recovery.
    page_windows: tuple[BurnWindow, ...] = (
        BurnWindow(long="1h", short="5m", factor=14.4),
        BurnWindow(long="6h", short="30m", factor=6),
    )
    page_for: str = "2m"
    ticket_windows: tuple[BurnWindow, ...] = (BurnWindow(long="3d", short="6h", factor=1),)
    ticket_for: str = "15m"
    dead_letter_window: str = "15m"
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
    # The `job` label Prometheus gives the exporter's scrape target: the scrape config's job_name,
    # or with the Prometheus Operator the Service name (ServiceMonitor) or "namespace/name" (PodMonitor).
    job: str = "embedding-jobs"
    target_down_for: str = "5m"
    target_absent_for: str = "15m"
    runbook_url: str = "alerts/runbooks.md"
    grafana_url: str = "http://localhost:3000"

    @property
    def error_budget(self) -> Decimal:
        """The share of attempts allowed to fail."""
        return 1 - Decimal(str(self.slo))

    @property
    def ratio_windows(self) -> list[str]:
        """Windows with an error-ratio recording rule, shortest first."""
        windows = {w for burn in self.page_windows + self.ticket_windows for w in (burn.long, burn.short)}
        return sorted(windows | set(DASHBOARD_WINDOWS), key=seconds)


def seconds(duration: str) -> float:
    """A Prometheus duration such as "90s", "1h30m" or "3d" in seconds."""
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return sum(int(number) * _UNITS[unit] for number, unit in parts)


def error_ratio_record(window: str) -> str:
    """Name of the recording rule holding each tenant's share of failed attempts over window."""
    return f"tenant:embedding_job_attempt_errors:ratio_rate{window}"


def duration_p95_record(window: str) -> str:
    """Name of the recording rule holding each tenant's p95 attempt duration over window."""
    return f"tenant:embedding_job_duration_seconds:p95_rate{window}"


def _number(value: Decimal | float) -> str:
    # Decimal keeps 14.4 x 0.01 at 0.144 instead of 0.14400000000000002.
    return format(Decimal(str(value)).normalize(), "f")


def _percent(value: Decimal) -> str:
    return _number(value * 100) + "%"


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


def recording_rules(params: RuleParams) -> list[dict[str, object]]:
    """Per-tenant error ratios for every window in use, and the p95 attempt duration."""
    errors = "|".join(ERROR_OUTCOMES)
    rules: list[dict[str, object]] = [
        {
            "record": error_ratio_record(window),
            "expr": (
                f'sum by (tenant) (rate(embedding_job_attempts_total{{outcome=~"{errors}"}}[{window}]))\n'
                "/\n"
                f"sum by (tenant) (rate(embedding_job_attempts_total[{window}]))"
            ),
        }
        for window in params.ratio_windows
    ]
    window = params.duration_window
    rules.append(
        {
            "record": duration_p95_record(window),
            "expr": (
                "histogram_quantile(0.95,\n"
                f"  sum by (tenant, le) (rate(embedding_job_duration_seconds_bucket[{window}]))\n"
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
            f"  {error_ratio_record(burn.long)} > {threshold}\n"
            "and\n"
            f"  {error_ratio_record(burn.short)} > {threshold}\n"
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
        description="Tenant {{ $labels.tenant }}: {{ $value | humanizePercentage }} of job attempts failed "
        f"over the last {longs}, against an error budget of {_percent(params.error_budget)} "
        f"(SLO: {_percent(Decimal(str(params.slo)))} of attempts succeed).",
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
            "EmbeddingJobsDeadLettered",
            'sum by (tenant) (increase(embedding_job_attempts_total{outcome="dead_lettered"}'
            f"[{p.dead_letter_window}])) > 0",
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
            'max by (tenant) (embedding_jobs_stuck{status="pending"}) > 0',
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
            'max by (tenant) (embedding_jobs_stuck{status="processing"}) > 0',
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
            'max by (queue) (embedding_queue_messages{state="active"}) > 0\n'
            "unless on ()\n"
            f'sum(increase(embedding_job_attempts_total{{outcome="completed"}}[{p.stall_window}])) > 0',
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
            'max by (queue) (embedding_queue_messages{state="dead_letter"}) > 0',
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
            "sum by (job) (rate(embedding_exporter_store_refresh_errors_total"
            f"[{p.refresh_window}]))\n/\n"
            "sum by (job) (rate(embedding_exporter_store_refresh_duration_seconds_count"
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
            "time() - max by (job) (embedding_exporter_store_last_success_timestamp_seconds)\n"
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
            "sum by (job, queue) (rate(embedding_exporter_queue_depth_errors_total"
            f"[{p.refresh_window}]))\n/\n"
            "sum by (job, queue) (rate(embedding_exporter_queue_depth_duration_seconds_count"
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
            "time() - max by (job, queue) (embedding_exporter_queue_depth_last_success_timestamp_seconds)\n"
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
            "sum by (job) (embedding_exporter_state_leader) == 0",
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
            f'up{{job="{p.job}"}} == 0',
            for_=p.target_down_for,
            severity="critical",
            summary="Prometheus cannot scrape the embedding-jobs exporter {{ $labels.instance }}",
            description=f"Scrapes of {{{{ $labels.instance }}}} (job {p.job}) have failed for {p.target_down_for}: "
            "no metrics, and no alerts from them, for that pod.",
            tenant=False,
        ),
        _alert(
            p,
            "EmbeddingExporterAbsent",
            f'absent(up{{job="{p.job}"}})',
            for_=p.target_absent_for,
            severity="warning",
            summary=f"Prometheus has no scrape target with job={p.job}",
            description=f"No target with the label job={p.job} has existed for {p.target_absent_for}: either "
            "nothing is deployed, service discovery lost it, or the rules were rendered for another job label.",
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
            f"sum by (job) (increase(embedding_worker_tracking_dropped_writes_total[{TRACKING_DROP_WINDOW}])) > 0",
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
        f"# SLO: {_percent(Decimal(str(params.slo)))} of job attempts succeed; scrape job label: {params.job}.\n"
    )
    return header + dump(rule_groups(params))


def main(argv: Sequence[str] | None = None) -> int:
    """Write the rules rendered with the defaults, or with the few values a deployment changes."""
    defaults = RuleParams()
    parser = argparse.ArgumentParser(prog="python -m alerts.build", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RULES_FILE, help="file to write (default: %(default)s)")
    parser.add_argument("--slo", type=float, default=defaults.slo, help="share of attempts that must succeed")
    parser.add_argument("--job", default=defaults.job, help="the exporter's scrape job label")
    parser.add_argument("--runbook-url", default=defaults.runbook_url, help="URL of alerts/runbooks.md")
    parser.add_argument("--grafana-url", default=defaults.grafana_url, help="base URL of Grafana")
    args = parser.parse_args(argv)
    if not 0 < args.slo < 1:
        parser.error("--slo must be between 0 and 1, e.g. 0.99")
    params = RuleParams(slo=args.slo, job=args.job, runbook_url=args.runbook_url, grafana_url=args.grafana_url)
    args.output.write_text(render(params), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
