"""What a deployment may tune in the dashboards; the defaults render the committed JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from alerts.build import RuleParams


@dataclass(frozen=True, kw_only=True)
class DashboardParams:
    """The SLO and thresholds come from the rules' parameters, so dashboards and alerts agree."""

    rules: RuleParams = field(default_factory=RuleParams)
    # The scrape job selected when a dashboard opens; empty selects All. The chart's
    # serviceMonitor.job (or a PodMonitor's "namespace/name") decides the real value.
    default_job: str = ""
    # Where Grafana serves the dashboards, for the links between them. Empty keeps them
    # root-relative ("/d/<uid>"), which Grafana prefixes with its own sub-path.
    grafana_url: str = ""
