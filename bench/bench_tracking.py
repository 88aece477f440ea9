"""What job tracking costs the worker: throughput with the real SQLite job store against a store that does nothing.

Every arm runs the real Consumer, LocalQueue and SQLiteShardStore on one SQLite file built the
way `embedding-jobs worker` builds them (embedding_jobs.backends), a real JobTracker
(build_tracker, with its spool under the data directory), concurrency 8, and an embedder that
waits 20 ms per batch: it stands for a remote model call, so what the worker itself does per
job (its CPU, thread hand-offs, SQLite transactions) is what limits throughput. The arms
(Tracking):

- on (as shipped): the tracker writes to the real SQLiteJobStore, and on one SQLite file a
  job's writes share transactions with its queue and shard writes (worker/local_path.py);
- on (writes not merged): the same store, every write its own transaction;
- off, the baseline: the tracker writes to NullJobStore, whose operations do nothing. With no
  job record to merge them with, the queue's and shards' writes are their own transactions.

Each run starts from a copy of one seeded data directory (2000 shards, their pending job
records and messages, over 10 tenants), so every arm finds the same file. A run's time goes
from starting the consume loop to the last job's outcome; a tracked run's records are then
checked (every job completed in the store's counters). Interleaved rounds after a short
warm-up; the figure is throughput with tracking over throughput without, per round. Beside it,
less sensitive to other load on the machine: the process's CPU time per job (all threads)
without tracking over with it. Run: python -m bench tracking
"""

from __future__ import annotations

import asyncio
import builtins
import gc
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from enum import Enum
from pathlib import Path

from bench.harness import Figure, interleaved, machine_load, ratios, report
from bench.worker_rig import sample_shards
from embedding_jobs.backends import build_tracker, consumer_config, open_backends
from jobs.errors import JobNotFoundError
from jobs.model import Job, JobMetadata, JobStatus
from jobs.settings import Settings
from jobs.store import UNSET, JobStore, Page, StuckJobs, empty_stats
from jobs.telemetry import Outcome
from worker.consumer import Consumer
from worker.producer import Producer, ingest_shard
from worker.shards import Shard
from worker.tracing import create_tracer_provider, get_tracer

JOBS = 2_000
CONCURRENCY = 8
EMBED_SECONDS = 0.020
DIMENSIONS = 256
ROUNDS = 7
WARM_UP_JOBS = 200
TARGET = 0.95


class SleepEmbedder:
    """An embedder that waits EMBED_SECONDS per batch, like a remote model call, and returns fixed vectors."""

    def __init__(self, dimensions: int = DIMENSIONS, batch_size: int = 16) -> None:
        self._vector = [1.0 / dimensions**0.5] * dimensions
        self._batch_size = batch_size

    @property
    def model(self) -> str:
        """The model name recorded on completed jobs."""
        return "sleep-20ms"

    @property
    def max_input_tokens(self) -> int | None:
        """No input limit: chunks follow the configured budget."""
        return None

    @property
    def max_batch_size(self) -> int:
        """Texts per call, as for a remote endpoint."""
        return self._batch_size

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Wait, then one (shared, unit-length) vector per text."""
        await asyncio.sleep(EMBED_SECONDS)
        return [self._vector] * len(texts)

    async def close(self) -> None:
        """Nothing to release."""


class NullJobStore:
    """A JobStore whose operations do nothing: what the worker costs with tracking taken away."""

    async def create(self, job: Job) -> Job:
        """Store nothing; the job as given."""
        return job

    async def transition(
        self,
        tenant_id: str,
        job_id: str,
        from_status: JobStatus,
        to_status: JobStatus,
        *,
        error: object = UNSET,
        retry_count: int | None = None,
        metadata: JobMetadata | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Apply nothing."""

    async def get(self, tenant_id: str, job_id: str) -> Job:
        """There are no jobs."""
        raise JobNotFoundError(tenant_id, job_id)

    async def list(
        self, tenant_id: str, status: JobStatus | None = None, limit: int = 50, continuation: str | None = None
    ) -> Page:
        """An empty page."""
        return Page(items=[], continuation=None)

    async def stats(self, tenant_id: str) -> dict[JobStatus, int]:
        """Zero counts."""
        return empty_stats()

    async def stats_all(self) -> dict[str, dict[JobStatus, int]]:
        """No tenants."""
        return {}

    async def stuck(
        self, older_than: timedelta, statuses: Sequence[JobStatus] = (JobStatus.PENDING, JobStatus.PROCESSING)
    ) -> builtins.list[StuckJobs]:
        """Nothing is stuck."""
        return []

    async def purge(self, older_than: timedelta, tenant_id: str | None = None) -> int:
        """Nothing to delete."""
        return 0

    async def recount(self, tenant_id: str | None = None) -> dict[str, dict[JobStatus, int]]:
        """Nothing to count."""
        return {}

    async def ping(self) -> None:
        """Always answers."""

    async def close(self) -> None:
        """Nothing to release."""


def settings_for(data_dir: Path) -> Settings:
    """The worker's default settings on data_dir, at the benchmark's concurrency."""
    settings = Settings(data_dir=data_dir, concurrency=CONCURRENCY)
    settings.validate()
    return settings


async def seed(data_dir: Path, shards: Sequence[Shard]) -> None:
    """Save the shards and enqueue their jobs (pending records and messages) as `embedding-jobs ingest` does."""
    provider = create_tracer_provider("bench-ingest")
    async with open_backends(settings_for(data_dir)) as backends:
        producer = Producer(backends.store, backends.queue, get_tracer(provider))
        for shard in shards:
            if not await ingest_shard(backends.shards, producer, shard):
                raise RuntimeError(f"shard {shard.id} was not enqueued")
    provider.shutdown()


class Tracking(Enum):
    """Where the tracker writes, and how the consumer writes on the local path."""

    # The real store, the worker as it ships: on one SQLite file a job's writes merge (worker/local_path.py).
    ON = "on (as shipped)"
    # The real store, every write in its own transaction as without the merge.
    SEPARATE = "on (writes not merged)"
    # NullJobStore. There is no job record to merge the queue and shard writes with, so they
    # stay separate transactions: tracking off is the worker without any job store.
    OFF = "off"


async def work(data_dir: Path, jobs: int, tracking: Tracking) -> tuple[float, float]:
    """Wall and CPU seconds (the whole process) for the consume loop to finish `jobs` queued jobs."""
    settings = settings_for(data_dir)
    provider = create_tracer_provider("bench-worker")
    tracked = tracking is not Tracking.OFF
    async with open_backends(settings, for_worker=True) as backends:
        store: JobStore = backends.store if tracked else NullJobStore()
        tracker = build_tracker(settings, store)
        consumer = Consumer(
            queue=backends.queue,
            tracker=tracker,
            shards=backends.shards,
            embedder=SleepEmbedder(),
            tracer=get_tracer(provider),
            config=replace(consumer_config(settings), merge_local_writes=tracking is Tracking.ON),
        )
        stop = asyncio.Event()
        async with tracker.running():
            started, cpu = time.perf_counter(), time.process_time()
            run = asyncio.create_task(consumer.run(stop))
            # The consumer only counts outcomes; polling them every 5 ms costs every arm alike.
            while sum(consumer.processed.values()) < jobs and not run.done():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            stop.set()
            await run
        if consumer.processed[Outcome.COMPLETED] != jobs:
            raise RuntimeError(f"expected {jobs} completed jobs, the consumer reports {consumer.processed}")
        if tracked:
            completed = sum(counts[JobStatus.COMPLETED] for counts in (await backends.store.stats_all()).values())
            if completed != jobs:
                raise RuntimeError(f"expected {jobs} completed job records, the store counts {completed}")
    provider.shutdown()
    return elapsed, cpu


def throughput(template: Path, scratch: Path, jobs: int, tracking: Tracking, cpu: list[float]) -> Callable[[], float]:
    """A subject: jobs/s of one run on a fresh copy of the seeded data directory; its CPU per job goes to cpu."""

    def subject() -> float:
        data_dir = scratch / "run"
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(template, data_dir)
        gc.collect()
        seconds, used = asyncio.run(work(data_dir, jobs, tracking))
        shutil.rmtree(data_dir)
        cpu.append(used / jobs)
        return jobs / seconds

    return subject


def main() -> None:
    """Print jobs/s with tracking on and off, their ratio, and the same for unmerged writes."""
    arms = tuple(Tracking)
    cpu: dict[Tracking, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        root = Path(tmp)
        shards = sample_shards(JOBS)
        template, warm = root / "seeded", root / "warm"
        asyncio.run(seed(template, shards))
        asyncio.run(seed(warm, shards[:WARM_UP_JOBS]))
        # One short run of each first: imports, caches and the allocator settle before timing.
        interleaved(1, *(throughput(warm, root, WARM_UP_JOBS, arm, []) for arm in arms))
        rates = dict(
            zip(
                arms,
                interleaved(ROUNDS, *(throughput(template, root, JOBS, arm, cpu[arm]) for arm in arms)),
                strict=True,
            )
        )
    off = Tracking.OFF
    for arm in (Tracking.ON, Tracking.SEPARATE):
        ratio = ratios(rates[arm], rates[off])
        name = (
            f"tracking {arm.value} / off, throughput, {JOBS} jobs, {EMBED_SECONDS * 1000:.0f} ms embedder,"
            f" concurrency {CONCURRENCY}"
        )
        figure = (
            f"{ratio.show('x')}: {Figure.of(rates[arm]).show('jobs/s', digits=0)} against"
            f" {Figure.of(rates[off]).show('jobs/s', digits=0)}; CPU per job {Figure.of(cpu[arm]).show('ms', 1e3)}"
            f" against {Figure.of(cpu[off]).show('ms', 1e3)}, off / on {ratios(cpu[off], cpu[arm]).show('x')}"
            f" ({ROUNDS} rounds)"
        )
        if arm is Tracking.ON:
            report(name, figure, f">= {TARGET}", ratio.median >= TARGET)
        else:
            # No target: this arm shows what merging the local writes gives.
            print(f"{name}: {figure} | load {machine_load()}", flush=True)


if __name__ == "__main__":
    main()
