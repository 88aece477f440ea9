"""Worker jobs/s on Service Bus: batched receive against one message per receive call.

The worker is the real consume loop (`Consumer.run`) with the real `azure-servicebus` SDK
talking to the Service Bus test peer (`python -m tests.servicebus_peer`, its own process,
so its CPU is not the worker's), the hashing embedder, a SQLite job store and shard store
in one file, the default concurrency (4) and the default tracer (no exporter). Each run
gets a fresh queue holding JOBS messages and a fresh file with their shards and pending
jobs; the figure is JOBS over the time from starting the loop to the last job completed
and its message settled. The subject receives up to the free slots per call (the default);
the baseline is the same worker with `receive_batch=1`, as the loop was before. Rounds
are interleaved.

The job store is SQLite, not the Cosmos test server: the Cosmos server is a Node process
whose per-request cost would take the second core from the peer and the worker alike, and
it is the same in both arms, so it only dilutes what this measures (the receive path).

On a checkout whose ConsumerConfig has no `receive_batch` (before batched receive), only
the baseline runs: that is "before" in absolute terms.
Run: python -m bench servicebus [--jobs N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient

from bench.harness import Figure, interleaved, ratios, report
from jobs.model import Job
from jobs.sqlite_store import SQLiteJobStore
from jobs.telemetry import Outcome
from worker.consumer import Consumer, ConsumerConfig
from worker.embedders.hashing import HashingEmbedder
from worker.messages import JobMessage
from worker.servicebus_queue import ServiceBusQueue
from worker.shards import Shard, SQLiteShardStore
from worker.tracing import create_tracer_provider, get_tracer
from worker.tracker import JobTracker

REPO = Path(__file__).resolve().parent.parent
JOBS = 1000
ROUNDS = 3
TARGET = 2.0
TENANTS = 10
SEND_BATCH = 100
# About 250 words in three paragraphs: one chunk at the default 512-token budget.
TEXT = "\n\n".join(
    " ".join(f"word{(p * 97 + w * 13) % 541} embedding pipeline shard text" for w in range(16)) for p in range(3)
)


@contextmanager
def peer_process() -> Iterator[str]:
    """The Service Bus test peer in its own process; yields its connection string."""
    with subprocess.Popen(
        [sys.executable, "-m", "tests.servicebus_peer", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            if "connection_string=" not in line:
                raise RuntimeError(f"the Service Bus test peer did not start: {line!r}")
            yield line.split("connection_string=", 1)[1].strip()
        finally:
            process.terminate()
            process.wait(timeout=30)


async def _populate(directory: Path, connection_string: str, queue_name: str, jobs: int) -> None:
    """Shards and pending jobs in the file, their messages in the queue (not timed)."""
    store = await SQLiteJobStore.open(directory / "jobs.db")
    shards = await SQLiteShardStore.open(directory / "jobs.db")
    messages = []
    try:
        for i in range(jobs):
            tenant, shard_id = f"tenant-{i % TENANTS}", f"shard-{i}"
            await shards.put(Shard(tenant_id=tenant, id=shard_id, shard_type_id="document", text=f"{i} {TEXT}"))
            msg = JobMessage(job_id=f"job-{i}", tenant_id=tenant, shard_id=shard_id, shard_type_id="document")
            job = Job.new(job_id=msg.job_id, tenant_id=tenant, shard_id=shard_id, shard_type_id="document")
            await store.create(job)
            body = msg.to_body()
            messages.append(ServiceBusMessage(body, message_id=msg.message_id, content_type="application/json"))
    finally:
        await shards.close()
        await store.close()
    client = ServiceBusClient.from_connection_string(connection_string)
    async with client, client.get_queue_sender(queue_name) as sender:
        for start in range(0, len(messages), SEND_BATCH):
            await sender.send_messages(messages[start : start + SEND_BATCH])


async def _consume(
    directory: Path, connection_string: str, queue_name: str, jobs: int, config: ConsumerConfig
) -> float:
    """Seconds for the worker to complete every job in the queue."""
    store = await SQLiteJobStore.open(directory / "jobs.db")
    shards = await SQLiteShardStore.open(directory / "jobs.db")
    queue = await ServiceBusQueue.from_connection_string(connection_string, queue_name).open()
    provider = create_tracer_provider("bench-servicebus")
    tracker = JobTracker(store)
    consumer = Consumer(
        queue=queue,
        tracker=tracker,
        shards=shards,
        embedder=HashingEmbedder(),
        tracer=get_tracer(provider),
        config=config,
    )
    stop = asyncio.Event()
    try:
        async with tracker.running():
            started = time.perf_counter()
            run = asyncio.create_task(consumer.run(stop))
            # The consumer has no event for "n jobs done"; its counter is read every 5 ms.
            while consumer.processed[Outcome.COMPLETED] < jobs and not run.done():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            stop.set()
            await run
    finally:
        await queue.close()
        await shards.close()
        await store.close()
        provider.shutdown()
    others = {outcome.value: n for outcome, n in consumer.processed.items() if n and outcome is not Outcome.COMPLETED}
    if consumer.processed[Outcome.COMPLETED] != jobs or others:
        raise RuntimeError(f"expected {jobs} completed jobs, got {dict(consumer.processed)}")
    return elapsed


def run_once(connection_string: str, jobs: int, receive_batch: int | None) -> float:
    """One run on a fresh queue and file: jobs per second."""
    config = ConsumerConfig()
    if receive_batch is not None:
        config = dataclasses.replace(config, receive_batch=receive_batch)
    name = f"bench-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_populate(Path(tmp), connection_string, name, jobs))
        seconds = asyncio.run(_consume(Path(tmp), connection_string, name, jobs, config))
    return jobs / seconds


def subject(connection_string: str, jobs: int, receive_batch: int | None, tree: Path = REPO) -> Callable[[], float]:
    """A run in a fresh process on the code of `tree` (this checkout, or another one for "before")."""

    def run() -> float:
        command = [sys.executable, str(Path(__file__).resolve()), "--one", connection_string, "--jobs", str(jobs)]
        if receive_batch is not None:
            command += ["--receive-batch", str(receive_batch)]
        # -P-less: the script's own directory is bench/, so the tree's packages come from PYTHONPATH.
        env = {**os.environ, "PYTHONPATH": str(tree)}
        done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"a run on {tree} failed:\n{done.stderr}")
        return float(done.stdout.split()[-1])

    return run


def main(argv: list[str] | None = None) -> None:
    """Print worker jobs/s with batched receive against one message per call (and, given, the code before)."""
    parser = argparse.ArgumentParser(prog="python -m bench servicebus")
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--before", type=Path, help="a checkout of the code before batched receive (e.g. a git worktree of 2dd6297)"
    )
    parser.add_argument("--one", metavar="CONNECTION_STRING", help=argparse.SUPPRESS)
    parser.add_argument("--receive-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.one:
        print(run_once(args.one, args.jobs, args.receive_batch), flush=True)
        return
    concurrency = ConsumerConfig().concurrency
    with peer_process() as connection_string:
        subjects = [subject(connection_string, args.jobs, None), subject(connection_string, args.jobs, 1)]
        if args.before is not None:
            subjects.append(subject(connection_string, args.jobs, None, args.before.resolve()))
        results = interleaved(args.rounds, *subjects)
    now, one = results[0], results[1]
    setup = f"{args.jobs} jobs, concurrency {concurrency}, {args.rounds} rounds"
    print(f"servicebus worker, one message per receive call: {Figure.of(one).show('jobs/s', digits=1)}", flush=True)
    if args.before is not None:
        before = results[2]
        print(f"servicebus worker, code at {args.before}: {Figure.of(before).show('jobs/s', digits=1)}", flush=True)
        report(
            "servicebus worker jobs/s against the code before",
            f"{Figure.of(now).show('jobs/s', digits=1)}, {ratios(now, before).show('x')}; {setup}",
            ">= 2x",
            ratios(now, before).median >= TARGET,
        )
    ratio = ratios(now, one)
    report(
        "servicebus worker jobs/s, batched receive against one message per call",
        f"{Figure.of(now).show('jobs/s', digits=1)}, {ratio.show('x')}; {setup}",
        ">= 2x",
        ratio.median >= TARGET,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
