"""The installed package's version, for `--version` and the exporter's build info."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "embedding-jobs"


def package_version() -> str:
    """The installed distribution's version ("unknown" when run from an uninstalled tree)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
