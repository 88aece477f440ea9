"""The Helm chart rendered and played as a real pod with `podman kube play`: worker and exporter side by side.

The chart is rendered in plain-container mode (podman 4.3 predates native sidecars, which the rendering
tests cover) with an API token Secret, and its ConfigMap and Deployment are played as they are, with one
change: the data volume is a host folder instead of an emptyDir, so the SQLite store and queue outlive
`podman kube down` and the drain can be checked afterwards, and the pod can be played again on them.
The embedder is the OpenAI-compatible one, pointed at an endpoint inside the pod that takes a second per
request, so that jobs are still in flight when the pod is stopped.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from jobs.model import JobStatus
from jobs.sqlite_store import SQLiteJobStore
from tests.components import free_port, missing, wait_for
from tests.helm_tools import HELM, Helm
from tests.podman_tools import Podman
from tools.chart_sync import CHART
from worker.local_queue import LocalQueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
UID = 10001
EMBEDDINGS_PORT = 18400
DRAIN_SECONDS = 20
# The embeddings endpoint: a stand-in for Azure OpenAI with its latency, run inside the worker's container
# so that it lives as long as the worker does, through the drain.
EMBEDDINGS_SERVER = """
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Embeddings(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(1.0)  # the service's latency
        data = [{"index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(body["input"]))]
        reply = json.dumps({"data": data, "model": body["model"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Embeddings).serve_forever()
"""
# An HTTP request from inside the pod: prints {"status", "body"} whatever the status.
HTTP_GET = """
import json, sys, urllib.error, urllib.request
headers = {"Authorization": "Bearer " + sys.argv[2]} if len(sys.argv) > 2 else {}
try:
    with urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers), timeout=5) as reply:
        status, body = reply.status, reply.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
print(json.dumps({"status": status, "body": body.decode()}))
"""


@dataclass(frozen=True)
class Pod:
    """A played pod: its manifest file, container names, API token and data folder on the host."""

    podman: Podman
    manifest: Path
    name: str
    token: str
    port: int
    data: Path
    grace_seconds: int
    deployment: Mapping[str, Any]
    figures: list[str] = field(default_factory=list)

    def container(self, name: str) -> str:
        """The podman name of one of the Deployment's containers."""
        return f"{self.name}-{name}"

    def exec(self, container: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in a container of the pod; the result whatever the exit code."""
        interactive = ["--interactive"] if stdin is not None else []
        return self.podman.run("exec", *interactive, self.container(container), *args, input=stdin, check=False)

    def get(self, path: str, token: str | None = None) -> tuple[int, str]:
        """GET path from the exporter over the pod's loopback (from its own container: it outlives the worker)."""
        url = f"http://127.0.0.1:{self.port}{path}"
        result = self.exec("exporter", "python", "-c", HTTP_GET, url, *([token] if token else []))
        assert result.returncode == 0, result.stderr
        reply = json.loads(result.stdout)
        return int(reply["status"]), str(reply["body"])

    def stats(self) -> dict[str, dict[str, int]]:
        """`embedding-jobs jobs stats` in the exporter's container (it mounts the store): counts by tenant."""
        result = self.exec("exporter", "embedding-jobs", "jobs", "stats", "--output", "json")
        assert result.returncode == 0, result.stderr
        stats: dict[str, dict[str, int]] = json.loads(result.stdout)
        return stats

    def ingest(self, tenant: str, count: int) -> None:
        """Ingest count new shards of tenant with `embedding-jobs ingest -` in the worker container."""
        lines = [
            json.dumps({"tenantId": tenant, "shardId": f"{tenant}-{i}", "text": f"shard {i} of {tenant}, to embed"})
            for i in range(count)
        ]
        result = self.exec("worker", "embedding-jobs", "ingest", "-", stdin="\n".join(lines) + "\n")
        assert result.returncode == 0, result.stderr
        assert f"{count} jobs enqueued" in result.stderr + result.stdout

    def play(self) -> None:
        """`podman kube play` the manifest, then wait for /readyz and the embeddings endpoint."""
        self.podman.run("kube", "play", str(self.manifest))
        wait_for(self._ready, timeout=60, what="the exporter's /readyz inside the pod", interval=0.5)
        started = self.podman.run(
            "exec", "--detach", self.container("worker"), "python", "-c", EMBEDDINGS_SERVER, str(EMBEDDINGS_PORT)
        )
        assert started.returncode == 0
        probe = f"import socket; socket.create_connection(('127.0.0.1', {EMBEDDINGS_PORT}), timeout=1)"
        wait_for(
            lambda: self.exec("worker", "python", "-c", probe).returncode == 0,
            timeout=30,
            what="the embeddings endpoint inside the pod",
            interval=0.3,
        )

    def _ready(self) -> bool:
        result = self.exec("exporter", "python", "-c", HTTP_GET, f"http://127.0.0.1:{self.port}/readyz")
        return result.returncode == 0 and json.loads(result.stdout)["status"] == 200

    def stop_worker(self) -> float:
        """SIGTERM to the worker, then up to the grace period, as the kubelet does; the seconds it took."""
        started = time.monotonic()
        container = self.container("worker")
        self.podman.run("stop", "--time", str(self.grace_seconds), container, timeout=self.grace_seconds + 60)
        return time.monotonic() - started

    def down(self) -> None:
        """`podman kube down`: stop (in podman 4.3 without waiting) and remove the pod."""
        self.podman.run("kube", "down", str(self.manifest), timeout=self.grace_seconds + 60)


def render(helm: Helm, *, image: str, fullname: str, secret: str, port: int) -> list[dict[str, Any]]:
    """The chart's ConfigMap and Deployment as the pod test plays them (the README's `helm template`)."""
    repository, _, tag = image.rpartition(":")
    settings = {
        "fullnameOverride": fullname,
        "image.repository": repository,
        "image.tag": tag,
        "image.pullPolicy": "Never",
        "exporter.nativeSidecar": "false",
        "exporter.port": str(port),
        "secrets.apiTokens.name": secret,
        "worker.drainTimeoutSeconds": str(DRAIN_SECONDS),
        "config.embedder": "openai",
        "config.openaiEndpoint": f"http://127.0.0.1:{EMBEDDINGS_PORT}/",
        "config.concurrency": "4",
        # A killed worker's messages come back after their lock: short, so the test need not wait long.
        "config.lockDuration": "5",
        # A replayed worker may take jobs before the endpoint is back: enough attempts to outlast that.
        "config.maxAttempts": "8",
    }
    args = ["template", "ej", str(CHART), "--show-only", "templates/configmap.yaml"]
    args += ["--show-only", "templates/deployment.yaml"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    rendered = helm.run(*args)
    assert rendered.returncode == 0, rendered.stderr
    documents = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert [doc["kind"] for doc in documents] == ["ConfigMap", "Deployment"]
    return documents


@pytest.fixture(scope="module")
def pod(podman: Podman, image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """The chart played as a pod, with its token Secret; taken down and removed afterwards."""
    if not os.access(HELM, os.X_OK):
        missing(f"helm not at {HELM} (scripts/install-helm installs it)")
    folder = tmp_path_factory.mktemp("pod")
    fullname = f"ej-{uuid.uuid4().hex[:8]}"
    secret = f"{fullname}-api-tokens"
    token = uuid.uuid4().hex
    port = free_port()  # podman 4.3 publishes container ports on the host: one of this run's own
    documents = render(Helm(HELM, folder / "helm-home"), image=image, fullname=fullname, secret=secret, port=port)
    deployment = next(doc for doc in documents if doc["kind"] == "Deployment")
    data = folder / "data"
    data.mkdir()
    os.chown(data, UID, UID)
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    [data_volume] = [volume for volume in volumes if volume["name"] == "data"]
    assert "emptyDir" in data_volume
    data_volume.clear()
    data_volume.update({"name": "data", "hostPath": {"path": str(data), "type": "Directory"}})
    manifest = folder / "pod.yaml"
    manifest.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    # The token Secret, in the form podman 4.3 reads a secretKeyRef from: a JSON map of base64 values
    # (its kube play stores a Secret document as YAML that its own secretKeyRef lookup cannot parse).
    entry = base64.b64encode(f"{token}=*".encode()).decode()
    podman.run("secret", "create", secret, "-", input=json.dumps({"api-tokens": entry}))
    grace = int(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    played = Pod(podman, manifest, f"{fullname}-pod-0", token, port, data, grace, deployment)
    try:
        started = time.monotonic()
        played.play()
        played.figures.append(f"pod played and ready in {time.monotonic() - started:.1f}s")
        yield played
    finally:
        podman.run("kube", "down", str(manifest), check=False, timeout=grace + 60)
        podman.run("secret", "rm", secret, check=False)


def test_pod_runs_both_containers_as_uid_10001_on_read_only_roots_and_the_chart_s_probes_pass(
    pod: Pod, request: pytest.FixtureRequest
) -> None:
    request.node.user_properties.extend(("figure", figure) for figure in pod.figures)
    containers = {c["name"]: c for c in pod.deployment["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"worker", "exporter"}
    for name in containers:
        assert pod.exec(name, "id", "-u").stdout.strip() == str(UID)
        written = pod.exec(name, "touch", "/opt/venv/written")
        assert written.returncode != 0
        assert "Read-only file system" in written.stderr
    # podman runs no probes without systemd; run the rendered ones the way the kubelet would.
    for probe in ("startupProbe", "livenessProbe"):
        command = containers["worker"][probe]["exec"]["command"]
        result = pod.exec("worker", *command)
        assert result.returncode == 0, f"worker {probe} {command}: {result.stderr}"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = containers["exporter"][probe]["httpGet"]["path"]
        status, body = pod.get(path)
        assert status == 200, f"exporter {probe} {path}: {status} {body}"
    assert json.loads(pod.get("/readyz")[1]) == {"status": "ready"}


def test_api_answers_with_the_token_from_the_secret_and_refuses_without_it(pod: Pod) -> None:
    path = "/api/v1/embedding-jobs/stats?tenantId=acme"
    status, body = pod.get(path, pod.token)
    assert status == 200, body
    assert "stats" in json.loads(body)
    assert pod.get(path)[0] == 401
    assert pod.get(path, uuid.uuid4().hex)[0] == 401


def attempts(metrics: str) -> dict[tuple[str, str], float]:
    """embedding_job_attempts_total by (tenant, outcome) from a /metrics exposition."""
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "embedding_job_attempts_total":
                found[(sample.labels["tenant"], sample.labels["outcome"])] = sample.value
    return found


def test_worker_spans_reach_the_sidecar_over_otlp(pod: Pod) -> None:
    pod.ingest("acme", 8)
    pod.ingest("globex", 5)
    wanted = {"acme": 8, "globex": 5}
    wait_for(
        lambda: {t: pod.stats().get(t, {}).get("completed", 0) for t in wanted} == wanted,
        timeout=60,
        what="13 jobs completed",
        interval=0.5,
    )

    def counted() -> dict[tuple[str, str], float]:
        status, body = pod.get("/metrics")
        assert status == 200, body
        return {key: value for key, value in attempts(body).items() if key[0] in wanted and value}

    expected = {(tenant, "completed"): float(count) for tenant, count in wanted.items()}
    wait_for(lambda: counted() == expected, timeout=30, what=f"attempts in /metrics to be {expected}", interval=0.5)


def under_way(pod: Pod, tenant: str, completed: int) -> dict[str, int]:
    """Wait until more than `completed` jobs of tenant are done and some are still to do; their counts."""
    wait_for(
        lambda: pod.stats().get(tenant, {}).get("completed", 0) >= completed + 4,
        timeout=60,
        what=f"the worker to be under way on {tenant}",
        interval=0.2,
    )
    return pod.stats()[tenant]


def test_sigterm_drains_in_flight_jobs_and_no_stop_loses_a_job(pod: Pod, request: pytest.FixtureRequest) -> None:
    total = 40
    pod.ingest("drain", total)
    before = under_way(pod, "drain", 0)
    assert before["processing"] > 0, f"no job in flight to drain: {before}"
    # Kubernetes' stop: SIGTERM, then up to the grace period, with the exporter kept running by its preStop
    # hook until the worker has drained. podman 4.3 runs no preStop hook and its `kube down` kills at once
    # (a zero stop timeout), so the worker is stopped on its own first, the way the kubelet would stop it.
    seconds = pod.stop_worker()
    request.node.user_properties.append(("figure", f"worker stopped (SIGTERM, drain, span flush) in {seconds:.1f}s"))
    assert seconds < pod.grace_seconds, f"the worker took {seconds:.1f}s to stop"
    worker = pod.podman.inspect("container", pod.container("worker"))["State"]
    assert worker["ExitCode"] == 0, worker
    counts = pod.stats()["drain"]
    # The jobs in flight at SIGTERM finished: none is left processing, and more completed than before.
    assert counts["processing"] == 0, counts
    assert before["completed"] < counts["completed"] < total, (before, counts)
    # Their spans reached the sidecar before the worker exited.
    status, metrics = pod.get("/metrics")
    assert status == 200, metrics
    assert attempts(metrics).get(("drain", "completed")) == counts["completed"]
    pod.down()
    drained = asyncio.run(read_store(pod.data))
    assert drained.stats["drain"] == counts
    # Nothing lost: every job not finished still has its message waiting in the queue.
    assert counts["pending"] + counts["failed"] == drained.queued, (counts, drained.queued)
    assert drained.stats == drained.recount

    # `kube down` alone: the worker is killed mid-job; the messages of its jobs come back after their lock.
    # (On each replay the worker may take jobs before the embeddings endpoint is started again: those
    # attempts fail and are retried after the backoff, which the checks below allow for.)
    pod.play()
    under_way(pod, "drain", counts["completed"])
    pod.down()
    killed = asyncio.run(read_store(pod.data))
    cut = killed.stats["drain"]
    assert cut["completed"] < total, "every job finished before the pod stopped: the test proves nothing"
    assert cut["pending"] + cut["processing"] + cut["failed"] == killed.queued, (cut, killed.queued)
    assert killed.stats == killed.recount

    pod.play()
    wait_for(
        lambda: pod.stats().get("drain", {}).get("completed", 0) == total,
        timeout=120,
        what=f"all {total} jobs completed after the pod was played again",
        interval=0.5,
    )
    pod.down()
    final = asyncio.run(read_store(pod.data))
    assert final.stats["drain"] == {str(status): 0 for status in JobStatus} | {"completed": total}
    assert all(counts["completed"] == sum(counts.values()) for counts in final.stats.values()), final.stats
    assert final.stats == final.recount
    assert final.queued == 0


@dataclass(frozen=True)
class StoreState:
    """Counters, a recount from the job records, and the messages still queued."""

    stats: dict[str, dict[str, int]]
    recount: dict[str, dict[str, int]]
    queued: int


async def read_store(data: Path) -> StoreState:
    """The pod's SQLite store and queue, read from the host once the pod is down."""
    path = data / "embedding-jobs.db"
    store = await SQLiteJobStore.open(path)
    try:
        stats = {tenant: {str(s): n for s, n in counts.items()} for tenant, counts in (await store.stats_all()).items()}
        recount = {tenant: {str(s): n for s, n in counts.items()} for tenant, counts in (await store.recount()).items()}
    finally:
        await store.close()
    async with LocalQueue(path) as queue:
        depth = await queue.depth()
    return StoreState(stats, recount, depth.active + depth.scheduled)
