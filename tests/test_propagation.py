"""Trace context and baggage travel with job messages through OpenTelemetry's global propagator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, context, propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from jobs import telemetry as attr
from jobs.model import JobStatus
from tests.pipeline import QUEUE_KINDS, Pipeline
from tests.pipeline import pipeline as local_pipeline
from worker.messages import trace_carrier
from worker.tracing import carrier_trace_id, extract_context

PipelineFactory = Callable[..., AbstractAsyncContextManager[Pipeline]]
TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE}-b7ad6b7169203331-01"


@pytest.fixture(params=QUEUE_KINDS)
def pipeline(request: pytest.FixtureRequest) -> PipelineFactory:
    """Builds pipelines on each queue: the local queue and Service Bus (through its test peer)."""
    kind = request.param
    peer = request.getfixturevalue("servicebus_peer") if kind == "servicebus" else None

    def make(tmp_path: Path, **kwargs: Any) -> AbstractAsyncContextManager[Pipeline]:
        return local_pipeline(tmp_path, queue_kind=kind, peer=peer, **kwargs)

    return make


@pytest.fixture
def tracecontext_and_baggage() -> Iterator[None]:
    """The global propagator as OTEL_PROPAGATORS=tracecontext,baggage makes it, restored afterwards."""
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]))
    yield
    propagate.set_global_textmap(previous)


class BaggageAtJobStart(SpanProcessor):
    """Records the baggage of the context each job span starts in."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if span.name == attr.JOB_SPAN:
            self.seen.append(dict(baggage.get_all(parent_context)))

    def on_end(self, span: ReadableSpan) -> None:
        pass


@pytest.mark.usefixtures("tracecontext_and_baggage")
async def test_baggage_set_by_the_producer_reaches_the_consumer(pipeline: PipelineFactory, tmp_path: Path) -> None:
    starts = BaggageAtJobStart()
    async with pipeline(tmp_path, processors=[starts]) as p:
        token = context.attach(baggage.set_baggage("customer.plan", "gold"))
        try:
            job = await p.ingest("tenant-a", "shard-1", "baggage travels with the job")
        finally:
            context.detach(token)
        p.start()
        await p.wait_for_status("tenant-a", job.id, JobStatus.COMPLETED)
        await p.wait_idle()
    assert starts.seen == [{"customer.plan": "gold"}]
    producer = next(s for s in p.spans.get_finished_spans() if s.name == attr.ENQUEUE_SPAN)
    (consumer,) = p.job_spans()
    assert producer.context is not None
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id


@pytest.mark.usefixtures("tracecontext_and_baggage")
def test_context_is_read_from_application_properties_as_text_or_bytes() -> None:
    # What the Service Bus SDK can hand back: AMQP strings decoded to bytes, keys included.
    raw = {b"traceparent": TRACEPARENT.encode(), b"baggage": b"customer.plan=gold", b"tenantId": b"t1"}
    assert carrier_trace_id(raw) == TRACE
    assert baggage.get_all(extract_context(raw)) == {"customer.plan": "gold"}
    assert trace_carrier(raw) == {"traceparent": TRACEPARENT, "baggage": "customer.plan=gold"}
    assert carrier_trace_id({"tenantId": "t1"}) is None


_INJECT = """
import json
from opentelemetry import baggage, context
from worker.tracing import inject_context
context.attach(baggage.set_baggage("customer.plan", "gold"))
carrier = {}
inject_context(carrier)
print(json.dumps(sorted(carrier)))
"""


@pytest.mark.parametrize(
    ("propagators", "fields"),
    [("tracecontext,baggage", ["baggage"]), ("tracecontext", []), ("baggage", ["baggage"])],
)
def test_otel_propagators_chooses_what_a_producer_writes(propagators: str, fields: list[str]) -> None:
    # No span is current in the child, so trace context writes nothing: only baggage can appear.
    env = {**os.environ, "OTEL_PROPAGATORS": propagators}
    done = subprocess.run(
        [sys.executable, "-c", _INJECT], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == fields
