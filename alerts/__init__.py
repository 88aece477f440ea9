"""Prometheus rules as code: `python -m alerts.build` writes embedding-jobs.rules.yaml next to this file."""
