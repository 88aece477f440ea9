"""`jobs`: job stats and pages of jobs, as tables or JSON; the tables `up` prints too."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from embedding_jobs.backends import open_job_store
from jobs.model import Job, JobStatus
from jobs.settings import Settings
from jobs.store import JobStore


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
