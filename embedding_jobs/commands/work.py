"""Working the queue: `worker` (until stopped), and `up` (everything locally, in one process)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TextIO

from opentelemetry import trace

from embedding_jobs.backends import Backends, build_embedder, build_tracker, consumer_config, open_backends
from embedding_jobs.commands.ingest import run_ingest
from embedding_jobs.commands.jobs import print_summary
from embedding_jobs.commands.serve import serve_exporter
from embedding_jobs.progress import watch_work
from embedding_jobs.runtime import meter_provider, stop_on_signals, tracer_provider
from exporter.exposition import ExporterRegistry
from exporter.spanmetrics import MetricsSpanProcessor, SpanMetrics
from exporter.workerhealth import WorkerHealth
from jobs.settings import Settings
from worker.consumer import Consumer
from worker.health import tracking_snapshot, worker_id
from worker.reconciler import reconcile_forever
from worker.tracing import get_tracer
from worker.tracker import JobTracker

SAMPLE = "sample/shards.jsonl"
SERVICE = "embedding-jobs-worker"


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Run the consume loop until SIGTERM/SIGINT (or until idle)."""
    with tracer_provider(settings, SERVICE) as provider:
        async with open_backends(settings, for_worker=True) as backends:
            # A progress line is for people: a worker in a pod, not waiting to go idle, only works.
            watch = args.exit_when_idle or sys.stderr.isatty()
            await work(
                settings,
                backends,
                get_tracer(provider),
                exit_when_idle=args.exit_when_idle,
                out=sys.stderr,
                watch=watch,
            )
    return 0


async def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Local all-in-one: exporter, ingest, work the queue, show a per-tenant summary."""
    registry = ExporterRegistry()
    span_metrics = SpanMetrics(registry, tenant_limit=settings.tenant_label_limit, detail=settings.metrics_detail)
    worker_health = WorkerHealth(registry)
    # The only exporter of this store, whatever the role setting says.
    exporter_settings = settings.with_changes(state_role="always")
    # Spans reach the metrics through an in-process processor, and the tracker's health is read at
    # each scrape: no OTLP receiver, no hop. Ingest, manual retries and the worker share the provider.
    with tracer_provider(settings, SERVICE, [MetricsSpanProcessor(span_metrics)]) as provider:
        tracer = get_tracer(provider)
        async with (
            open_backends(settings) as backends,
            serve_exporter(
                exporter_settings,
                backends,
                registry,
                span_metrics,
                tracer=tracer,
                receive_otlp=False,
                worker_health=worker_health,
            ) as url,
        ):
            print(f"status page and API: {url}  metrics: {url}metrics", file=sys.stderr)
            if args.ingest:
                await run_ingest(backends, tracer, args.ingest, "default")
            elif not args.no_sample:
                with resources.as_file(resources.files("embedding_jobs") / SAMPLE) as sample:
                    await run_ingest(backends, tracer, str(sample), "default")
            await work(
                settings,
                backends,
                tracer,
                exit_when_idle=args.exit_when_idle,
                out=sys.stderr,
                on_tracker=lambda tracker: worker_health.add_reader(worker_id(), lambda: tracking_snapshot(tracker)),
                watch=True,
                on_idle=lambda: print_summary(backends.store, sys.stdout),
            )
    return 0


async def work(
    settings: Settings,
    backends: Backends,
    tracer: trace.Tracer,
    *,
    exit_when_idle: bool,
    out: TextIO,
    on_tracker: Callable[[JobTracker], None] | None = None,
    watch: bool = False,
    on_idle: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Consume the queue until SIGTERM/SIGINT (or until idle, if asked), with the reconciler beside it."""
    # First: it adopts the spooled writes of workers that died here, and may refuse the data dir.
    tracker = build_tracker(settings, backends.store)
    if on_tracker is not None:
        on_tracker(tracker)
    async with contextlib.AsyncExitStack() as stack:
        # Left last: after the tracker's last flush, so the final export carries the final counts.
        stack.enter_context(meter_provider(settings, tracker, SERVICE))
        embedder = build_embedder(settings)
        stack.push_async_callback(embedder.close)
        stop = stack.enter_context(stop_on_signals())
        consumer = Consumer(
            queue=backends.queue,
            tracker=tracker,
            shards=backends.shards,
            embedder=embedder,
            tracer=tracer,
            config=consumer_config(settings),
        )
        reconciler = (
            asyncio.create_task(reconcile_forever(backends.queue, backends.store, settings.reconcile_interval))
            if settings.reconcile_interval > 0
            else None
        )
        try:
            async with tracker.running():
                run = asyncio.create_task(consumer.run(stop))
                if watch:
                    await watch_work(consumer, backends.queue, stop, exit_when_idle, out, on_idle)
                await run
        finally:
            if reconciler is not None:
                reconciler.cancel()
                await asyncio.gather(reconciler, return_exceptions=True)
