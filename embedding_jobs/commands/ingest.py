"""Getting work onto the queue: `ingest` (a file, stdin or a folder) and `feeder` (the shard store's changes)."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from opentelemetry import trace

from embedding_jobs.backends import Backends, open_backends
from embedding_jobs.progress import Progress
from embedding_jobs.runtime import stop_on_signals, tracer_provider
from jobs.settings import Settings
from worker.producer import Producer, ingest_shard
from worker.sources import Rejected, read_shards
from worker.tracing import get_tracer


async def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    """Save shards from a source and enqueue their jobs."""
    with tracer_provider(settings, "embedding-jobs-ingest") as provider:
        async with open_backends(settings) as backends:
            rejected = await run_ingest(backends, get_tracer(provider), args.source, args.tenant)
    return 1 if rejected else 0


async def run_ingest(
    backends: Backends, tracer: trace.Tracer, source: str, tenant: str, out: TextIO = sys.stderr
) -> int:
    """Save the shards of source and enqueue a job for each new or changed one; how many were rejected."""
    producer = Producer(backends.store, backends.queue, tracer)
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


async def cmd_feeder(settings: Settings, args: argparse.Namespace) -> int:
    """Follow the shard store's changes until SIGTERM/SIGINT."""
    from worker.feeder import run_feeder

    with stop_on_signals() as stop, tracer_provider(settings, "embedding-jobs-feeder") as provider:
        async with open_backends(settings, feed=True) as backends:
            assert backends.feed is not None
            totals = await run_feeder(
                backends.feed,
                Producer(backends.store, backends.queue, get_tracer(provider)),
                stop,
                interval=args.poll_interval,
            )
    print(f"feeder stopped: {totals}", file=sys.stderr)
    return 0
