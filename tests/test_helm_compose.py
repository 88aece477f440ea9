"""The chart among others: as a subchart, behind a NetworkPolicy, scraped, tested by `helm test`, probed."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.settings import Settings
from tests.helm_tools import Helm
from tests.helpers.chart import (
    ALL_ON,
    CUSTOM_KINDS,
    LAYOUTS,
    TRIAL,
    Manifest,
    all_on,
    all_on_overrides,
    container,
    env_of,
    helm,
    kubernetes_validate,
    layout,
    one,
    pod_spec,
    refusal,
    render,
)
from tests.helpers.exporter import exporter_process
from tools.chart_sync import CHART

# Fixtures shared with tests/test_helm.py; named here so pytest finds them in this module.
__all__ = ["all_on", "helm", "kubernetes_validate", "layout"]

DNS_RULE = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


def validate(kubernetes_validate: str, manifests: list[Manifest], path: Path, kube: str = "1.30.0") -> None:
    """Check the built-in objects against the Kubernetes schemas, unknown fields included."""
    path.write_text(yaml.safe_dump_all([m for m in manifests if m["kind"] not in CUSTOM_KINDS]))
    result = subprocess.run(
        [kubernetes_validate, "--strict", "--quiet", "-k", kube, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def values_file(tmp_path: Path, values: dict[str, Any], name: str = "values.yaml") -> Path:
    """values written to a file for helm."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


# As a subchart ---------------------------------------------------------------------------------


def test_chart_renders_as_a_subchart_of_an_umbrella_chart_with_global_values(
    helm: Helm, kubernetes_validate: str, tmp_path: Path
) -> None:
    umbrella = tmp_path / "platform"
    umbrella.mkdir()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    (umbrella / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "platform",
                "version": "1.0.0",
                "dependencies": [{"name": chart["name"], "version": chart["version"], "repository": f"file://{CHART}"}],
            }
        )
    )
    values: dict[str, Any] = {
        "global": {"imageRegistry": "registry.example.com", "environment": "staging"},
        "embedding-jobs": {"api": {"allowAnonymous": True}, "networkPolicy": {"enabled": True}},
    }
    (umbrella / "values.yaml").write_text(yaml.safe_dump(values))
    built = helm.run("dependency", "build", str(umbrella))
    assert built.returncode == 0, built.stdout + built.stderr
    assert [p.name for p in (umbrella / "charts").iterdir()] == [f"{chart['name']}-{chart['version']}.tgz"]
    result = helm.run("template", "platform", str(umbrella), "--namespace", "jobs", "--kube-version", "1.30.0")
    assert result.returncode == 0, result.stderr
    manifests = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert one(manifests, "Deployment")["metadata"]["name"] == "platform-embedding-jobs"
    assert one(manifests, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == (
        "platform"
    )
    validate(kubernetes_validate, manifests, tmp_path / "umbrella.yaml")
    # The schema still refuses what is not a value of this chart, global aside.
    values["embedding-jobs"]["replicas"] = 2
    (umbrella / "values.yaml").write_text(yaml.safe_dump(values))
    refused = helm.run("template", "platform", str(umbrella), "--kube-version", "1.30.0")
    assert refused.returncode != 0
    assert "replicas" in refused.stderr


# Egress ----------------------------------------------------------------------------------------


def egress(helm: Helm, *values_files: Path, set_values: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The NetworkPolicy's egress rules, with egress restricted."""
    manifests = render(
        helm, *values_files, set_values=("networkPolicy.enabled=true", "networkPolicy.restrictEgress=true", *set_values)
    )
    policy = one(manifests, "NetworkPolicy")["spec"]
    assert "Egress" in policy["policyTypes"]
    rules: list[dict[str, Any]] = policy["egress"]
    return rules


def tcp_ports(rule: dict[str, Any]) -> list[int]:
    """The TCP ports of a port-only egress rule."""
    assert set(rule) == {"ports"}, rule
    assert {p["protocol"] for p in rule["ports"]} == {"TCP"}
    return [p["port"] for p in rule["ports"]]


def test_restricted_egress_without_rules_still_allows_dns(helm: Helm, kubernetes_validate: str, tmp_path: Path) -> None:
    # SQLite, the local queue and the hashing embedder reach nothing but the names they resolve.
    rules = egress(helm, TRIAL)
    assert rules == [DNS_RULE]
    manifests = render(helm, TRIAL, set_values=("networkPolicy.enabled=true", "networkPolicy.restrictEgress=true"))
    validate(kubernetes_validate, manifests, tmp_path / "policy.yaml")


def test_restricted_egress_follows_what_all_on_enables_and_keeps_the_extra_rules(helm: Helm) -> None:
    rules = egress(helm, ALL_ON, set_values=tuple(all_on_overrides()))
    values = yaml.safe_load(ALL_ON.read_text())
    extra = values["networkPolicy"]["egress"]
    assert rules[0] == DNS_RULE
    # 443: Cosmos DB, Service Bus over WebSockets, Azure OpenAI, Entra ID; 5671: AMQP; 4318: span forwarding.
    assert values["config"]["forwardOtlpEndpoint"].endswith(":4318")
    assert tcp_ports(rules[1]) == [443, 4318, 5671]
    assert rules[2:] == extra


ENDPOINTS = {
    "cosmos emulator port": (
        ("config.store=cosmos", "config.cosmosEndpoint=https://cosmos.data:8081"),
        [443, 8081],
    ),
    "openai-compatible server over http": (
        ("config.embedder=openai", "config.openaiEndpoint=http://vllm.models:8000/v1"),
        [443, 8000],
    ),
    "service bus by connection string": (
        ("config.queue=servicebus", "secrets.servicebusConnectionString.name=sb"),
        [443, 5671],
    ),
    "model download": (("config.embedder=sentence-transformers",), [443]),
    "entra id tokens": (("azure.workloadIdentity.enabled=true", "azure.workloadIdentity.clientId=c"), [443]),
    "forwarding over https": (("config.forwardOtlpEndpoint=https://collector.example.com",), [443]),
    "forwarding to an ipv6 address": (("config.forwardOtlpEndpoint=http://[fd00::1]:4317",), [4317]),
}


@pytest.mark.parametrize(("overrides", "ports"), list(ENDPOINTS.values()), ids=list(ENDPOINTS))
def test_restricted_egress_opens_the_port_of_each_configured_endpoint(
    helm: Helm, overrides: tuple[str, ...], ports: list[int]
) -> None:
    dns, derived = egress(helm, TRIAL, set_values=overrides)
    assert dns == DNS_RULE
    assert tcp_ports(derived) == ports


def test_an_endpoint_whose_port_cannot_be_told_is_refused_when_egress_is_restricted(helm: Helm) -> None:
    overrides = (
        "networkPolicy.enabled=true",
        "networkPolicy.restrictEgress=true",
        "config.forwardOtlpEndpoint=otel-collector:4318",
    )
    message = refusal(helm, TRIAL, set_values=overrides)
    assert "config.forwardOtlpEndpoint" in message
    assert "http:// or https://" in message


# Scraping: ServiceMonitor, PodMonitor, Azure Monitor managed Prometheus ------------------------

POD_MONITOR = ("serviceMonitor.enabled=false", "podMonitor.enabled=true", "podMonitor.labels.release=prom")


def test_pod_monitor_scrapes_the_exporter_port_of_every_pod_with_the_rules_job(helm: Helm) -> None:
    values = yaml.safe_load(ALL_ON.read_text())
    manifests = render(helm, ALL_ON, set_values=(*all_on_overrides(), *POD_MONITOR))
    assert not [m for m in manifests if m["kind"] == "ServiceMonitor"]
    monitor = one(manifests, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["jobs"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    exporter = container(manifests, "exporter")
    assert endpoint["port"] in {p["name"] for p in exporter["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["relabelings"] == [{"action": "replace", "targetLabel": "job", "replacement": "embedding-jobs"}]
    token = values["secrets"]["metricsToken"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": token["name"], "key": token["key"]}}
    # The same endpoint as the ServiceMonitor's: one job, interval and token, whichever object scrapes.
    service_monitor = one(render(helm, ALL_ON, set_values=tuple(all_on_overrides())), "ServiceMonitor")
    assert service_monitor["spec"]["endpoints"] == [endpoint]


def test_service_and_pod_monitor_together_are_refused(helm: Helm) -> None:
    message = refusal(helm, TRIAL, set_values=("serviceMonitor.enabled=true", "podMonitor.enabled=true"))
    assert "scrape every pod twice" in message


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [((), "ServiceMonitor"), (POD_MONITOR, "PodMonitor")],
    ids=["service-monitor", "pod-monitor"],
)
def test_azure_managed_prometheus_gets_its_api_group_and_label_limits(
    helm: Helm, overrides: tuple[str, ...], kind: str
) -> None:
    operator = one(render(helm, ALL_ON, set_values=(*all_on_overrides(), *overrides)), kind)
    azure_values = (*all_on_overrides(), *overrides, "azureManagedPrometheus.enabled=true")
    azure = one(render(helm, ALL_ON, set_values=azure_values), kind)
    assert azure["apiVersion"] == "azmonitoring.coreos.com/v1"
    limits = {"labelLimit": 63, "labelNameLengthLimit": 511, "labelValueLengthLimit": 1023}
    assert {key: azure["spec"].pop(key) for key in limits} == limits
    # Apart from the group and the limits, the add-on reads the Prometheus Operator's fields.
    assert azure["spec"] == operator["spec"]
    assert azure["metadata"] == operator["metadata"]


def test_azure_managed_prometheus_without_a_monitor_is_refused(helm: Helm) -> None:
    assert "enable serviceMonitor or podMonitor" in refusal(
        helm, TRIAL, set_values=("azureManagedPrometheus.enabled=true",)
    )


# The helm test hook ----------------------------------------------------------------------------


def hook_pod(manifests: list[Manifest]) -> Manifest:
    """The Pod `helm test` runs."""
    hooks = [m for m in manifests if m["kind"] == "Pod" and m["metadata"].get("annotations", {}).get("helm.sh/hook")]
    (pod,) = hooks
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    return pod


def test_helm_test_pod_uses_the_chart_image_and_stays_out_of_the_service(
    layout: tuple[str, list[Manifest]], kubernetes_validate: str, tmp_path: Path
) -> None:
    name, manifests = layout
    pod = hook_pod(manifests)
    validate(kubernetes_validate, [pod], tmp_path / "test-pod.yaml", kube=LAYOUTS[name][2])
    assert pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
    (check,) = pod["spec"]["containers"]
    assert check["image"] == container(manifests, "worker")["image"]
    assert check["command"][:2] == ["python", "-c"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert check["securityContext"]["readOnlyRootFilesystem"] is True
    assert check["securityContext"]["runAsNonRoot"] is True
    # Not an endpoint of the Service, not covered by the PodDisruptionBudget or the NetworkPolicy's pod selector.
    service = one(manifests, "Service")
    assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert env_of(check)["EMBEDDING_JOBS_TEST_URL"] == (
        f"http://{service['metadata']['name']}.jobs.svc:{service['spec']['ports'][0]['port']}"
    )


def test_helm_test_pod_may_reach_the_exporter_through_a_restricted_ingress(all_on: list[Manifest]) -> None:
    pod = hook_pod(all_on)
    (ingress,) = one(all_on, "NetworkPolicy")["spec"]["ingress"]
    selectors = [peer["podSelector"]["matchLabels"] for peer in ingress["from"] if set(peer) == {"podSelector"}]
    assert any(labels.items() <= pod["metadata"]["labels"].items() for labels in selectors), selectors


def test_helm_test_pod_is_left_out_when_disabled(helm: Helm) -> None:
    manifests = render(helm, TRIAL, set_values=("helmTest.enabled=false",))
    assert not [m for m in manifests if m["kind"] == "Pod"]


async def test_helm_test_command_passes_against_a_real_exporter_and_fails_with_a_wrong_token(
    helm: Helm, tmp_path: Path
) -> None:
    # The command exactly as rendered, run by this Python against a real exporter process.
    manifests = render(helm, TRIAL, set_values=("secrets.metricsToken.name=metrics",))
    (check,) = hook_pod(manifests)["spec"]["containers"]
    assert env_of(check)["EMBEDDING_JOBS_METRICS_TOKEN"] == {
        "secretKeyRef": {"name": "metrics", "key": "metrics-token"}
    }
    command = [sys.executable, *check["command"][1:]]
    token = "scrape-" + os.urandom(8).hex()
    async with exporter_process(tmp_path, env={"EMBEDDING_JOBS_METRICS_TOKEN": token}) as exporter:

        def run(metrics_token: str) -> subprocess.CompletedProcess[str]:
            env = {
                "PATH": os.environ["PATH"],
                "EMBEDDING_JOBS_TEST_URL": exporter.base,
                "EMBEDDING_JOBS_METRICS_TOKEN": metrics_token,
                "EMBEDDING_JOBS_TEST_WAIT": "0",
            }
            return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)

        passed = run(token)
        assert passed.returncode == 0, shlex.join(command[:2]) + "\n" + passed.stderr
        assert f"ok: {exporter.base}/readyz" in passed.stdout
        refused = run("not-the-token")
        assert refused.returncode == 1
        assert "/metrics answered 401" in refused.stderr


# The worker's liveness probe -------------------------------------------------------------------


def test_worker_probes_check_the_heartbeat_file_the_worker_is_told_to_write(
    layout: tuple[str, list[Manifest]],
) -> None:
    _, manifests = layout
    worker = container(manifests, "worker")
    heartbeat = Settings.load(environ={k: v for k, v in env_of(worker).items() if isinstance(v, str)}).heartbeat_file
    assert heartbeat
    values = yaml.safe_load((CHART / "values.yaml").read_text())["worker"]
    command = ["python", "-m", "worker.heartbeat", "--max-age", str(values["heartbeat"]["maxAgeSeconds"]), heartbeat]
    for kind in ("startupProbe", "livenessProbe"):
        probe = worker[kind]
        assert probe["exec"] == {"command": command}, kind
        assert {key: probe[key] for key in values[kind]} == values[kind], kind
    # On a volume the worker can write despite its read-only root filesystem.
    mounts = [m["mountPath"] for m in worker["volumeMounts"]]
    assert any(Path(heartbeat).is_relative_to(mount) for mount in mounts), (heartbeat, mounts)
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True
    assert "readinessProbe" not in worker


def test_worker_without_a_heartbeat_has_no_probe_and_no_heartbeat_file(helm: Helm) -> None:
    manifests = render(helm, TRIAL, set_values=("worker.heartbeat.enabled=false",))
    worker = container(manifests, "worker")
    assert not {"startupProbe", "livenessProbe"} & worker.keys()
    assert "EMBEDDING_JOBS_HEARTBEAT_FILE" not in env_of(worker)
    assert pod_spec(manifests)["containers"][0]["name"] == "worker"


# Chart metadata --------------------------------------------------------------------------------


def test_chart_metadata_names_home_sources_maintainers_and_the_kubernetes_it_is_tested_on(helm: Helm) -> None:
    shown = helm.run("show", "chart", str(CHART))
    assert shown.returncode == 0, shown.stderr
    chart = yaml.safe_load(shown.stdout)
    assert chart["home"].startswith("https://")
    assert chart["sources"]
    assert all(source.startswith("https://") for source in chart["sources"])
    assert chart["maintainers"]
    assert all(m["name"] and "@" in m["email"] for m in chart["maintainers"])
    assert {"embeddings", "prometheus", "azure"} <= set(chart["keywords"])
    # kubeVersion admits the oldest version the layouts are validated on, and helm enforces it.
    oldest = min(LAYOUTS.values(), key=lambda layout: tuple(int(n) for n in layout[2].split(".")))[2]
    assert chart["kubeVersion"] == f">={oldest}-0"
    older = helm.template(TRIAL, set_values=("exporter.nativeSidecar=false",), kube_version="1.27.0")
    assert older.returncode != 0
    assert "kubeVersion" in older.stderr or "incompatible" in older.stderr
