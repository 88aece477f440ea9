"""The whole chain, live: embedding-jobs -> Prometheus -> Alertmanager -> a webhook, and the dashboards' queries.

`embedding-jobs up` runs with the OpenAI-compatible embedder pointed at a local embeddings
server that answers 500 for texts containing a marker word. Jobs with the marker fail, are
retried once and dead-lettered (`--max-attempts 2`). Prometheus scrapes the exporter every
second and evaluates a test rendering of the rules (short burn-rate windows, same
expressions); Alertmanager delivers to a local webhook. The test checks that every dashboard
query and recording rule returns data, that the failure-ratio and dead-letter alerts fire and
arrive, and that they resolve once the embeddings server is healthy again. A second run checks
a tenant never seen before: its first job dead-letters and the dead-letter alert reaches the
webhook, while the burn-rate page stays silent for a tenant with too few finished jobs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from alerts.build import BurnWindow, RuleParams, recording_rules, render
from tests.components import free_port, port_open, require_binary, wait_for
from tests.helpers.dashboards import committed_dashboards, panels
from tests.prometheus_stack import (
    ALERTMANAGER_HINT,
    INSTALL_HINT,
    Prometheus,
    WebhookReceiver,
    running_alertmanager,
    running_prometheus,
    serve_in_thread,
    started,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

MARKER = "poison"
TENANT = "acme"
JOB = "embedding-jobs"
# The production expressions with windows short enough for a test: the fast burn looks at
# 30 s and 10 s, a dead-letter alerts for 10 s after it happened.
TEST_RULES = RuleParams(
    page_windows=(BurnWindow(long="30s", short="10s", factor=14.4),),
    page_for="1s",
    dead_letter_window="10s",
    selector=f'job="{JOB}"',
)
NEW_TENANT = "newco"
# Grafana's variables, as the dashboards would resolve them while looking at acme's deployment.
# This Prometheus gives the series no cluster or namespace: "All" (".*") matches a missing label.
VARIABLES = {"$__rate_interval": "1m", "$tenant": TENANT, "$job": JOB, "$namespace": ".*", "$cluster": ".*"}
# Queries that have no data in a healthy run, and why.
NO_DATA_ALLOWED = {
    ("embedding-jobs-overview.json", "Spans", "B"): "spans are only dropped when malformed (none in this run)",
}


@dataclass
class EmbeddingsServer:
    """An OpenAI-compatible /embeddings endpoint that fails texts with MARKER until made healthy."""

    healthy: bool = False

    def app(self) -> web.Application:
        """The aiohttp app serving POST /embeddings."""
        app = web.Application()
        app.router.add_post("/embeddings", self._embeddings)
        return app

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        texts: list[str] = body["input"]
        if not self.healthy and any(MARKER in text for text in texts):
            return web.json_response({"error": {"message": "injected failure", "code": "test"}}, status=500)
        data = [{"index": i, "embedding": [float(len(text)), 1.0, 0.5]} for i, text in enumerate(texts)]
        return web.json_response({"data": data, "model": body["model"]})


def shards(tenant: str, prefix: str, count: int, *, poisoned: bool = False) -> list[dict[str, str]]:
    """count shard records; poisoned ones carry the marker the embeddings server fails on."""
    word = MARKER if poisoned else "healthy"
    return [
        {"tenantId": tenant, "shardId": f"{prefix}-{n}", "text": f"A {word} document number {n} about {prefix}."}
        for n in range(count)
    ]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    """Write records as JSON Lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cli_env(data_dir: Path) -> dict[str, str]:
    """The environment of an embedding-jobs process on data_dir, free of the caller's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_JOBS_", "OTEL_"))}
    env.update({"EMBEDDING_JOBS_DATA_DIR": str(data_dir), "EMBEDDING_JOBS_LOG_LEVEL": "WARNING"})
    return env


def ingest(data_dir: Path, source: Path) -> None:
    """Enqueue the shards of source into the running stack's store and queue."""
    result = subprocess.run(
        [sys.executable, "-m", "embedding_jobs", "ingest", str(source)],
        env=cli_env(data_dir),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def has_data(prometheus: Prometheus, expr: str) -> bool:
    """True when an instant query returns at least one series."""
    return bool(prometheus.query(expr))


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    """The finite sample values of an instant query result."""
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if math.isfinite(v)]


def resolve_variables(expr: str) -> str:
    """expr with the dashboard variables replaced by what Grafana would send."""
    for name, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


@dataclass
class Stack:
    """The running pieces a test talks to."""

    prometheus: Prometheus
    webhook: WebhookReceiver
    embeddings: EmbeddingsServer
    data_dir: Path
    started_at: float


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Alertmanager, Prometheus with the test rules, the embeddings server and `embedding-jobs up`."""
    require_binary("prometheus", INSTALL_HINT)
    require_binary("prometheus-alertmanager", ALERTMANAGER_HINT)
    started_at = time.time()
    rules = tmp_path / "rules.yaml"
    rules.write_text(render(TEST_RULES), encoding="utf-8")
    data_dir = tmp_path / "data"
    first = write_jsonl(tmp_path / "first.jsonl", shards(TENANT, "first", 6) + shards("globex", "first", 6))
    embeddings = EmbeddingsServer()
    webhook = WebhookReceiver()
    exporter_port = free_port()
    with ExitStack() as stack:
        embeddings_url = stack.enter_context(serve_in_thread(embeddings.app()))
        webhook_url = stack.enter_context(serve_in_thread(webhook.app()))
        alertmanager = stack.enter_context(
            running_alertmanager(tmp_path / "alertmanager", webhook_url=f"{webhook_url}/alerts")
        )
        prometheus = stack.enter_context(
            running_prometheus(
                tmp_path / "prometheus",
                job=JOB,
                targets=[f"127.0.0.1:{exporter_port}"],
                rule_files=[rules],
                alertmanager=alertmanager.url,
            )
        )
        argv = [
            sys.executable,
            "-m",
            "embedding_jobs",
            "up",
            "--exporter-port",
            str(exporter_port),
            "--refresh-interval",
            "1",
            "--ingest",
            str(first),
            "--embedder",
            "openai",
            "--openai-endpoint",
            embeddings_url,
            "--backoff-base",
            "0.05",
            "--max-attempts",
            "2",
        ]
        app = stack.enter_context(started("embedding-jobs up", argv, tmp_path / "up.log", env=cli_env(data_dir)))
        wait_for(lambda: app.alive() and port_open(exporter_port), 30, "the exporter of embedding-jobs up")
        yield Stack(prometheus, webhook, embeddings, data_dir, started_at)


def test_alerts_fire_reach_the_webhook_and_resolve_and_every_dashboard_query_has_data(
    stack: Stack, tmp_path: Path
) -> None:
    prometheus, webhook = stack.prometheus, stack.webhook
    # rate() needs a sample before the failures: wait until the zero-initialised
    # dead-letter counter of acme has been scraped.
    wait_until(
        lambda: has_data(prometheus, f'embedding_job_attempts_total{{tenant="{TENANT}", outcome="dead_lettered"}}'),
        30,
        "a first scrape of acme's attempt counters",
    )

    # An outage: keep failing jobs coming until both alerts have fired, as a broken endpoint would.
    batches = itertools.count()

    def fail_some_jobs() -> None:
        batch = next(batches)
        records = (
            shards(TENANT, f"poisoned-{batch}", 3, poisoned=True)
            + shards(TENANT, f"fine-{batch}", 2)
            + shards("globex", f"fine-{batch}", 2)
        )
        ingest(stack.data_dir, write_jsonl(tmp_path / f"batch-{batch}.jsonl", records))

    burn_labels = {"alertname": "EmbeddingJobsErrorBudgetBurnFast", "tenant": TENANT}
    dead_labels = {"alertname": "EmbeddingJobsDeadLettered", "tenant": TENANT}

    def fired() -> bool:
        if webhook.find("firing", **burn_labels) and webhook.find("firing", **dead_labels):
            return True
        fail_some_jobs()  # each ingest takes a fraction of a second: it paces the loop
        return False

    wait_for(fired, 30, "both alerts to fire", interval=0, detail=lambda: f"received {webhook.summary()}")
    burn = webhook.wait("firing", 1, **burn_labels)
    dead = webhook.wait("firing", 1, **dead_labels)
    for alert in (burn, dead):
        assert TENANT in alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"].endswith("#" + alert["labels"]["alertname"].lower())
        assert alert["annotations"]["dashboard_url"].endswith(f"var-tenant={TENANT}")
    assert burn["labels"]["severity"] == "critical"
    assert dead["labels"]["severity"] == "warning"

    no_data = []
    queried = set()
    for name, dashboard in committed_dashboards().items():
        for panel in panels(dashboard):
            for target in panel["targets"]:
                key = (name, panel["title"], target["refId"])
                queried.add(key)
                result = prometheus.query(resolve_variables(target["expr"]))
                if key in NO_DATA_ALLOWED:
                    continue
                if not finite_values(result):
                    no_data.append(f"{name} / {panel['title']} / {target['refId']}: {target['expr']} -> {result}")
    for rule in recording_rules(TEST_RULES):
        if not prometheus.query(str(rule["record"])):
            no_data.append(f"recording rule {rule['record']}")
    assert not no_data, "queries without data:\n" + "\n".join(no_data)
    assert set(NO_DATA_ALLOWED) <= queried, "the allow-list names queries the dashboards no longer have"

    exemplars = prometheus.exemplars("embedding_job_duration_seconds_bucket", stack.started_at)
    trace_ids = [e["labels"].get("trace_id", "") for series in exemplars for e in series["exemplars"]]
    assert any(re.fullmatch(r"[0-9a-f]{32}", t) for t in trace_ids), f"no trace-id exemplars: {exemplars}"

    # Still failing: nothing has resolved yet. Then the endpoint recovers and work succeeds again.
    fail_some_jobs()
    assert webhook.find("resolved", **burn_labels) is None
    assert webhook.find("resolved", **dead_labels) is None
    stack.embeddings.healthy = True
    ingest(stack.data_dir, write_jsonl(tmp_path / "recovered.jsonl", shards(TENANT, "recovered", 8)))
    webhook.wait("resolved", 30, **burn_labels)
    webhook.wait("resolved", 30, **dead_labels)
    completed = prometheus.query(f'sum(embedding_job_attempts_total{{tenant="{TENANT}", outcome="completed"}})')
    assert finite_values(completed)[0] > 0


def test_a_new_tenants_first_dead_letter_alerts_and_too_few_jobs_do_not_page(stack: Stack, tmp_path: Path) -> None:
    prometheus, webhook = stack.prometheus, stack.webhook
    wait_until(lambda: has_data(prometheus, "up"), 30, "a first scrape of the exporter")
    assert not has_data(prometheus, f'embedding_job_attempts_total{{tenant="{NEW_TENANT}"}}')
    ingest(stack.data_dir, write_jsonl(tmp_path / "new.jsonl", shards(NEW_TENANT, "first", 1, poisoned=True)))

    dead = webhook.wait("firing", 30, alertname="EmbeddingJobsDeadLettered", tenant=NEW_TENANT)
    assert NEW_TENANT in dead["annotations"]["description"]
    assert dead["annotations"]["dashboard_url"].endswith(f"var-tenant={NEW_TENANT}")

    # Its dead-lettered share is a number (1: its only finished job), not NaN, in both page windows,
    # and has been over the page threshold for several rule evaluations (1 s apart)...
    ratio = 'tenant:embedding_jobs_dead_lettered:ratio{window}{{tenant="{tenant}"}}'
    short = ratio.format(window="10s", tenant=NEW_TENANT)
    long = ratio.format(window="30s", tenant=NEW_TENANT)
    held = f"({short} > 0.144) and ({long} > 0.144) and (count_over_time({short}[10s]) >= 4)"
    wait_until(lambda: has_data(prometheus, held), 20, f"{NEW_TENANT}'s dead-lettered ratios over the page threshold")
    assert finite_values(prometheus.query(long)) == [1.0]
    finished = prometheus.query(f'tenant:embedding_jobs_finished:increase30s{{tenant="{NEW_TENANT}"}}')
    assert finite_values(finished) == [1.0]
    # ...yet one finished job is below the minimum traffic: no page, pending or firing.
    burn = f'ALERTS{{alertname="EmbeddingJobsErrorBudgetBurnFast", tenant="{NEW_TENANT}"}}'
    assert prometheus.query(burn) == []
    assert webhook.find("firing", alertname="EmbeddingJobsErrorBudgetBurnFast", tenant=NEW_TENANT) is None
