"""`exporter`: /metrics, the REST API and the status page, and on a listener of its own the OTLP receiver."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from embedding_jobs.backends import Backends, open_backends
from embedding_jobs.runtime import stop_on_signals, tracer_provider
from exporter.app import create_app, create_otlp_app
from exporter.exposition import ExporterRegistry
from exporter.keys import WORKER_HEALTH
from exporter.otlp import check_listener
from exporter.spanmetrics import SpanMetrics
from exporter.workerhealth import WorkerHealth
from jobs.settings import Settings
from worker.producer import Producer
from worker.tracing import get_tracer

log = logging.getLogger("embedding_jobs")


async def cmd_exporter(settings: Settings, args: argparse.Namespace) -> int:
    """Serve /metrics, the API, the status page and the OTLP receiver until SIGTERM/SIGINT."""
    # Before anything opens or binds: a refused receiver is a configuration error, not a failure later.
    check_listener(settings.otlp_host, settings.otlp_token)
    registry = ExporterRegistry()
    span_metrics = SpanMetrics(registry, tenant_limit=settings.tenant_label_limit, detail=settings.metrics_detail)
    elect = settings.state_role == "elect"
    # The provider records the spans of manual retries sent through the API.
    with stop_on_signals() as stop, tracer_provider(settings, "embedding-jobs-exporter") as provider:
        async with (
            open_backends(settings, state_lease=elect) as backends,
            serve_exporter(settings, backends, registry, span_metrics, tracer=get_tracer(provider), receive_otlp=True),
        ):
            await stop.wait()
    return 0


@contextlib.asynccontextmanager
async def serve_exporter(
    settings: Settings,
    backends: Backends,
    registry: CollectorRegistry,
    span_metrics: SpanMetrics,
    *,
    tracer: trace.Tracer,
    receive_otlp: bool,
    worker_health: WorkerHealth | None = None,
) -> AsyncIterator[str]:
    """Run the exporter app, and the OTLP receiver if asked, on their configured addresses; yield the app's URL.

    tracer records the producer spans of manual retries, whose messages the API sends.
    """
    producer = Producer(backends.store, backends.queue, tracer)

    async def depth() -> dict[str, int]:
        d = await backends.queue.depth()
        return {"active": d.active, "scheduled": d.scheduled, "dead_letter": d.dead_letter}

    app = create_app(
        settings,
        backends.store,
        registry=registry,
        span_metrics=span_metrics,
        depth_source=depth,
        enqueue=producer.resend,
        lease=backends.state_lease,
        worker_health=worker_health,
    )
    async with contextlib.AsyncExitStack() as stack:
        serve = stack.enter_async_context
        url = await serve(_listening(app, settings.exporter_host, settings.exporter_port, "exporter"))
        if receive_otlp:
            check_listener(settings.otlp_host, settings.otlp_token)
            otlp_app = create_otlp_app(settings, span_metrics, registry, app[WORKER_HEALTH])
            otlp_url = await serve(_listening(otlp_app, settings.otlp_host, settings.otlp_port, "otlp"))
            token = _on_off(settings.otlp_token)
            receiver = f"on {otlp_url}v1/traces (OTLP token {token}), worker health on v1/metrics"
        else:
            receiver = "off (spans recorded in process)"
        # What an operator checks first when a scrape or a sender is refused, or when nothing should be open.
        log.info(
            "exporter listening: API, metrics and status page on %s (API tokens %s, metrics token %s); "
            "OTLP receiver %s",
            url,
            _on_off(settings.api_tokens),
            _on_off(settings.metrics_token),
            receiver,
        )
        yield url


def _on_off(secret: str) -> str:
    return "on" if secret else "off"


@contextlib.asynccontextmanager
async def _listening(app: web.Application, host: str, port: int, flag: str) -> AsyncIterator[str]:
    """Serve app on host:port until exit; yield its base URL (with the port the OS chose for port 0)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        # An address the resolver refuses may raise UnicodeError (a ValueError) or OverflowError.
        except (OSError, ValueError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(
                f"cannot listen on {host}:{port} ({reason}); choose another --{flag}-host or --{flag}-port"
            ) from exc
        bound_host, bound_port = runner.addresses[0][:2]
        yield f"http://{bound_host}:{bound_port}/"
    finally:
        await runner.cleanup()
