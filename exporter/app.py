"""The exporter's aiohttp applications, one per listener.

`create_app`: /metrics, the REST API, health and the status page. `create_otlp_app`: the OTLP
receiver (/v1/traces), served apart so that it can stay on loopback while the API is exposed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, PlatformCollector, ProcessCollector, disable_created_metrics

from exporter import api, exposition, otlp, status_page
from exporter import metrics as m
from exporter.auth import TokenAuth, check_bearer
from exporter.errors import error_response
from exporter.keys import AUTH, ENQUEUE, REGISTRY, SCRAPE, SETTINGS, SPAN_METRICS, STATE, STORE, WORKER_HEALTH
from exporter.leader import StateLeadership
from exporter.scrape import ScrapeCache
from exporter.spanmetrics import SpanMetrics
from exporter.state import DepthSource, StateCollector
from exporter.workerhealth import WorkerHealth
from jobs.errors import StoreUnavailableError
from jobs.lease import Lease
from jobs.model import Job
from jobs.settings import Settings
from jobs.store import JobStore
from jobs.version import package_version

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
    worker_health: WorkerHealth | None = None,
) -> web.Application:
    """Build the exporter app over store; pass span_metrics to share one with an in-process worker.

    lease is the state lease exporters sharing the store elect a state reader with (role "elect").
    worker_health holds the tracking health of the workers reporting to this exporter.
    """
    # `_created` series double the cost of every counter and histogram and nothing here reads them.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = registry if registry is not None else exposition.ExporterRegistry()
    _register_runtime(registry)
    app = web.Application()
    app.on_response_prepare.append(_no_sniffing)
    app[SETTINGS] = settings
    app[STORE] = store
    app[REGISTRY] = registry
    app[AUTH] = TokenAuth.parse(settings.api_tokens)
    app[SPAN_METRICS] = span_metrics or SpanMetrics(
        registry, tenant_limit=settings.tenant_label_limit, detail=settings.metrics_detail
    )
    app[WORKER_HEALTH] = worker_health or WorkerHealth(registry)
    leadership = StateLeadership(settings.state_role, lease)
    app[STATE] = StateCollector(
        store,
        registry,
        limiter=app[SPAN_METRICS].tenants,
        interval=settings.refresh_interval,
        timeout=settings.refresh_timeout,
        stuck_after=settings.stuck_after,
        depth_source=depth_source,
        depth_timeout=settings.queue_timeout,
        queue_name=settings.queue_name,
        is_leader=leadership.is_leader,
    )
    leadership.on_elected = app[STATE].wake
    if enqueue is not None:
        app[ENQUEUE] = enqueue
    if not app[AUTH].enabled:
        log.warning("no API tokens configured: the API is open to every caller (set EMBEDDING_JOBS_API_TOKENS)")
    app[SCRAPE] = ScrapeCache(lambda openmetrics: exposition.render(registry, openmetrics), settings.metrics_cache_ttl)
    app.cleanup_ctx.append(leadership.cleanup_ctx)
    app.cleanup_ctx.append(_state_refresher)
    app.cleanup_ctx.append(_scrape_cache)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    api.setup(app)
    status_page.setup(app)
    return app


def _register_runtime(registry: CollectorRegistry) -> None:
    """The process (CPU, memory, open files, start time), the Python platform and the build, on registry."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    build = Gauge(m.BUILD_INFO, m.BUILD_INFO_HELP, m.BUILD_INFO_LABELS, registry=registry)
    build.labels(package_version()).set(1)


def create_otlp_app(
    settings: Settings,
    span_metrics: SpanMetrics,
    registry: CollectorRegistry,
    worker_health: WorkerHealth | None = None,
) -> web.Application:
    """Build the OTLP receiver app: spans into span_metrics, worker reports into worker_health; the
    forwarder's counters into registry.

    Pass the span_metrics, registry and worker_health of the `create_app` app whose /metrics shows them
    (without worker_health, one is registered in registry).
    """
    app = web.Application(client_max_size=otlp.MAX_BODY_BYTES)
    app.on_response_prepare.append(_no_sniffing)
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[SPAN_METRICS] = span_metrics
    app[WORKER_HEALTH] = worker_health or WorkerHealth(registry)
    otlp.setup(app)
    return app


async def _no_sniffing(request: web.BaseRequest, response: web.StreamResponse) -> None:
    # A browser that guesses a JSON error echoing caller input to be HTML would run it as a page.
    response.headers["X-Content-Type-Options"] = "nosniff"


async def _state_refresher(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[STATE].run(), name="state-refresher")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _scrape_cache(app: web.Application) -> AsyncIterator[None]:
    yield
    await asyncio.get_running_loop().run_in_executor(None, app[SCRAPE].close)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition, gzip'd when accepted; OpenMetrics (with exemplars) when the scraper asks for it."""
    if not check_bearer(request.app[SETTINGS].metrics_token, request.headers.get("Authorization")):
        return error_response(401, "unauthorized", "a valid bearer token is required for /metrics")
    openmetrics = _accepts_openmetrics(request.headers.get("Accept", ""))
    gzipped = _accepts_gzip(request.headers.get("Accept-Encoding", ""))
    body = await request.app[SCRAPE].body(openmetrics, gzipped, request.app[STATE].is_leader())
    response = web.Response(body=body)
    response.headers["Content-Type"] = (
        exposition.OPENMETRICS_CONTENT_TYPE if openmetrics else exposition.TEXT_CONTENT_TYPE
    )
    response.headers["Vary"] = "Accept, Accept-Encoding"
    if gzipped:
        response.headers["Content-Encoding"] = "gzip"
    return response


def _accepts_openmetrics(accept: str) -> bool:
    # As prometheus-client negotiates it: OpenMetrics 1.0 whenever the scraper lists it.
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media == "application/openmetrics-text":
            return all(p.replace(" ", "") != "version=2.0.0" for p in params)
    return False


def _accepts_gzip(accept_encoding: str) -> bool:
    for part in accept_encoding.split(","):
        coding, *params = (p.strip().lower() for p in part.split(";"))
        if coding == "gzip":
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


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
