"""Tracer setup and the trace context carried in message application properties.

The context goes through OpenTelemetry's global propagator (`opentelemetry.propagate`), so
OTEL_PROPAGATORS chooses the formats: W3C trace context and baggage unless it says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from jobs.telemetry import INSTRUMENTATION_NAME

# Metrics are derived from `embedding.job` spans, so none may be sampled away and the
# export queue is sized for bursts: at 200 jobs/s with a 5 s export interval it holds
# ~10 s of spans (each job makes about six).
SPAN_QUEUE_SIZE = 16_384
SPAN_BATCH_SIZE = 1_024


def otlp_url(endpoint: str, signal: str) -> str | None:
    """The OTLP/HTTP URL of a signal ("traces", "metrics") from a base endpoint or the standard OTEL_* variables."""
    explicit = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    if not endpoint and explicit:
        return explicit
    base = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    if not base:
        return None
    return f"{base.rstrip('/')}/v1/{signal}"


def create_tracer_provider(
    service_name: str, otlp_endpoint: str = "", processors: Sequence[SpanProcessor] = (), otlp_token: str = ""
) -> TracerProvider:
    """A provider that records every span, exporting over OTLP/HTTP when an endpoint is set.

    otlp_token, when set, is sent as a bearer token, besides any OTEL_EXPORTER_OTLP_HEADERS.
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=ALWAYS_ON)
    url = otlp_url(otlp_endpoint, "traces")
    if url:
        headers = {"Authorization": f"Bearer {otlp_token}"} if otlp_token else None
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=url, headers=headers),
                max_queue_size=SPAN_QUEUE_SIZE,
                max_export_batch_size=SPAN_BATCH_SIZE,
                schedule_delay_millis=1000,
            )
        )
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def get_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """The project's tracer from provider (or the global one)."""
    return trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=provider)


class PropertiesGetter(Getter[Mapping[Any, Any]]):
    """Reads propagation fields from message application properties.

    Service Bus (AMQP) may hand keys and values back as bytes; either form is read as text.
    """

    def get(self, carrier: Mapping[Any, Any], key: str) -> list[str] | None:
        """The value of key as a one-element list, None when absent or not text."""
        value = carrier.get(key)
        if value is None:
            value = carrier.get(key.encode())
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[Any, Any]) -> list[str]:
        """Every key of carrier, as text."""
        return [k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in carrier]


class PropertiesSetter(Setter[MutableMapping[str, str]]):
    """Writes propagation fields into message application properties."""

    def set(self, carrier: MutableMapping[str, str], key: str, value: str) -> None:
        """Set key to value in carrier."""
        carrier[key] = value


PROPERTIES_GETTER = PropertiesGetter()
PROPERTIES_SETTER = PropertiesSetter()


def propagation_fields() -> Iterable[str]:
    """The application property names the global propagator writes and reads."""
    return propagate.get_global_textmap().fields


def inject_context(carrier: MutableMapping[str, str]) -> None:
    """Write the current context (trace context, baggage: whatever OTEL_PROPAGATORS names) into carrier."""
    propagate.inject(carrier, setter=PROPERTIES_SETTER)


def extract_context(carrier: Mapping[Any, Any]) -> Context:
    """The remote context found in carrier, a message's application properties (empty context if none)."""
    return propagate.extract(carrier, getter=PROPERTIES_GETTER)


def carrier_trace_id(carrier: Mapping[Any, Any]) -> str | None:
    """The trace id (32 hex digits) of the remote parent in carrier; None when it carries none.

    A consumer span started with that parent belongs to the same trace, so this is its trace id
    before the span exists.
    """
    context = trace.get_current_span(extract_context(carrier)).get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
