"""Worker jobs/s on Service Bus, against the worker as it was at BEFORE and with one message per receive.

The worker is the real consume loop (`Consumer.run`) with the real `azure-servicebus` SDK
talking to the Service Bus test peer (`python -m tests.servicebus_peer`, its own process),
the hashing embedder, a SQLite job store and shard store in one file, the default
concurrency (4) and the default tracer (no exporter). Each run is a fresh process on a
fresh queue holding JOBS messages and a fresh file with their shards and pending jobs; the
figure is JOBS over the time from starting the loop to the last job completed and its
message settled. Three arms, interleaved: this code (receive up to the free slots per call);
this code with `receive_batch=1`; and the code at BEFORE (one message per receive call,
settlements at once on one connection), exported with `git archive` into a temporary
directory and run on the same bench code.

The job store is SQLite, not the Cosmos test server: the Cosmos server is a Node process
whose per-request cost would take CPU from the peer and the worker alike, the same in
every arm, so it only dilutes what this measures (the queue path).
Run: python -m bench servicebus [--jobs N] [--rounds N] [--before REV|""]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient

from bench.harness import Figure, interleaved, machine_load, ratios, report
from jobs.model import Job
from jobs.sqlite_store import SQLiteJobStore
from jobs.telemetry import Outcome
from worker.consumer import Consumer, ConsumerConfig
from worker.embedders.hashing import HashingEmbedder
from worker.messages import JobMessage
from worker.queue import ReceivedMessage
from worker.servicebus_queue import ServiceBusQueue
from worker.shards import Shard, SQLiteShardStore
from worker.tracing import create_tracer_provider, get_tracer
from worker.tracker import JobTracker

REPO = Path(__file__).resolve().parent.parent
JOBS = 1000
ROUNDS = 3
TARGET = 2.0
# The worker before batched receive and turn-taking on Service Bus connections.
BEFORE = "2dd6297"
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


class CountingQueue(ServiceBusQueue):
    """The Service Bus queue, counting receive calls that returned messages."""

    calls = 0

    async def receive(self, max_messages: int = 1, max_wait: float = 1.0) -> Sequence[ReceivedMessage]:
        """Receive, and count the call if it returned anything."""
        received = await super().receive(max_messages, max_wait)
        if received:
            type(self).calls += 1
        return received


async def _consume(
    directory: Path, connection_string: str, queue_name: str, jobs: int, config: ConsumerConfig
) -> float:
    """Seconds for the worker to complete every job in the queue."""
    store = await SQLiteJobStore.open(directory / "jobs.db")
    shards = await SQLiteShardStore.open(directory / "jobs.db")
    queue = await CountingQueue.from_connection_string(connection_string, queue_name).open()
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


def run_once(connection_string: str, jobs: int, receive_batch: int | None) -> tuple[float, int]:
    """One run on a fresh queue and file: jobs per second, and receive calls that returned messages."""
    config = ConsumerConfig()
    if receive_batch is not None:
        config = dataclasses.replace(config, receive_batch=receive_batch)
    name = f"bench-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_populate(Path(tmp), connection_string, name, jobs))
        seconds = asyncio.run(_consume(Path(tmp), connection_string, name, jobs, config))
    return jobs / seconds, CountingQueue.calls


@dataclass
class Arm:
    """One worker setup: the code it runs (a directory) and its receive batch; what each run measured."""

    tree: Path
    receive_batch: int | None = None
    rates: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    def runner(self, connection_string: str, jobs: int) -> Callable[[], float]:
        """A subject for `interleaved`: a run in a fresh process on this arm's code, in jobs/s."""

        def run() -> float:
            command = [sys.executable, str(Path(__file__).resolve()), "--one", connection_string, "--jobs", str(jobs)]
            if self.receive_batch is not None:
                command += ["--receive-batch", str(self.receive_batch)]
            # The script's own directory (bench/) comes first on sys.path; the tree's packages come next.
            env = {**os.environ, "PYTHONPATH": str(self.tree)}
            done = subprocess.run(
                command, env=env, cwd=self.tree, capture_output=True, text=True, timeout=900, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"a run on {self.tree} failed:\n{done.stderr}")
            rate, calls = done.stdout.split()[-2:]
            self.rates.append(float(rate))
            self.calls.append(int(calls))
            return float(rate)

        return run


@contextmanager
def exported(rev: str) -> Iterator[Path]:
    """The repository's tree at rev in a temporary directory (git archive: no worktree, no checkout)."""
    with tempfile.TemporaryDirectory(prefix="bench-before-") as tmp:
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp)


def main(argv: list[str] | None = None) -> None:
    """Print worker jobs/s now, against the code at BEFORE and against one message per receive call."""
    parser = argparse.ArgumentParser(prog="python -m bench servicebus")
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--before", default=BEFORE, help="git revision of the code to compare with; '' for none")
    parser.add_argument("--one", metavar="CONNECTION_STRING", help=argparse.SUPPRESS)
    parser.add_argument("--receive-batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args([] if argv is None else argv)
    if args.one:
        rate, calls = run_once(args.one, args.jobs, args.receive_batch)
        print(rate, calls, flush=True)
        return
    setup = f"{args.jobs} jobs, concurrency {ConsumerConfig().concurrency}, {args.rounds} rounds"
    with contextlib.ExitStack() as stack:
        arms = [Arm(REPO), Arm(REPO, receive_batch=1)]
        if args.before:
            arms.append(Arm(stack.enter_context(exported(args.before))))
        connection_string = stack.enter_context(peer_process())
        interleaved(args.rounds, *(arm.runner(connection_string, args.jobs) for arm in arms))
    now, one = arms[0], arms[1]
    for label, arm in (("now", now), ("now, receive_batch=1", one), (f"at {args.before}", arms[-1])):
        if arm is arms[-1] and not args.before:
            continue
        per_call = Figure.of([args.jobs / calls for calls in arm.calls])
        print(
            f"servicebus worker {label}: {Figure.of(arm.rates).show('jobs/s', digits=1)}, "
            f"{per_call.show('messages per receive call')}",
            flush=True,
        )
    if args.before:
        ratio = ratios(now.rates, arms[-1].rates)
        report(
            f"servicebus worker jobs/s against {args.before}",
            f"{Figure.of(now.rates).show('jobs/s', digits=1)}, {ratio.show('x')}; {setup}",
            ">= 2x",
            ratio.median >= TARGET,
        )
    ratio = ratios(now.rates, one.rates)
    print(
        f"servicebus worker jobs/s, receive up to the free slots against one message per call: "
        f"{ratio.show('x')}; {setup} | load {machine_load()}",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
