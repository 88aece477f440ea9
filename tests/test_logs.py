"""Structured logs carry the current trace id and the job context."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from jobs.logs import JsonFormatter, TextFormatter, TraceContextFilter
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
