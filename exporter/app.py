"""The exporter's aiohttp application: /metrics, /v1/traces, the REST API, health and the status page."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from exporter import api, otlp, status_page
from exporter.auth import TokenAuth, check_bearer
from exporter.errors import error_response
from exporter.keys import AUTH, ENQUEUE, REGISTRY, SETTINGS, SPAN_METRICS, STATE, STORE
from exporter.leader import StateLeadership
from exporter.spanmetrics import SpanMetrics
from exporter.state import DepthSource, StateCollector
from jobs.errors import StoreUnavailableError
from jobs.lease import Lease
from jobs.model import Job
from jobs.settings import Settings
from jobs.store import JobStore

log = logging.getLogger(__name__)
READY_TIMEOUT = 2.0


def create_app(
    settings: Settings,
    store: JobStore,
    *,
    registry: CollectorRegistry | None = None,
    span_metrics: SpanMetrics | None = None,
    depth_source: DepthSource | None = None,
    enqueue: Callable[[Job], Awaitable[None]] | None = None,
    lease: Lease | None = None,
) -> web.Application:
    """Build the exporter app over store; pass span_metrics to share one with an in-process worker.

    lease is the state lease exporters sharing the store elect a state reader with (role "elect").
    """
    registry = registry or CollectorRegistry()
    app = web.Application(client_max_size=otlp.MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[STORE] = store
    app[REGISTRY] = registry
    app[AUTH] = TokenAuth.parse(settings.api_tokens)
    app[SPAN_METRICS] = span_metrics or SpanMetrics(registry, tenant_limit=settings.tenant_label_limit)
    leadership = StateLeadership(settings.state_role, lease)
    app[STATE] = StateCollector(
        store,
        registry,
        limiter=app[SPAN_METRICS].tenants,
        interval=settings.refresh_interval,
        timeout=settings.refresh_timeout,
        stuck_after=settings.stuck_after,
        depth_source=depth_source,
        queue_name=settings.queue_name,
        is_leader=leadership.is_leader,
    )
    leadership.on_elected = app[STATE].wake
    if enqueue is not None:
        app[ENQUEUE] = enqueue
    if not app[AUTH].enabled:
        log.warning("no API tokens configured: the API is open to every caller (set EMBEDDING_JOBS_API_TOKENS)")
    app.cleanup_ctx.append(leadership.cleanup_ctx)
    app.cleanup_ctx.append(_state_refresher)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    otlp.setup(app)
    api.setup(app)
    status_page.setup(app)
    return app


async def _state_refresher(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[STATE].run(), name="state-refresher")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; OpenMetrics (with exemplars) when the scraper asks for it."""
    if not check_bearer(request.app[SETTINGS].metrics_token, request.headers.get("Authorization")):
        return error_response(401, "unauthorized", "a valid bearer token is required for /metrics")
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[REGISTRY])
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: the store answers within a short timeout."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await request.app[STORE].ping()
    except (TimeoutError, StoreUnavailableError) as exc:
        return error_response(503, "store_unavailable", f"job store not reachable: {exc or 'timed out'}")
    return web.json_response({"status": "ready"})
