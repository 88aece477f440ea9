"""The container image's Dockerfile and the Helm chart: lint, render, validate, and check the wiring."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from alerts.build import RULES_FILE, RuleParams, rule_groups
from jobs.settings import ENV_PREFIX, Settings
from tests.components import missing
from tests.helm_tools import INSTALL_HELM, Helm
from tests.helpers.chart import (
    ALL_ON,
    CUSTOM_KINDS,
    LAYOUTS,
    TRIAL,
    Manifest,
    all_on,
    all_on_overrides,
    chart_lacks,
    container,
    containers,
    env_of,
    helm,
    kubernetes_validate,
    layout,
    one,
    pod_spec,
    refusal,
    render,
)
from tools.chart_sync import (
    CHART,
    COPIED,
    README,
    REPO,
    SCHEMA,
    camel,
    copied_sources,
    out_of_sync,
    stale_copies,
)

# Fixtures shared with tests/test_helm_compose.py; named here so pytest finds them in this module.
__all__ = ["all_on", "helm", "kubernetes_validate", "layout"]

DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
PROBE_TIMING = ("periodSeconds", "timeoutSeconds", "failureThreshold")


# The container image ---------------------------------------------------------------------------


def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults, and each stage's (INSTRUCTION, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if not stages:
            if instruction == "ARG" and "=" in rest:
                name, _, default = rest.partition("=")
                args[name.strip()] = default.strip()
            continue
        stages[-1].append((instruction, rest.strip()))
    return args, stages


def test_dockerfile_builds_the_wheel_in_one_stage_and_copies_its_venv_into_a_slim_python_3_11() -> None:
    args, stages = dockerfile_stages()
    assert len(stages) >= 2
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0]) for _, rest in (s[0] for s in stages)]
    assert all(re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base) for base in bases), bases
    build_stage = stages[0][0][1].split()[-1]
    build_runs = " ".join(rest for instruction, rest in stages[0] if instruction == "RUN")
    assert "pip wheel" in build_runs
    assert "[azure]" in build_runs
    copies = [rest for instruction, rest in stages[-1] if instruction == "COPY"]
    assert any(rest.startswith(f"--from={build_stage} /opt/venv") for rest in copies), copies


def test_dockerfile_final_stage_runs_both_commands_as_a_numeric_non_root_user_without_build_tools() -> None:
    _, stages = dockerfile_stages()
    final = stages[-1]
    user = [rest for instruction, rest in final if instruction == "USER"][-1]
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match is not None, f"USER {user} is not numeric, so Kubernetes cannot check runAsNonRoot"
    assert int(match.group(1)) != 0
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(match.group(1)) == values["podSecurityContext"]["runAsUser"]
    runs = " ".join(rest for instruction, rest in final if instruction == "RUN")
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "pip install", "pip wheel"):
        assert tool not in runs, f"the final stage runs {tool}"
    env = " ".join(rest for instruction, rest in final if instruction == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert [json.loads(rest) for instruction, rest in final if instruction == "ENTRYPOINT"] == [["embedding-jobs"]]
    assert [json.loads(rest) for instruction, rest in final if instruction == "CMD"] == [["worker"]]


def test_image_build_context_holds_every_package_the_wheel_needs() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for pattern in patterns for p in REPO.glob(pattern) if (p / "__init__.py").is_file()}
    assert packages, patterns
    _, stages = dockerfile_stages()
    copied = {source for instruction, rest in stages[0] if instruction == "COPY" for source in rest.split()[:-1]}
    allowed = {line.strip().lstrip("!").rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    for name in [*sorted(packages), "pyproject.toml", "README.md"]:
        assert name in copied, f"Dockerfile does not copy {name}"
        assert name in allowed, f".dockerignore keeps {name} out of the build context"


def locked_pins() -> dict[str, tuple[Version, int]]:
    """requirements.lock as normalised name -> (pinned version, number of hashes)."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    pins: dict[str, tuple[Version, int]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split(" --hash=")
        name, _, version = requirement.split(";")[0].strip().partition("==")
        assert version, f"requirements.lock: {requirement} is not pinned with =="
        pins[canonicalize_name(name)] = (Version(version), len(options))
    return pins


def test_lock_pins_every_dependency_of_the_image_and_its_build_backend_with_hashes() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [
        *pyproject["project"]["dependencies"],
        *pyproject["project"]["optional-dependencies"]["azure"],
        *pyproject["build-system"]["requires"],
    ]
    pins = locked_pins()
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), f"{line} vs {pins[name][0]}: make lock"
    assert not [name for name, (_, hashes) in pins.items() if hashes == 0], "every pin needs its hashes"
    assert "make lock" in LOCK.read_text().split("\n", 3)[1], "the lock names the command that refreshes it"


def test_dockerfile_installs_the_locked_dependencies_in_a_layer_before_the_source() -> None:
    _, stages = dockerfile_stages()
    build = stages[0]
    [install] = [i for i, (ins, rest) in enumerate(build) if ins == "RUN" and "-r requirements.lock" in rest]
    assert "--require-hashes" in build[install][1]
    copies = {rest.split()[0]: i for i, (ins, rest) in enumerate(build) if ins == "COPY"}
    assert copies["requirements.lock"] < install
    for source in ("pyproject.toml", "jobs", "worker", "exporter", "embedding_jobs"):
        assert copies[source] > install, f"{source} is copied before the dependencies are installed"
    [wheel] = [rest for ins, rest in build if ins == "RUN" and "pip wheel" in rest]
    # The locked backend builds the wheel, and the wheel's own dependencies come from the lock only.
    assert "--no-build-isolation" in wheel
    assert wheel.count("--no-deps") == 2
    assert "pip check" in wheel
    assert "!requirements.lock" in (REPO / ".dockerignore").read_text().splitlines()


def test_image_labels_carry_the_package_version_and_the_chart_s_source() -> None:
    _, stages = dockerfile_stages()
    final = stages[-1]
    args = dict(rest.split("=", 1) for ins, rest in final if ins == "ARG" and "=" in rest)
    labels = dict(token.split("=", 1) for ins, rest in final if ins == "LABEL" for token in shlex.split(rest))
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == version, "the Dockerfile's VERSION default must follow pyproject.toml"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert labels["org.opencontainers.image.source"] == chart["sources"][0]
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"


# Obtaining the tools ---------------------------------------------------------------------------


def test_install_helm_does_nothing_when_helm_is_present(helm: Helm) -> None:
    result = subprocess.run([str(INSTALL_HELM)], capture_output=True, text=True, timeout=20, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.fixture(scope="module")
def all_on_values() -> dict[str, Any]:
    """ci/all-on-values.yaml merged over values.yaml (only the keys the tests read)."""
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    for key, value in yaml.safe_load(ALL_ON.read_text()).items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return values


def settings_map(manifests: list[Manifest]) -> dict[str, Any]:
    """The ConfigMap the worker loads its settings from."""
    (source,) = container(manifests, "worker")["envFrom"]
    (found,) = [
        m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"] == source["configMapRef"]["name"]
    ]
    return found


def plain_env(c: dict[str, Any]) -> dict[str, str]:
    """A container's env variables that have a literal value (not from a Secret)."""
    return {name: value for name, value in env_of(c).items() if isinstance(value, str)}


def port_of(c: dict[str, Any], name: str) -> int | None:
    """The container port called name, or None when the container has none of that name."""
    ports = [p["containerPort"] for p in c.get("ports", []) if p["name"] == name]
    assert len(ports) <= 1
    return ports[0] if ports else None


# Lint and Kubernetes schemas -------------------------------------------------------------------


@pytest.mark.parametrize("values", [TRIAL, ALL_ON], ids=["trial", "all-on"])
def test_chart_passes_strict_lint(helm: Helm, values: Path) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", "1.30.0", "--values", str(values)]
    if values == ALL_ON:
        for override in all_on_overrides():
            args += ["--set", override]
    result = helm.run(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_objects_pass_kubernetes_schemas_strictly(
    layout: tuple[str, list[Manifest]], kubernetes_validate: str, tmp_path: Path
) -> None:
    name, manifests = layout
    built_in = [m for m in manifests if m["kind"] not in CUSTOM_KINDS]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(built_in))
    kube = LAYOUTS[name][2]
    result = subprocess.run(
        [kubernetes_validate, "--strict", "--quiet", "-k", kube, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert {m["kind"] for m in built_in} >= {"Deployment", "ConfigMap", "Service", "ServiceAccount"}


def test_custom_resources_are_well_formed(all_on: list[Manifest], all_on_values: dict[str, Any]) -> None:
    deployment, service = one(all_on, "Deployment"), one(all_on, "Service")
    monitor = one(all_on, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "authorization"}
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {k: all_on_values["secrets"]["metricsToken"][k] for k in ("name", "key")},
    }
    scaled = one(all_on, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert set(scaled["spec"]) <= {
        "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod", "triggers"
    }  # fmt: skip
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]
    }  # fmt: skip
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "azure-servicebus"
    # KEDA's trigger metadata is a map of strings: a number there is refused by its CRD.
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger["metadata"]
    auth = one(all_on, "TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["spec"] == {
        "podIdentity": {
            "provider": "azure-workload",
            "identityId": all_on_values["azure"]["workloadIdentity"]["clientId"],
        }
    }
    if chart_lacks("alerts"):
        return
    for group in one(all_on, "PrometheusRule")["spec"]["groups"]:
        assert group["name"]
        assert group["rules"]
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            assert isinstance(rule["expr"], str | int | float), rule


# Wiring of the pod -----------------------------------------------------------------------------


def test_exporter_runs_as_native_sidecar_and_receives_the_worker_spans(layout: tuple[str, list[Manifest]]) -> None:
    name, manifests = layout
    spec = pod_spec(manifests)
    exporter, worker = container(manifests, "exporter"), container(manifests, "worker")
    if name == "plain-sidecar":
        assert "initContainers" not in spec
        assert [c["name"] for c in spec["containers"]] == ["worker", "exporter"]
        assert "restartPolicy" not in exporter
    else:
        assert [c["name"] for c in spec["initContainers"]] == ["exporter"]
        assert exporter["restartPolicy"] == "Always"
        assert [c["name"] for c in spec["containers"]] == ["worker"]
    assert (exporter["args"], worker["args"]) == (["exporter"], ["worker"])
    assert exporter["image"] == worker["image"]
    config = settings_map(manifests)
    # Each container's settings as the application reads them: the ConfigMap, then its own env.
    worker_settings = Settings.load(environ={**config["data"], **env_of(worker)})
    exporter_settings = Settings.load(environ={**config["data"], **plain_env(exporter)})
    assert worker_settings.otlp_endpoint == f"http://127.0.0.1:{exporter_settings.otlp_port}"
    assert exporter_settings.exporter_host == "0.0.0.0"
    assert exporter_settings.otlp_port != exporter_settings.exporter_port
    assert port_of(exporter, "http") == exporter_settings.exporter_port
    for c in (exporter, worker):
        assert c["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]


def test_plain_sidecar_outlives_the_worker_drain(helm: Helm) -> None:
    manifests = render(
        helm, TRIAL, set_values=("exporter.nativeSidecar=false", "worker.drainTimeoutSeconds=40"), kube="1.28.0"
    )
    exporter = container(manifests, "exporter")
    assert exporter["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "40"]
    assert pod_spec(manifests)["terminationGracePeriodSeconds"] > 40


def test_native_sidecar_is_refused_before_kubernetes_1_29(helm: Helm) -> None:
    assert "exporter.nativeSidecar=false" in refusal(helm, TRIAL, kube="1.28.0")


def test_probes_service_servicemonitor_and_network_policy_use_the_exporter_port(all_on: list[Manifest]) -> None:
    exporter = container(all_on, "exporter")
    [port] = [p for p in exporter["ports"] if p["name"] == "http"]
    assert port["containerPort"] == 9464
    probes = {kind: exporter[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: (p["path"], p["port"]) for kind, p in probes.items()} == {
        "startupProbe": ("/healthz", port["name"]),
        "livenessProbe": ("/healthz", port["name"]),
        "readinessProbe": ("/readyz", port["name"]),
    }
    # The worker has no port: its probes run a command (see the heartbeat tests below).
    assert {"exec"} == container(all_on, "worker")["livenessProbe"].keys() - set(PROBE_TIMING)
    service = one(all_on, "Service")
    [service_port] = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert service_port["targetPort"] == port["name"]
    pod_labels = one(all_on, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (endpoint,) = one(all_on, "ServiceMonitor")["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (service_port["name"], "/metrics")
    (ingress,) = one(all_on, "NetworkPolicy")["spec"]["ingress"]
    assert {"port": port["name"], "protocol": "TCP"} in ingress["ports"]


def test_every_container_is_locked_down(layout: tuple[str, list[Manifest]]) -> None:
    _, manifests = layout
    spec = pod_spec(manifests)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    tmp_volumes = {v["name"] for v in spec["volumes"] if v["name"] == "tmp" and "emptyDir" in v}
    assert tmp_volumes == {"tmp"}
    for c in containers(manifests):
        context = c["securityContext"]
        assert context["runAsNonRoot"] is True, c["name"]
        assert isinstance(context["runAsUser"], int), c["name"]
        assert context["runAsUser"] > 0, c["name"]
        assert context["readOnlyRootFilesystem"] is True, c["name"]
        assert context["allowPrivilegeEscalation"] is False, c["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], c["name"]
        assert c["resources"]["requests"], c["name"]


@pytest.mark.parametrize("drain", [0, 25, 600])
def test_grace_period_is_the_drain_timeout_plus_a_margin(helm: Helm, drain: int) -> None:
    manifests = render(helm, TRIAL, set_values=(f"worker.drainTimeoutSeconds={drain}",))
    grace = pod_spec(manifests)["terminationGracePeriodSeconds"]
    assert grace > drain
    assert grace == drain + yaml.safe_load((CHART / "values.yaml").read_text())["worker"]["terminationMarginSeconds"]
    assert settings_map(manifests)["data"]["EMBEDDING_JOBS_DRAIN_TIMEOUT"] == str(drain)


def test_all_on_config_map_reads_back_as_the_configured_settings(all_on: list[Manifest]) -> None:
    data = settings_map(all_on)["data"]
    assert all(name.startswith(ENV_PREFIX) for name in data)
    settings = Settings.load(environ=data)
    assert (settings.store, settings.queue, settings.embedder) == ("cosmos", "servicebus", "openai")
    # Large and fractional numbers survive Helm's float64 values as the application parses them.
    assert (settings.tracking_buffer, settings.backoff_max, settings.retention_hours) == (1_000_000, 120.5, 720.0)
    assert (settings.exporter_port, settings.drain_timeout) == (9464, 60.0)


def changed(prop: dict[str, Any]) -> Any:
    """A valid value other than the application's default for a `config` schema property."""
    default = prop["default"]
    if "enum" in prop:
        return next(choice for choice in prop["enum"] if choice != default)
    if prop["type"] == "integer":
        return default + 1
    if prop["type"] == "number":
        return default + 0.5
    return f"{default}-changed"


def test_every_config_key_reaches_the_application_as_its_setting(helm: Helm, tmp_path: Path) -> None:
    properties = json.loads(SCHEMA.read_text())["properties"]["config"]["properties"]
    config = {key: changed(prop) for key, prop in properties.items()}
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"config": config, "api": {"allowAnonymous": True}}))
    data = settings_map(render(helm, values))["data"]
    settings = Settings.load(environ=data)
    for f in fields(Settings):
        if camel(f.name) in config:
            assert getattr(settings, f.name) == config[camel(f.name)], f.name
            assert ENV_PREFIX + f.name.upper() in data, f.name


def test_secrets_reach_only_the_containers_that_use_them(
    all_on: list[Manifest], all_on_values: dict[str, Any], helm: Helm
) -> None:
    secret_fields = {f.name for f in fields(Settings) if f.metadata["secret"]}
    wanted = {
        "worker": {"cosmos_key", "servicebus_connection_string", "openai_api_key", "otlp_token"},
        "exporter": {"cosmos_key", "servicebus_connection_string", "api_tokens", "metrics_token", "otlp_token"},
    }
    secrets = all_on_values["secrets"]
    assert set(secrets) == {camel(name) for name in secret_fields}, "a secret setting the chart cannot pass"
    for name, expected in wanted.items():
        from_secrets = {
            env.removeprefix(ENV_PREFIX).lower(): source["secretKeyRef"]
            for env, source in env_of(container(all_on, name)).items()
            if isinstance(source, dict)
        }
        assert set(from_secrets) == expected, name
        for field_name, ref in from_secrets.items():
            assert ref == {"name": secrets[camel(field_name)]["name"], "key": secrets[camel(field_name)]["key"]}
    assert not any(isinstance(v, dict) for c in containers(render(helm, TRIAL)) for v in env_of(c).values())


def test_workload_identity_labels_the_pods_and_annotates_the_service_account(
    all_on: list[Manifest], all_on_values: dict[str, Any], helm: Helm
) -> None:
    identity = all_on_values["azure"]["workloadIdentity"]
    pod = one(all_on, "Deployment")["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    account = one(all_on, "ServiceAccount")
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["azure.workload.identity/client-id"] == identity["clientId"]
    assert account["metadata"]["annotations"]["azure.workload.identity/tenant-id"] == identity["tenantId"]
    default = render(helm, TRIAL)
    assert "azure.workload.identity/use" not in one(default, "Deployment")["spec"]["template"]["metadata"]["labels"]


def test_keda_owns_the_replica_count_and_scales_on_the_configured_queue(
    all_on: list[Manifest], all_on_values: dict[str, Any], helm: Helm, tmp_path: Path
) -> None:
    assert "replicas" not in one(all_on, "Deployment")["spec"]
    metadata = one(all_on, "ScaledObject")["spec"]["triggers"][0]["metadata"]
    config = all_on_values["config"]
    assert metadata["queueName"] == config["queueName"]
    assert metadata["namespace"] == config["servicebusNamespace"].split(".")[0]
    assert "cloud" not in metadata
    values = yaml.safe_load(ALL_ON.read_text())
    del values["config"]["queueName"]
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    without_name = render(helm, tmp_path / "values.yaml", set_values=tuple(all_on_overrides()))
    assert one(without_name, "ScaledObject")["spec"]["triggers"][0]["metadata"]["queueName"] == Settings().queue_name
    default = render(helm, TRIAL)
    assert one(default, "Deployment")["spec"]["replicas"] == 1
    assert not [m for m in default if m["kind"] in CUSTOM_KINDS]


# Safe defaults: the API, the OTLP receiver, the data volume -------------------------------------

OPEN_API = "the REST API would answer anyone who reaches the pod"


@pytest.mark.parametrize(
    "overrides",
    [(), ("api.allowAnonymous=false",), ("exporter.listenHost=::",), ("exporter.listenHost=10.0.0.7",)],
    ids=["defaults", "explicit-false", "ipv6-any", "pod-address"],
)
def test_an_exposed_api_without_a_token_secret_is_refused(helm: Helm, overrides: tuple[str, ...]) -> None:
    message = refusal(helm, set_values=overrides)
    assert OPEN_API in message
    assert "secrets.apiTokens.name" in message
    assert "api.allowAnonymous=true" in message


@pytest.mark.parametrize(
    "overrides",
    [
        ("api.allowAnonymous=true",),
        ("secrets.apiTokens.name=embedding-jobs-api",),
        ("exporter.listenHost=127.0.0.1",),
        ("exporter.listenHost=localhost",),
    ],
    ids=["anonymous-on-purpose", "token-secret", "loopback", "localhost"],
)
def test_an_api_renders_with_a_token_secret_an_explicit_opt_in_or_on_loopback(
    helm: Helm, overrides: tuple[str, ...]
) -> None:
    manifests = render(helm, set_values=overrides)
    tokens = env_of(container(manifests, "exporter")).get("EMBEDDING_JOBS_API_TOKENS")
    if "secrets.apiTokens.name=embedding-jobs-api" in overrides:
        assert tokens == {"secretKeyRef": {"name": "embedding-jobs-api", "key": "api-tokens"}}
    else:
        assert tokens is None


def test_worker_sends_spans_to_a_receiver_only_the_pod_can_reach(helm: Helm) -> None:
    manifests = render(helm, TRIAL, set_values=("exporter.otlp.port=4400",))
    worker, exporter = container(manifests, "worker"), container(manifests, "exporter")
    data = settings_map(manifests)["data"]
    assert env_of(worker)["EMBEDDING_JOBS_OTLP_ENDPOINT"] == "http://127.0.0.1:4400"
    receiver = Settings.load(environ={**data, **plain_env(exporter)})
    assert (receiver.otlp_host, receiver.otlp_port, receiver.otlp_token) == ("127.0.0.1", 4400, "")
    # Nothing outside the pod gets a way in: no container port, no Service port, no policy port.
    assert port_of(exporter, "otlp") is None
    assert [p["containerPort"] for p in exporter["ports"]] == [receiver.exporter_port]
    assert [p["name"] for p in one(manifests, "Service")["spec"]["ports"]] == ["http"]
    policy = render(helm, TRIAL, set_values=("networkPolicy.enabled=true",))
    (ingress,) = one(policy, "NetworkPolicy")["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_an_exposed_receiver_gets_ports_and_the_token_on_both_sides(
    all_on: list[Manifest], all_on_values: dict[str, Any]
) -> None:
    worker, exporter = container(all_on, "worker"), container(all_on, "exporter")
    data = settings_map(all_on)["data"]
    receiver = Settings.load(environ={**data, **plain_env(exporter)})
    assert receiver.otlp_host == all_on_values["exporter"]["listenHost"] == "0.0.0.0"
    assert port_of(exporter, "otlp") == receiver.otlp_port == 4319
    assert env_of(worker)["EMBEDDING_JOBS_OTLP_ENDPOINT"] == "http://127.0.0.1:4319"
    token = {"secretKeyRef": {k: all_on_values["secrets"]["otlpToken"][k] for k in ("name", "key")}}
    assert env_of(exporter)["EMBEDDING_JOBS_OTLP_TOKEN"] == token
    assert env_of(worker)["EMBEDDING_JOBS_OTLP_TOKEN"] == token
    service_ports = {p["name"]: p for p in one(all_on, "Service")["spec"]["ports"]}
    assert service_ports["otlp"] == {"name": "otlp", "port": 4319, "targetPort": "otlp", "protocol": "TCP"}
    (ingress,) = one(all_on, "NetworkPolicy")["spec"]["ingress"]
    assert {"port": "otlp", "protocol": "TCP"} in ingress["ports"]
    # The ServiceMonitor scrapes the metrics port only.
    (endpoint,) = one(all_on, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "http"


def test_the_worker_always_mounts_the_data_volume(layout: tuple[str, list[Manifest]]) -> None:
    name, manifests = layout
    spec = pod_spec(manifests)
    data_dir = settings_map(manifests)["data"]["EMBEDDING_JOBS_DATA_DIR"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "data"]
    assert volume == {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}
    assert {"name": "data", "mountPath": data_dir} in container(manifests, "worker")["volumeMounts"]
    exporter_mounts = container(manifests, "exporter")["volumeMounts"]
    # The exporter needs the volume only for the SQLite store it reads.
    local = name == "default"
    assert ({"name": "data", "mountPath": data_dir} in exporter_mounts) is local


def test_the_data_volume_size_is_configurable(helm: Helm) -> None:
    manifests = render(helm, ALL_ON, set_values=("dataVolume.sizeLimit=5Gi", *all_on_overrides()))
    (volume,) = [v for v in pod_spec(manifests)["volumes"] if v["name"] == "data"]
    assert volume["emptyDir"] == {"sizeLimit": "5Gi"}


# Schema and chart-level checks -----------------------------------------------------------------

REFUSED_BY_SCHEMA = {
    "wrong type": {"replicaCount": "three"},
    "unknown key": {"replicas": 2},
    "unknown nested key": {"exporter": {"prot": 8080}},
    "setting the chart owns": {"config": {"drainTimeout": 30}},
    "receiver address outside exporter.otlp": {"config": {"otlpHost": "0.0.0.0"}},
    "receiver opt-in that is not a boolean": {"exporter": {"otlp": {"expose": "yes"}}},
    "unknown setting": {"config": {"colour": "blue"}},
    "setting outside its choices": {"config": {"store": "postgres"}},
    "zero evictions": {"podDisruptionBudget": {"maxUnavailable": 0}},
    "secret without key": {"secrets": {"apiTokens": {"name": "api", "key": ""}}},
}


@pytest.mark.parametrize("values", list(REFUSED_BY_SCHEMA.values()), ids=list(REFUSED_BY_SCHEMA))
def test_values_breaking_the_schema_are_refused(helm: Helm, tmp_path: Path, values: dict[str, Any]) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    assert "schema" in refusal(helm, path)
    lint = helm.run("lint", "--strict", str(CHART), "--values", str(path))
    assert lint.returncode != 0
    assert "schema" in lint.stdout + lint.stderr


REFUSED_BY_TEMPLATES = {
    "local store with replicas": (("replicaCount=2",), "SQLite store"),
    "local queue with keda": (
        ("config.store=cosmos", "config.cosmosEndpoint=https://a", "keda.enabled=true"),
        "SQLite",
    ),
    "cosmos without endpoint": (("config.store=cosmos",), "cosmosEndpoint"),
    "servicebus without credentials": (("config.queue=servicebus",), "servicebusNamespace"),
    "openai without endpoint": (("config.embedder=openai",), "openaiEndpoint"),
    "workload identity without client id": (("azure.workloadIdentity.enabled=true",), "clientId"),
    "exposed receiver without a token": (("exporter.otlp.expose=true",), "needs secrets.otlpToken"),
    "receiver on the API port": (("exporter.otlp.port=8080",), "needs a port of its own"),
}


@pytest.mark.parametrize(("overrides", "message"), list(REFUSED_BY_TEMPLATES.values()), ids=list(REFUSED_BY_TEMPLATES))
def test_combinations_that_would_crash_the_pod_are_refused(
    helm: Helm, overrides: tuple[str, ...], message: str
) -> None:
    assert message in refusal(helm, TRIAL, set_values=overrides)


# Files generated from the repository -----------------------------------------------------------


@pytest.mark.parametrize("folder", list(COPIED))
def test_chart_copies_are_byte_identical_to_the_repository_files(folder: str) -> None:
    pairs = {copy: source for copy, source in copied_sources().items() if source.parent.name == folder}
    stale = [path for path in stale_copies() if path.parent.name == folder]
    assert not stale, f"copies whose source is gone: {stale} (run: python -m tools.chart_sync sync)"
    if not pairs:
        pytest.skip(f"{folder}/ has no {COPIED[folder]} yet")
    for copy, source in pairs.items():
        assert copy.is_file(), f"{copy.relative_to(REPO)} missing (run: python -m tools.chart_sync sync)"
        assert copy.read_bytes() == source.read_bytes(), (
            f"{copy.relative_to(REPO)} differs from {source.relative_to(REPO)} (run: python -m tools.chart_sync sync)"
        )


def test_schema_config_and_readme_table_are_generated_from_current_sources() -> None:
    stale = [path for path in out_of_sync() if path in (str(SCHEMA.relative_to(REPO)), str(README.relative_to(REPO)))]
    assert not stale, f"out of date: {stale} (run: python -m tools.chart_sync sync)"


def test_prometheus_rule_holds_the_repository_alert_rules(
    all_on: list[Manifest], all_on_values: dict[str, Any]
) -> None:
    if chart_lacks("alerts"):
        pytest.skip("alerts/ has no rules for the chart yet")
    rendered = one(all_on, "PrometheusRule")["spec"]["groups"]
    # The rules select their scrape target by the job the ServiceMonitor gives the series.
    (endpoint,) = one(all_on, "ServiceMonitor")["spec"]["endpoints"]
    relabel = {(r["action"], r["targetLabel"]): r["replacement"] for r in endpoint["relabelings"]}
    params = RuleParams(
        selector=f'job="{relabel[("replace", "job")]}"',
        deployment_selector='namespace="jobs", deployment="ej-embedding-jobs"',
    )
    assert rendered == rule_groups(params)["groups"]


def test_prometheus_rule_with_default_values_equals_the_committed_rules(helm: Helm) -> None:
    if chart_lacks("alerts"):
        pytest.skip("alerts/ has no rules for the chart yet")
    manifests = render(helm, TRIAL, set_values=("prometheusRule.enabled=true", "fullnameOverride=embedding-jobs"))
    rendered = one(manifests, "PrometheusRule")["spec"]["groups"]
    # The one value the chart derives from the release: the Deployment's namespace and name.
    committed = RULES_FILE.read_text().replace(
        'deployment="embedding-jobs"', 'namespace="jobs", deployment="embedding-jobs"'
    )
    assert rendered == yaml.safe_load(committed)["groups"]


def test_prometheus_rule_takes_selector_grouping_and_links_from_values(helm: Helm, tmp_path: Path) -> None:
    if chart_lacks("alerts"):
        pytest.skip("alerts/ has no rules for the chart yet")
    selector = "job=~\"jobs/.*\", env!='dev'"
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "prometheusRule": {
                    "enabled": True,
                    "selector": selector,
                    "groupBy": ["cluster", "env"],
                    "runbookUrl": "https://runbooks.example.com/embedding-jobs.md",
                    "grafanaUrl": "https://grafana.example.com/",
                }
            }
        )
    )
    manifests = render(helm, TRIAL, values)
    groups = one(manifests, "PrometheusRule")["spec"]["groups"]
    params = RuleParams(
        selector=selector,
        group_by=("cluster", "env"),
        deployment_selector='namespace="jobs", deployment="ej-embedding-jobs"',
        runbook_url="https://runbooks.example.com/embedding-jobs.md",
        grafana_url="https://grafana.example.com/",
    )
    assert groups == rule_groups(params)["groups"]
    promtool = shutil.which("promtool")
    if promtool is None:
        missing("promtool not installed (apt-get install prometheus)")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_config_maps_hold_the_repository_dashboards(all_on: list[Manifest]) -> None:
    sources = sorted(source for source in copied_sources().values() if source.parent.name == "dashboards")
    if not sources:
        pytest.skip("dashboards/ has no *.json yet")
    maps = {
        key: (m["metadata"], text)
        for m in all_on
        if m["kind"] == "ConfigMap" and m["metadata"]["labels"].get("grafana_dashboard") == "1"
        for key, text in m["data"].items()
    }
    assert set(maps) == {source.name for source in sources}
    for source in sources:
        metadata, text = maps[source.name]
        assert text == source.read_text(), source.name
        assert len(text.encode()) < 1024 * 1024, f"{source.name} is over the ConfigMap size limit"
        assert metadata["namespace"] == "monitoring"
        json.loads(text)
