"""Reading Prometheus text exposition and feeding spans to the OTLP receiver."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp.plugin import AiohttpClient

from exporter.app import create_otlp_app
from exporter.keys import REGISTRY, SETTINGS, SPAN_METRICS, WORKER_HEALTH
from jobs import telemetry as attr
from worker.tracing import get_tracer

Client = TestClient[web.Request, web.Application]


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called name in an exposition, by its sorted labels."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def sample(text: str, name: str, labels: dict[str, str]) -> float | None:
    """The value of the sample called name with exactly these labels, or None when there is none."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def job_span_request(tenant: str, outcome: str, n: int = 1, vectors: int = 3) -> ExportTraceServiceRequest:
    """An export request built by the real SDK and OTLP encoder."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = get_tracer(provider)
    for _ in range(n):
        with tracer.start_as_current_span(attr.JOB_SPAN, kind=SpanKind.CONSUMER) as span:
            span.set_attributes(
                {attr.TENANT: tenant, attr.OUTCOME: outcome, attr.VECTOR_COUNT: vectors, attr.QUEUE_WAIT: 0.5}
            )
    return encode_spans(exporter.get_finished_spans())


async def receiver_of(aiohttp_client: AiohttpClient, app: web.Application) -> Client:
    """A client of the OTLP receiver feeding app's span metrics, on a listener of its own as the exporter serves it."""
    return await aiohttp_client(create_otlp_app(app[SETTINGS], app[SPAN_METRICS], app[REGISTRY], app[WORKER_HEALTH]))
