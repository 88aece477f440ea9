"""The `embedding-jobs` command: the one place that wires the worker and the exporter together."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import timedelta
from importlib import resources
from typing import Any, TextIO

from aiohttp import web
from opentelemetry.sdk.trace import SpanProcessor
from prometheus_client import CollectorRegistry

from embedding_jobs.backends import (
    Backends,
    BackendUnavailableError,
    build_embedder,
    build_tracker,
    consumer_config,
    open_backends,
    open_job_store,
)
from exporter.app import create_app, create_otlp_app
from exporter.exposition import ExporterRegistry
from exporter.keys import WORKER_HEALTH
from exporter.otlp import check_listener
from exporter.spanmetrics import MetricsSpanProcessor, SpanMetrics
from exporter.workerhealth import WorkerHealth
from jobs.errors import JobError
from jobs.logs import configure_logging
from jobs.model import Job, JobStatus
from jobs.settings import Settings
from jobs.store import JobStore
from jobs.telemetry import Outcome
from jobs.version import package_version
from worker.consumer import Consumer
from worker.health import create_meter_provider, tracking_snapshot, worker_id
from worker.messages import JobMessage
from worker.producer import Producer, ingest_shard
from worker.queue import QueueError
from worker.reconciler import reconcile_dead_letters, reconcile_forever
from worker.sources import Rejected, read_shards
from worker.tracing import create_tracer_provider, get_tracer
from worker.tracker import JobTracker

log = logging.getLogger("embedding_jobs")
SAMPLE = "sample/shards.jsonl"
ALL_SECTIONS = ("store", "queue", "embedder", "worker", "exporter")
OUTPUTS = ("table", "json")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(args)
    except ValueError as exc:
        parser.error(str(exc))
    quiet_up = args.command is cmd_up and "log_level" not in vars(args) and "EMBEDDING_JOBS_LOG_LEVEL" not in os.environ
    # `up` shows a progress line; per-job logs would bury it unless asked for.
    configure_logging("WARNING" if quiet_up else settings.log_level, settings.log_format)
    command: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = args.command
    try:
        return asyncio.run(command(settings, args))
    except (BackendUnavailableError, JobError, FileNotFoundError, ValueError) as exc:
        print(f"embedding-jobs: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand and its settings flags."""
    parser = argparse.ArgumentParser(
        prog="embedding-jobs",
        description="Embedding-generation jobs with per-tenant status tracking and observability. "
        "Every setting can also come from an EMBEDDING_JOBS_* environment variable.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[..., Any], help: str, sections: Sequence[str]) -> argparse.ArgumentParser:
        # A command's --help shows its own arguments and only the names of the settings it reads: the
        # descriptions of all of them (about 50) would bury the command. `config --help` has those.
        epilog = (
            "settings it reads, each also an EMBEDDING_JOBS_* variable\n"
            f"(`embedding-jobs config --help` describes each, with its default):\n{Settings.flags_summary(sections)}"
        )
        sub = commands.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sub.set_defaults(command=fn)
        Settings.add_arguments(sub, sections, describe=False)
        return sub

    ingest = add("ingest", cmd_ingest, "save shards and enqueue a job for each new or changed one", ALL_SECTIONS)
    ingest.add_argument("source", help="a .jsonl file, '-' for JSON Lines on stdin, or a folder of text files")
    ingest.add_argument("--tenant", default="default", help="tenant of files at a folder's top level")

    worker = add("worker", cmd_worker, "consume the queue and embed shards until stopped", ALL_SECTIONS)
    worker.add_argument("--exit-when-idle", action="store_true", help="stop once the queue is empty")

    up = add("up", cmd_up, "run everything locally: ingest the sample corpus, then work the queue", ALL_SECTIONS)
    up.add_argument("--ingest", metavar="SOURCE", help="ingest this instead of the bundled sample corpus")
    up.add_argument("--no-sample", action="store_true", help="ingest nothing; only work the queue")
    up.add_argument("--exit-when-idle", action="store_true", help="stop once every job has finished")

    jobs = add("jobs", cmd_jobs, "look at jobs: `jobs stats [--tenant T]` or `jobs list --tenant T`", ["store"])
    jobs.add_argument("action", choices=("list", "stats"))
    jobs.add_argument("--tenant", help="tenant id (required for list)")
    jobs.add_argument("--status", choices=[s.value for s in JobStatus], help="only jobs in this status")
    jobs.add_argument("--limit", type=int, default=20, help="jobs to show (default 20)")
    jobs.add_argument(
        "--output",
        choices=OUTPUTS,
        default="table",
        help="table (default), or json: stats as one object by tenant, list as one job per line",
    )

    add("init-db", cmd_init_db, "create the Cosmos DB database and containers (idempotent)", ["store"])
    feeder = add("feeder", cmd_feeder, "enqueue a job for every new or changed shard in the shard store", ALL_SECTIONS)
    feeder.add_argument("--poll-interval", type=float, default=1.0, help="seconds between change reads (1)")
    add(
        "exporter",
        cmd_exporter,
        "serve /metrics, the REST API and the status page, and on a port of its own the OTLP receiver",
        ALL_SECTIONS,
    )
    add(
        "reconcile-dlq",
        cmd_reconcile_dlq,
        "mark jobs dead_lettered whose messages the queue dead-lettered by itself",
        ["store", "queue", "worker"],
    )
    add("recount", cmd_recount, "rebuild per-tenant counters from the job records", ["store"])
    purge = add("purge", cmd_purge, "delete finished jobs older than the retention", ["store"])
    purge.add_argument("--older-than-hours", type=float, help="defaults to --retention-hours")
    config = commands.add_parser(
        "config",
        help="show the effective settings (secrets masked); --help describes every setting",
        description="Show the effective settings, from flags, EMBEDDING_JOBS_* variables and defaults; "
        "secrets show only whether they are set.",
    )
    config.set_defaults(command=cmd_config)
    config.add_argument("--output", choices=OUTPUTS, default="table", help="table (default) or json")
    Settings.add_arguments(config, ALL_SECTIONS)
    return parser


async def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    """Save shards from a source and enqueue their jobs."""
    async with open_backends(settings) as backends:
        rejected = await _ingest(backends, args.source, args.tenant)
    return 1 if rejected else 0


async def _ingest(backends: Backends, source: str, tenant: str, out: TextIO = sys.stderr) -> int:
    producer = Producer(backends.store, backends.queue, get_tracer(create_tracer_provider("embedding-jobs-ingest")))
    progress = Progress("ingest", out)
    shards = enqueued = rejected = 0
    for item in read_shards(source, tenant):
        if isinstance(item, Rejected):
            rejected += 1
            print(f"\nrejected {item.where}: {item.reason}", file=out)
            continue
        shards += 1
        enqueued += await ingest_shard(backends.shards, producer, item)
        progress.show(f"{shards} shards read, {enqueued} jobs enqueued")
    progress.done(f"{shards} shards read, {enqueued} jobs enqueued, {shards - enqueued} unchanged, {rejected} rejected")
    return rejected


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Run the consume loop until SIGTERM/SIGINT (or until idle)."""
    async with open_backends(settings, for_worker=True) as backends:
        # A progress line is for people: a worker in a pod, not waiting to go idle, only works.
        watch = args.exit_when_idle or sys.stderr.isatty()
        await _work(settings, backends, exit_when_idle=args.exit_when_idle, out=sys.stderr, watch=watch)
    return 0


async def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    """Local all-in-one: exporter, ingest, work the queue, show a per-tenant summary."""
    registry = ExporterRegistry()
    span_metrics = SpanMetrics(registry, tenant_limit=settings.tenant_label_limit, detail=settings.metrics_detail)
    worker_health = WorkerHealth(registry)
    # The only exporter of this store, whatever the role setting says.
    exporter_settings = settings.with_changes(state_role="always")
    # Spans reach the metrics through an in-process processor, and the tracker's health is read at
    # each scrape: no OTLP receiver, no hop.
    async with (
        open_backends(settings) as backends,
        serve_exporter(
            exporter_settings, backends, registry, span_metrics, receive_otlp=False, worker_health=worker_health
        ) as url,
    ):
        print(f"status page and API: {url}  metrics: {url}metrics", file=sys.stderr)
        if args.ingest:
            await _ingest(backends, args.ingest, "default")
        elif not args.no_sample:
            with resources.as_file(resources.files("embedding_jobs") / SAMPLE) as sample:
                await _ingest(backends, str(sample), "default")
        await _work(
            settings,
            backends,
            exit_when_idle=args.exit_when_idle,
            out=sys.stderr,
            processors=[MetricsSpanProcessor(span_metrics)],
            on_tracker=lambda tracker: worker_health.add_reader(worker_id(), lambda: tracking_snapshot(tracker)),
            watch=True,
            on_idle=lambda: print_summary(backends.store, sys.stdout),
        )
    return 0


async def cmd_exporter(settings: Settings, args: argparse.Namespace) -> int:
    """Serve /metrics, the API, the status page and the OTLP receiver until SIGTERM/SIGINT."""
    # Before anything opens or binds: a refused receiver is a configuration error, not a failure later.
    check_listener(settings.otlp_host, settings.otlp_token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = ExporterRegistry()
    span_metrics = SpanMetrics(registry, tenant_limit=settings.tenant_label_limit, detail=settings.metrics_detail)
    elect = settings.state_role == "elect"
    async with (
        open_backends(settings, state_lease=elect) as backends,
        serve_exporter(settings, backends, registry, span_metrics, receive_otlp=True),
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
    receive_otlp: bool,
    worker_health: WorkerHealth | None = None,
) -> AsyncIterator[str]:
    """Run the exporter app, and the OTLP receiver if asked, on their configured addresses; yield the app's URL."""
    producer = Producer(backends.store, backends.queue, get_tracer())

    async def enqueue(job: Job) -> None:
        # Its own message id, so duplicate detection cannot drop a manual retry of a job.
        retry_id = f"{job.id}.manual-{job.updated_at.strftime('%Y%m%dT%H%M%S%f')}"
        await producer.enqueue(JobMessage(job.id, job.tenant_id, job.shard_id, job.shard_type_id), message_id=retry_id)

    async def depth() -> dict[str, int]:
        d = await backends.queue.depth()
        return {"active": d.active, "scheduled": d.scheduled, "dead_letter": d.dead_letter}

    app = create_app(
        settings,
        backends.store,
        registry=registry,
        span_metrics=span_metrics,
        depth_source=depth,
        enqueue=enqueue,
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


async def _work(
    settings: Settings,
    backends: Backends,
    *,
    exit_when_idle: bool,
    out: TextIO,
    processors: Sequence[SpanProcessor] = (),
    on_tracker: Callable[[JobTracker], None] | None = None,
    watch: bool = False,
    on_idle: Callable[[], Awaitable[None]] | None = None,
) -> None:
    # First: it adopts the spooled writes of workers that died here, and may refuse the data dir.
    tracker = build_tracker(settings, backends.store)
    if on_tracker is not None:
        on_tracker(tracker)
    provider = create_tracer_provider("embedding-jobs-worker", settings.otlp_endpoint, processors, settings.otlp_token)
    meters = create_meter_provider(tracker, "embedding-jobs-worker", settings.otlp_endpoint, settings.otlp_token)
    embedder = build_embedder(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    consumer = Consumer(
        queue=backends.queue,
        tracker=tracker,
        shards=backends.shards,
        embedder=embedder,
        tracer=get_tracer(provider),
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
                await _watch(consumer, backends, stop, exit_when_idle, out, on_idle)
            await run
    finally:
        if reconciler is not None:
            reconciler.cancel()
            await asyncio.gather(reconciler, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await embedder.close()
        provider.shutdown()
        if meters is not None:
            # After the tracker's last flush: the final export carries the final counts.
            meters.shutdown()


async def _watch(
    consumer: Consumer,
    backends: Backends,
    stop: asyncio.Event,
    exit_when_idle: bool,
    out: TextIO,
    on_idle: Callable[[], Awaitable[None]] | None,
) -> None:
    """Show progress until stop; when the queue drains, report (and stop if asked to)."""
    progress = Progress("work", out)
    announced_idle = False
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        try:
            depth = await backends.queue.depth()
        except QueueError as exc:
            progress.show(f"completed {consumer.processed[Outcome.COMPLETED]} (queue depth unavailable: {exc})")
            continue
        done = consumer.processed
        progress.show(
            f"completed {done[Outcome.COMPLETED]}, retried {done[Outcome.FAILED]}, "
            f"dead-lettered {done[Outcome.DEAD_LETTERED]}, "
            f"in flight {consumer.in_flight}, queued {depth.active}, scheduled {depth.scheduled}"
        )
        idle = depth.active == 0 and depth.scheduled == 0 and consumer.in_flight == 0
        if idle and not announced_idle:
            progress.done("queue drained" + ("" if exit_when_idle else "; waiting for more work (Ctrl-C to stop)"))
            announced_idle = True
            if on_idle is not None:
                await on_idle()
            if exit_when_idle:
                stop.set()
        elif not idle:
            announced_idle = False


async def print_summary(store: JobStore, out: TextIO) -> None:
    """A per-tenant table of job counts."""
    print(file=out)
    print_stats(await store.stats_all(), out)


def print_stats(stats: Mapping[str, Mapping[JobStatus, int]], out: TextIO) -> None:
    """Job counts as a table: a row per tenant, a column per status."""
    columns = [s.value for s in JobStatus]
    print(f"{'tenant':<20}" + "".join(f"{c:>15}" for c in columns), file=out)
    for tenant in sorted(stats):
        print(f"{tenant:<20}" + "".join(f"{stats[tenant][JobStatus(c)]:>15}" for c in columns), file=out)


def print_jobs(jobs: Sequence[Job], out: TextIO) -> None:
    """A page of jobs as a table, newest first as the store lists them."""
    print(f"{'id':<40} {'status':<14} {'retries':>7}  {'updated':<26} shard", file=out)
    for job in jobs:
        updated = job.updated_at.isoformat(timespec="seconds")
        print(f"{job.id:<40} {job.status.value:<14} {job.retry_count:>7}  {updated:<26} {job.shard_id}", file=out)


async def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    """Print job stats or a page of jobs, as a table or JSON (--output)."""
    store = await open_job_store(settings)
    try:
        if args.action == "stats":
            stats = {args.tenant: await store.stats(args.tenant)} if args.tenant else await store.stats_all()
            if args.output == "json":
                print(json.dumps({t: {k.value: v for k, v in s.items()} for t, s in sorted(stats.items())}))
            else:
                print_stats(stats, sys.stdout)
            return 0
        if not args.tenant:
            raise ValueError("jobs list needs --tenant")
        status = JobStatus(args.status) if args.status else None
        page = await store.list(args.tenant, status=status, limit=args.limit)
        if args.output == "json":
            for job in page.items:
                print(json.dumps(job.to_json()))
        else:
            print_jobs(page.items, sys.stdout)
        return 0
    finally:
        await store.close()


async def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    """Print the effective settings with secrets masked."""
    values = settings.redacted()
    if args.output == "json":
        print(json.dumps(values, default=str))
    else:
        width = max(map(len, values))
        for name, value in values.items():
            print(f"{name:<{width}}  {value}")
    return 0


async def cmd_init_db(settings: Settings, args: argparse.Namespace) -> int:
    """Create or check the Cosmos DB database and containers."""
    if settings.store != "cosmos":
        raise ValueError("init-db sets up Cosmos DB: pass --store cosmos (the SQLite file sets itself up)")
    from embedding_jobs.cosmos import run_init_db

    for line in await run_init_db(settings):
        print(line)
    return 0


async def cmd_feeder(settings: Settings, args: argparse.Namespace) -> int:
    """Follow the shard store's changes until SIGTERM/SIGINT."""
    from worker.feeder import run_feeder

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    provider = create_tracer_provider("embedding-jobs-feeder", settings.otlp_endpoint, otlp_token=settings.otlp_token)
    try:
        async with open_backends(settings, feed=True) as backends:
            assert backends.feed is not None
            totals = await run_feeder(
                backends.feed,
                Producer(backends.store, backends.queue, get_tracer(provider)),
                stop,
                interval=args.poll_interval,
            )
    finally:
        provider.shutdown()
    print(f"feeder stopped: {totals}", file=sys.stderr)
    return 0


async def cmd_reconcile_dlq(settings: Settings, args: argparse.Namespace) -> int:
    """One reconcile pass over the dead-letter queue."""
    async with open_backends(settings) as backends:
        result = await reconcile_dead_letters(backends.queue, backends.store)
    print(
        f"scanned {result.scanned} dead-lettered message(s): marked {result.marked} job(s) dead_lettered, "
        f"{result.already_final} already final, {result.unknown} naming no job"
    )
    return 0


async def cmd_recount(settings: Settings, args: argparse.Namespace) -> int:
    """Rebuild counters and print them."""
    store = await open_job_store(settings)
    try:
        counts = await store.recount()
        print(json.dumps({t: {k.value: v for k, v in s.items()} for t, s in counts.items()}))
        return 0
    finally:
        await store.close()


async def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    """Delete finished jobs past the retention."""
    hours = args.older_than_hours if args.older_than_hours is not None else settings.retention_hours
    if hours <= 0:
        raise ValueError("set --older-than-hours or --retention-hours to a positive number")
    store = await open_job_store(settings)
    try:
        print(f"purged {await store.purge(timedelta(hours=hours))} finished job(s)")
        return 0
    finally:
        await store.close()


class Progress:
    """One status line, rewritten in place on a terminal and printed sparingly elsewhere."""

    def __init__(self, label: str, out: TextIO) -> None:
        self.label = label
        self.out = out
        self.tty = out.isatty()
        self._last = ""
        self._count = 0

    def show(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        self._count += 1
        if self.tty:
            print(f"\r\033[K[{self.label}] {text}", end="", file=self.out, flush=True)
        elif self._count % 10 == 1:
            print(f"[{self.label}] {text}", file=self.out, flush=True)

    def done(self, text: str) -> None:
        prefix = "\r\033[K" if self.tty else ""
        print(f"{prefix}[{self.label}] {text}", file=self.out, flush=True)
        self._last = ""


if __name__ == "__main__":
    raise SystemExit(main())
