"""Typed application keys: everything the exporter's handlers share, in one place."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from jobs.model import Job
from jobs.settings import Settings
from jobs.store import JobStore

if TYPE_CHECKING:
    from exporter.auth import TokenAuth
    from exporter.scrape import ScrapeCache
    from exporter.spanmetrics import SpanMetrics
    from exporter.state import StateCollector
    from exporter.workerhealth import WorkerHealth

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", JobStore)
REGISTRY = web.AppKey("registry", CollectorRegistry)
AUTH: web.AppKey[TokenAuth] = web.AppKey("auth")
STATE: web.AppKey[StateCollector] = web.AppKey("state")
SPAN_METRICS: web.AppKey[SpanMetrics] = web.AppKey("span_metrics")
SCRAPE: web.AppKey[ScrapeCache] = web.AppKey("scrape")
WORKER_HEALTH: web.AppKey[WorkerHealth] = web.AppKey("worker_health")
# Sends the message for a job put back to pending by the retry API; set by whoever wires a queue.
ENQUEUE: web.AppKey[Callable[[Job], Awaitable[None]]] = web.AppKey("enqueue")
# Store writes and sends of the retry API that outlive the request that started them.
API_TASKS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("api_tasks")
