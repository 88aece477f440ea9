"""Grafana dashboards as code: `python -m dashboards.build` writes the JSON next to this file."""
