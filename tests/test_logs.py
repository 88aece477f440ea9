"""Structured logs carry the current trace id and the job context; SDK loggers stay quiet below DEBUG."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from jobs.logs import JsonFormatter, TextFormatter, TraceContextFilter
from tests.conftest import CosmosDatabase
from tests.helpers.cli import cosmos_env, run_cli
from worker.tracing import get_tracer


@pytest.fixture
def captured() -> tuple[logging.Logger, logging.StreamHandler[io.StringIO]]:
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(TraceContextFilter())
    logger = logging.getLogger("test-structured-logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, handler


def test_json_lines_carry_trace_and_job_ids(
    captured: tuple[logging.Logger, logging.StreamHandler[io.StringIO]],
) -> None:
    logger, handler = captured
    handler.setFormatter(JsonFormatter())
    tracer = get_tracer(TracerProvider())
    with tracer.start_as_current_span("embedding.job") as span:
        logger.info("job completed: %d vectors", 3, extra={"tenant_id": "acme", "job_id": "j1"})
        trace_id = format(span.get_span_context().trace_id, "032x")
    record = json.loads(handler.stream.getvalue())
    assert record["message"] == "job completed: 3 vectors"
    assert record["trace_id"] == trace_id
    assert record["tenant_id"] == "acme"
    assert record["job_id"] == "j1"
    assert record["level"] == "INFO"
    assert record["time"].endswith("Z")


def test_text_lines_append_context_and_omit_empty_trace(
    captured: tuple[logging.Logger, logging.StreamHandler[io.StringIO]],
) -> None:
    logger, handler = captured
    handler.setFormatter(TextFormatter("%(levelname)s %(message)s"))
    logger.warning("lock lost", extra={"job_id": "j2"})
    assert handler.stream.getvalue().strip() == "WARNING lock lost job_id=j2"


def sdk_records(stderr: str) -> int:
    """Log records of Azure SDK loggers in text-format output (a record may span several lines)."""
    return len(re.findall(r"^\S+ \S+ [A-Z]+ azure\.", stderr, re.MULTILINE))


def test_azure_sdk_loggers_stay_quiet_below_debug(tmp_path: Path, cosmos_db: CosmosDatabase) -> None:
    env = cosmos_env(cosmos_db)
    assert run_cli(tmp_path, "init-db", **env).returncode == 0
    corpus = "\n".join(json.dumps({"tenantId": "acme", "shardId": f"s{n}", "text": f"text {n}"}) for n in range(20))
    # 20 shards on Cosmos DB: 65 HTTP calls, which the SDK logs at INFO as 130 multi-line records.
    ingest = run_cli(tmp_path, "ingest", "-", stdin=corpus, EMBEDDING_JOBS_LOG_LEVEL="INFO", **env)
    assert ingest.returncode == 0, ingest.stderr
    assert "20 jobs enqueued" in ingest.stderr
    assert sdk_records(ingest.stderr) == 0, ingest.stderr[:2000]
    assert len(ingest.stderr.splitlines()) < 10, ingest.stderr[:2000]
    # At DEBUG they are there for whoever troubleshoots the SDK.
    debug = run_cli(
        tmp_path, "jobs", "stats", "--tenant", "acme", "--output", "json", EMBEDDING_JOBS_LOG_LEVEL="DEBUG", **env
    )
    assert debug.returncode == 0, debug.stderr
    assert json.loads(debug.stdout)["acme"]["pending"] == 20
    assert sdk_records(debug.stderr) >= 2
