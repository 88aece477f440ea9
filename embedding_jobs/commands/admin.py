"""Operations on the store and queue: `init-db`, `reconcile-dlq`, `recount`, `purge`; and `config`."""

from __future__ import annotations

import argparse
import json
from datetime import timedelta

from embedding_jobs.backends import open_backends, open_job_store
from jobs.settings import Settings
from worker.reconciler import reconcile_dead_letters


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
