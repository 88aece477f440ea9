"""A helm runner for the chart tests, with its cache and config kept out of the user's home.

The chart's generated parts (files/, the values schema, the README's table) are written and
checked by tools/chart_sync.py (`python -m tools.chart_sync sync`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tools.chart_sync import CHART, REPO

HELM = REPO / ".tools" / "bin" / "helm"
INSTALL_HELM = REPO / "scripts" / "install-helm"


@dataclass(frozen=True)
class Helm:
    """The helm binary with its cache, config and data folders kept out of the user's home."""

    binary: Path
    home: Path

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run helm with args; the result is returned whatever the exit code."""
        env = dict(os.environ)
        for name in ("CACHE", "CONFIG", "DATA"):
            env[f"HELM_{name}_HOME"] = str(self.home / name.lower())
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )

    def template(
        self,
        *values_files: Path,
        set_values: Sequence[str] = (),
        kube_version: str = "1.30.0",
        chart: Path = CHART,
    ) -> subprocess.CompletedProcess[str]:
        """`helm template` of the chart as release `ej` in namespace `jobs`."""
        args = ["template", "ej", str(chart), "--namespace", "jobs", "--kube-version", kube_version]
        for values_file in values_files:
            args += ["--values", str(values_file)]
        for assignment in set_values:
            args += ["--set", assignment]
        return self.run(*args)
