"""Writes the Grafana dashboards as JSON, built with grafana-foundation-sdk.

    python -m dashboards.build                       # rewrites dashboards/*.json
    python -m dashboards.build --output-dir /tmp/d   # somewhere else
    python -m dashboards.build --job my-scrape-job --grafana-url https://grafana.example.com

The committed JSON is the output of this command; tests/test_dashboards.py checks they agree.
Thresholds and recording-rule names come from alerts.build.RuleParams (DashboardParams.rules), so
dashboards and alerts agree on the SLO.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dashboard_models

from dashboards.overview import overview
from dashboards.params import DashboardParams
from dashboards.tenant import tenant

HERE: Final = Path(__file__).parent
DASHBOARDS: Final[dict[str, Callable[[DashboardParams], dashboard.Dashboard]]] = {
    "embedding-jobs-overview.json": overview,
    "embedding-jobs-tenant.json": tenant,
}


def render(builder: dashboard.Dashboard) -> str:
    """The dashboard's JSON text: sorted keys and a final newline, so regenerating is byte-stable."""
    model = builder.build()
    _number_panels(model)
    return json.dumps(model, cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _number_panels(model: dashboard_models.Dashboard) -> None:
    # Grafana needs panel ids unique within a dashboard (panel links, "view panel"); the SDK leaves them unset.
    next_id = 1
    for panel in model.panels or []:
        panel.id_val = next_id
        next_id += 1
        for nested in getattr(panel, "panels", None) or []:
            nested.id_val = next_id
            next_id += 1


def write(output_dir: Path, params: DashboardParams | None = None) -> list[Path]:
    """Write every dashboard into output_dir; return the paths written."""
    params = params or DashboardParams()
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in DASHBOARDS.items():
        path = output_dir / name
        path.write_text(render(build(params)), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Regenerate the committed dashboards (or write them to --output-dir)."""
    parser = argparse.ArgumentParser(prog="python -m dashboards.build", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=HERE, help="folder to write to (default: %(default)s)")
    parser.add_argument(
        "--job",
        default="",
        help="scrape job the job variable selects when a dashboard opens (default: All)",
    )
    parser.add_argument(
        "--grafana-url",
        default="",
        help="Grafana's base URL for the links between the dashboards (default: root-relative /d/<uid>)",
    )
    args = parser.parse_args(argv)
    params = DashboardParams(default_job=args.job, grafana_url=args.grafana_url)
    for path in write(args.output_dir, params):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
