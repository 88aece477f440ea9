"""OTLP/HTTP receiver: traces (`POST /v1/traces`) feed span metrics, with optional forwarding;
metrics (`POST /v1/metrics`) bring the worker's tracking health (exporter/workerhealth.py).

Accepts protobuf and JSON encodings, gzip or identity, as the OTLP/HTTP specification
describes; answers with an Export{Trace,Metrics}ServiceResponse, and with a google.rpc.Status
body on errors. Received span batches may be forwarded to an upstream OTLP endpoint through a
bounded queue; batches that do not fit, or that upstream refuses, are counted as dropped. Of
metrics, only the worker's tracking instruments are read; the rest are ignored.

The receiver is served on a listener of its own, on loopback by default: in a pod only the
worker beside it can reach it. A bearer token admits senders from elsewhere, and listening
anywhere but loopback without one is refused (`check_listener`).
"""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.trace import SpanKind
from prometheus_client import Counter

from exporter import metrics as m
from exporter.auth import check_bearer
from exporter.keys import REGISTRY, SETTINGS, SPAN_METRICS, WORKER_HEALTH
from exporter.spanmetrics import JobSpan
from jobs import strict_json
from jobs import telemetry as attr
from jobs.strict_json import type_name

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# Upper bound of a (decompressed) export request; the SDK exports batches far below this.
MAX_BODY_BYTES = 32 * 1024 * 1024
# JSON nesting of a JSON export request: about two levels per message level, and protobuf's own
# parser stops at 100 message levels.
JSON_MAX_DEPTH = 200
FORWARD_TIMEOUT = 10.0
# Protobuf SpanKind is the SDK's SpanKind shifted by one (0 is UNSPECIFIED).
_CONSUMER = SpanKind.CONSUMER.value + 1
# The only attributes the metrics read, and their places in a JobSpan's value list.
_WANTED = {attr.TENANT: 0, attr.OUTCOME: 1, attr.QUEUE_WAIT: 2, attr.VECTOR_COUNT: 3}
# Stands for an attribute of a type no metric accepts, so validation refuses the span.
_INVALID = object()
FORWARDER: web.AppKey[Forwarder] = web.AppKey("otlp_forwarder")
# A worker's name comes from its sender: bounded like any label value taken from outside.
_MAX_WORKER_NAME = 128


def is_loopback(host: str) -> bool:
    """True when host names a loopback address, which only processes sharing the network namespace reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listener(host: str, token: str) -> None:
    """Refuse (ValueError) a receiver reachable from other hosts that admits anyone.

    Spans become the tenants' latency and outcome metrics: an open receiver off loopback lets
    anyone who reaches it forge them.
    """
    if not token and not is_loopback(host):
        raise ValueError(
            f"the OTLP receiver would listen on {host or 'every address'} without a token, open to anyone who "
            "reaches it: set EMBEDDING_JOBS_OTLP_TOKEN (--otlp-token), or listen on 127.0.0.1 (--otlp-host)"
        )


def setup(app: web.Application) -> None:
    """Add the receiver route and, when configured, the forwarder's lifecycle."""
    app.router.add_post("/v1/traces", receive_traces)
    app.router.add_post("/v1/metrics", receive_metrics)
    settings = app[SETTINGS]
    if settings.forward_otlp_endpoint:
        app[FORWARDER] = Forwarder(
            settings.forward_otlp_endpoint.rstrip("/") + "/v1/traces",
            queue_size=settings.forward_queue_size,
            counters=_forward_counters(app),
        )
        app.cleanup_ctx.append(_run_forwarder)


def _forward_counters(app: web.Application) -> tuple[Counter, Counter]:
    registry = app[REGISTRY]
    sent = Counter(m.FORWARD_SENT, m.FORWARD_SENT_HELP, registry=registry)
    dropped = Counter(m.FORWARD_DROPPED, m.FORWARD_DROPPED_HELP, m.FORWARD_DROPPED_LABELS, registry=registry)
    for reason in m.FORWARD_DROP_REASONS:
        dropped.labels(reason)
    return sent, dropped


async def _run_forwarder(app: web.Application) -> AsyncIterator[None]:
    forwarder = app[FORWARDER]
    task = asyncio.create_task(forwarder.run(), name="otlp-forwarder")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def receive_traces(request: web.Request) -> web.Response:
    """Check the sender's token, decode an export request, record its job spans, forward it if configured."""
    export = ExportTraceServiceRequest()
    refused = await _read_export(request, export)
    if refused is not None:
        return refused
    request.app[SPAN_METRICS].record_batch(job_spans(export), "otlp")
    forwarder = request.app.get(FORWARDER)
    if forwarder is not None:
        forwarder.submit(export.SerializeToString())
    return _reply(ExportTraceServiceResponse(), request.content_type, 200)


async def receive_metrics(request: web.Request) -> web.Response:
    """Check the sender's token, decode a metrics export request, keep the worker tracking health in it."""
    export = ExportMetricsServiceRequest()
    refused = await _read_export(request, export)
    if refused is not None:
        return refused
    health = request.app[WORKER_HEALTH]
    for worker, values in tracking_reports(export):
        if not health.report(worker, values):
            return _error(429, f"too many workers report tracking health; {worker!r} is not kept", request.content_type)
    return _reply(ExportMetricsServiceResponse(), request.content_type, 200)


def tracking_reports(export: ExportMetricsServiceRequest) -> Iterator[tuple[str, dict[str, float]]]:
    """(worker, values) for each resource in export, from the tracking instruments; other metrics are ignored."""
    prefix = attr.TRACKING_METRIC_PREFIX
    for resource_metrics in export.resource_metrics:
        worker = "unknown"
        for kv in resource_metrics.resource.attributes:
            if kv.key == attr.SERVICE_INSTANCE_ID and kv.value.WhichOneof("value") == "string_value":
                worker = kv.value.string_value[:_MAX_WORKER_NAME]
        values: dict[str, float] = {}
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if not metric.name.startswith(prefix):
                    continue
                data = metric.WhichOneof("data")
                points = (
                    metric.sum.data_points if data == "sum" else metric.gauge.data_points if data == "gauge" else ()
                )
                for point in points:
                    number = point.WhichOneof("value")
                    values[metric.name[len(prefix) :]] = point.as_int if number == "as_int" else point.as_double
        if values:
            yield worker, values


async def _read_export(request: web.Request, export: Message) -> web.Response | None:
    """Authenticate the sender and parse the body into export; an error response when either fails."""
    content_type = request.content_type
    # Refused before the body is read: an unauthenticated sender costs no decompression or parsing.
    if not check_bearer(request.app[SETTINGS].otlp_token, request.headers.get("Authorization")):
        reply_type = JSON if content_type == JSON else PROTOBUF
        response = _error(401, "a valid bearer token is required: send 'Authorization: Bearer TOKEN'", reply_type)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    if content_type not in (PROTOBUF, JSON):
        return _error(415, f"unsupported content type {content_type!r}; use {PROTOBUF} or {JSON}", PROTOBUF)
    kind = type(export).__name__
    try:
        encoding = request.headers.get("Content-Encoding", "identity").lower().strip()
        if encoding not in ("", "identity", "gzip", "deflate"):
            raise _BadRequestError(415, f"unsupported content encoding {encoding!r}; use gzip or identity")
        # aiohttp decompresses gzip bodies itself and refuses (413) one that grows past client_max_size.
        try:
            body = await request.read()
        except RequestPayloadError as exc:
            raise _BadRequestError(400, f"cannot read the body: {exc}") from exc
        if content_type == PROTOBUF:
            export.ParseFromString(body)
        else:
            # Parsed strictly first: json_format.Parse would take a string or an array as an empty
            # request, and leaves nesting to Python's recursion limit.
            data = strict_json.loads(body, max_depth=JSON_MAX_DEPTH)
            if not isinstance(data, dict):
                raise _BadRequestError(400, f"an {kind} is a JSON object, not {type_name(data)}")
            json_format.ParseDict(data, export, ignore_unknown_fields=True)
    except _BadRequestError as exc:
        return _error(exc.status, str(exc), content_type)
    except (DecodeError, json_format.ParseError, strict_json.JSONInputError) as exc:
        return _error(400, f"malformed {content_type} {kind}: {exc}", content_type)
    return None


def job_spans(export: ExportTraceServiceRequest) -> Iterator[JobSpan]:
    """The job spans of an export request, filtered by name and kind before any attribute is read."""
    wanted = _WANTED
    for resource_spans in export.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if span.kind != _CONSUMER or span.name != attr.JOB_SPAN:
                    continue
                values: list[object] = [None, None, None, None]
                for kv in span.attributes:
                    index = wanted.get(kv.key)
                    if index is not None:
                        values[index] = _value(kv.value)
                trace_id = span.trace_id
                yield (
                    values[0],
                    values[1],
                    span.start_time_unix_nano,
                    span.end_time_unix_nano,
                    values[2],
                    values[3],
                    int.from_bytes(trace_id, "big") if trace_id else 0,
                )


def _value(value: AnyValue) -> object:
    field = value.WhichOneof("value")
    if field == "string_value":
        return value.string_value
    if field == "int_value":
        return value.int_value
    if field == "double_value":
        return value.double_value
    # Booleans, bytes, arrays and maps are never valid for the attributes read here.
    return _INVALID if field is not None else None


class _BadRequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _reply(message: Any, content_type: str, status: int) -> web.Response:
    if content_type == JSON:
        return web.Response(status=status, text=json_format.MessageToJson(message), content_type=JSON)
    return web.Response(status=status, body=message.SerializeToString(), content_type=PROTOBUF)


def _error(status: int, message: str, content_type: str) -> web.Response:
    # google.rpc codes: 16 UNAUTHENTICATED, 3 INVALID_ARGUMENT.
    code = 16 if status == 401 else 3
    return _reply(status_pb2.Status(code=code, message=message), content_type, status)


class Forwarder:
    """Posts received batches upstream from a bounded queue; counts what it cannot send."""

    def __init__(self, url: str, *, queue_size: int, counters: tuple[Counter, Counter]) -> None:
        self.url = url
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_size)
        self.sent, self.dropped = counters

    def submit(self, body: bytes) -> None:
        """Queue a serialized ExportTraceServiceRequest, or drop it when the queue is full."""
        try:
            self.queue.put_nowait(body)
        except asyncio.QueueFull:
            self.dropped.labels("queue_full").inc()

    async def run(self) -> None:
        """Send queued batches until cancelled."""
        timeout = aiohttp.ClientTimeout(total=FORWARD_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                body = await self.queue.get()
                try:
                    async with session.post(
                        self.url,
                        data=gzip.compress(body),
                        headers={"Content-Type": PROTOBUF, "Content-Encoding": "gzip"},
                    ) as response:
                        if response.status >= 300:
                            self.dropped.labels(f"http_{response.status}").inc()
                            continue
                    self.sent.inc()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.dropped.labels("unreachable").inc()
                    log.warning("forwarding spans to %s failed: %s", self.url, exc)
