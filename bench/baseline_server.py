"""The bare aiohttp server the exporter benchmarks measure against.

`python -m bench.baseline_server --port P [--exposition FILE]` serves GET /healthz, GET /metrics
through prometheus_client's own encoders over a registry rebuilt from an OpenMetrics exposition
(so it holds the exporter's series: the same samples, label sets and exemplars, made with plain
Gauge, Counter and Histogram objects), and POST /v1/traces, which only parses the request.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry", CollectorRegistry)
MAX_BODY_BYTES = 32 * 1024 * 1024


def registry_from_openmetrics(text: str) -> CollectorRegistry:
    """A registry of plain client metrics holding the series of an OpenMetrics exposition.

    Histogram series get one observation per counted event at its bucket's upper bound, so
    bucket counts match (sums may differ); exemplars ride on the first such observation.
    """
    families = list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]
    if not any(s.name.endswith("_created") for family in families for s in family.samples):
        disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    for family in families:
        if family.type == "counter":
            _counter(family, registry)
        elif family.type in ("gauge", "unknown"):
            _gauge(family, registry)
        elif family.type == "histogram":
            _histogram(family, registry)
        else:
            raise ValueError(f"{family.name}: no plain client metric for type {family.type}")
    return registry


def _labelnames(samples: Sequence[Sample]) -> list[str]:
    if not samples:
        # A labelled family with no children yet: HELP and TYPE only, which a label name gives too.
        return ["unset"]
    return [name for name in samples[0].labels if name != "le"]


def _counter(family: Metric, registry: CollectorRegistry) -> None:
    totals = [s for s in family.samples if s.name == family.name + "_total"]
    names = _labelnames(totals)
    counter = Counter(family.name, family.documentation, names, registry=registry)
    for s in totals:
        child = counter.labels(*(s.labels[n] for n in names)) if names else counter
        child.inc(s.value, s.exemplar.labels if s.exemplar else None)


def _gauge(family: Metric, registry: CollectorRegistry) -> None:
    names = _labelnames(family.samples)
    gauge = Gauge(family.name, family.documentation, names, registry=registry)
    for s in family.samples:
        (gauge.labels(*(s.labels[n] for n in names)) if names else gauge).set(s.value)


def _histogram(family: Metric, registry: CollectorRegistry) -> None:
    buckets = [s for s in family.samples if s.name == family.name + "_bucket"]
    names = _labelnames(buckets)
    bounds = sorted({float(s.labels["le"]) for s in buckets})
    histogram = Histogram(family.name, family.documentation, names, buckets=bounds, registry=registry)
    series: dict[tuple[str, ...], list[Sample]] = {}
    for s in buckets:
        series.setdefault(tuple(s.labels[n] for n in names), []).append(s)
    finite = [b for b in bounds if not math.isinf(b)]
    beyond = 2 * finite[-1] if finite else 1.0
    for key, samples in series.items():
        child = histogram.labels(*key) if names else histogram
        below = 0.0
        for s in sorted(samples, key=lambda s: float(s.labels["le"])):
            bound = float(s.labels["le"])
            value = beyond if math.isinf(bound) else bound
            for n in range(int(s.value - below)):
                child.observe(value, s.exemplar.labels if s.exemplar and n == 0 else None)
            below = s.value


async def metrics(request: web.Request) -> web.Response:
    """The registry in the format the scraper asks for."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    response = web.Response(body=encoder(request.app[REGISTRY]))
    response.headers["Content-Type"] = content_type
    return response


async def healthz(request: web.Request) -> web.Response:
    """Alive."""
    return web.json_response({"status": "ok"})


async def traces(request: web.Request) -> web.Response:
    """Parse the export request and answer 200: OTLP ingest with no metrics behind it."""
    export = ExportTraceServiceRequest()
    export.ParseFromString(await request.read())
    return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")


def create_app(registry: CollectorRegistry) -> web.Application:
    """The baseline app over registry."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[REGISTRY] = registry
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/traces", traces)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Serve on 127.0.0.1:--port until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--exposition", type=Path, help="OpenMetrics exposition whose series to serve")
    args = parser.parse_args(argv)
    registry = registry_from_openmetrics(args.exposition.read_text()) if args.exposition else CollectorRegistry()
    web.run_app(create_app(registry), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
