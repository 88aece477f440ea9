"""A bounded schemathesis run against a real `embedding-jobs exporter` process: no 5xx, answers as documented.

The exporter serves a SQLite store holding completed, dead-lettered and pending jobs of two
tenants, made by real `ingest` and `worker` runs. schemathesis reads the OpenAPI document the
exporter serves (/api/v1/openapi.json) and sends generated requests, valid and invalid, to every
operation in it with an operator token. Every answer must be free of server errors and conform
to the document: status code, content type, headers and body schema.

docs/reliability.md records the figures this test prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from exporter import openapi
from tests.components import free_port, wait_for
from tests.helpers.cli import cli_env, run_cli

OPERATOR_TOKEN = "operator-token-0123456789"
TENANT_TOKEN = "acme-token-0123456789"
AUTH = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
# Per operation: enough to reach every parameter with valid and invalid values, few enough
# that the whole run stays within a few seconds.
MAX_EXAMPLES = 25
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

answers: Counter[str] = Counter()
# What the document and the API disagree on without a wrong answer, by kind: printed, not failed.
findings: Counter[str] = Counter()
examples: dict[str, str] = {}


def shards(tenant: str, first: int, count: int) -> str:
    return "\n".join(
        json.dumps({"tenantId": tenant, "shardId": f"s{n}", "text": f"text {n} of {tenant}"})
        for n in range(first, first + count)
    )


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of an exporter over a store with completed, dead-lettered and pending jobs."""
    data = tmp_path_factory.mktemp("schemathesis")
    for tenant in ("acme", "globex"):
        assert run_cli(data, "ingest", "-", stdin=shards(tenant, 0, 6)).returncode == 0
    assert run_cli(data, "worker", "--exit-when-idle").returncode == 0
    for tenant in ("acme", "globex"):
        assert run_cli(data, "ingest", "-", stdin=shards(tenant, 6, 3)).returncode == 0
    # No embeddings service listens on port 1: every attempt fails, and one attempt is the limit.
    unreachable = ("--embedder", "openai", "--openai-endpoint", "http://127.0.0.1:1/", "--max-attempts", "1")
    assert run_cli(data, "worker", "--exit-when-idle", *unreachable).returncode == 0
    for tenant in ("acme", "globex"):
        assert run_cli(data, "ingest", "-", stdin=shards(tenant, 9, 2)).returncode == 0

    port = free_port()
    env = cli_env(data, EMBEDDING_JOBS_API_TOKENS=f"{OPERATOR_TOKEN}=*;{TENANT_TOKEN}=acme")
    with (data / "exporter.log").open("w+b") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "embedding_jobs", "exporter", "--exporter-port", str(port)], env=env, stderr=log
        )
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, ConnectionError):
                return False

        try:
            wait_for(healthy, 20, "the exporter to start")
            yield base
        finally:
            process.terminate()
            code = process.wait(20)
            log.seek(0)
            assert code == 0, log.read().decode(errors="replace")
            print(f"schemathesis run: {sum(answers.values())} requests, answers by status class {dict(answers)}")
            for finding, count in sorted(findings.items()):
                print(f"  {count} x {finding}, e.g. {examples[finding]}")


# Built by the code that serves /api/v1/openapi.json (schemathesis's fixture-loaded schemas do
# not run on this pytest); the first test checks the exporter serves exactly this document.
SPEC = openapi.build_spec()
schema = schemathesis.openapi.from_dict(SPEC)


def test_the_exporter_serves_the_document_under_test(exporter: str) -> None:
    with urllib.request.urlopen(f"{exporter}{openapi.OPENAPI_PATH}", timeout=5) as response:
        assert json.load(response) == SPEC


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_without_server_errors_as_documented(case: Case[Any], exporter: str) -> None:
    response = case.call(base_url=exporter, headers=AUTH)
    mode = case.meta.generation.mode.value if case.meta is not None else "explicit"
    answers[f"{mode} {response.status_code // 100}xx"] += 1
    case.validate_response(response, checks=CHECKS, headers=AUTH)
    try:
        case.validate_response(response, checks=[negative_data_rejection, positive_data_acceptance], headers=AUTH)
    except FailureGroup as group:
        for failure in group.exceptions:
            key = f"{case.operation.label}: {failure.title} ({response.status_code})"
            findings[key] += 1
            examples.setdefault(key, case.as_curl_command(headers={"Authorization": "Bearer TOKEN"}))
