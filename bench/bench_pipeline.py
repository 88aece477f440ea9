"""The local pipeline against the bare embed loop: `embedding-jobs up --exit-when-idle` on 2000 shards.

Shards: the bundled sample cycled to 2000 with distinct ids over 10 tenants (bench/worker_rig.py),
the hashing embedder and every other setting at its default.

Subject, the work phase of `up`: in a fresh data directory, `embedding-jobs ingest FILE` first
(not timed), then the wall time of `embedding-jobs up --no-sample --exit-when-idle
--exporter-port 0`, less the wall time of the same command on an empty data directory in the
same round. The difference is the time to work 2000 jobs through the queue, the job store, the
shard store, the spans and the in-process metrics, without the process start, the exporter's
start, the first idle check or the shutdown. The job counts are then checked (`jobs stats`:
every job completed).

Baseline, the bare embed loop: chunk_text and embedder.embed over the same shards, one after
another, in batches of the embedder's max_batch_size, in a process of its own (so its caches
start as cold as the worker's), no queue, no store; timed inside that process, around the loop.

Rounds run the three in turn (empty `up`, full `up`, bare loop); the figure is the per-round
ratio of the pipeline's jobs/s to the bare loop's shards/s. Beside it, less sensitive to other
load on the machine: CPU per job (the `up` processes' user+system time, full less empty, over
2000) against the bare loop's CPU per shard. Run: python -m bench pipeline
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.harness import Figure, interleaved, ratios, report
from bench.worker_rig import REPO, cli_env, run_cli, sample_shards, write_jsonl
from embedding_jobs.backends import build_embedder, consumer_config
from jobs.settings import Settings
from worker.chunking import chunk_text
from worker.shards import Shard
from worker.sources import Rejected, read_shards

SHARDS = 2_000
ROUNDS = 5
TARGET = 0.6


def up_seconds(data_dir: Path, log: Path) -> tuple[float, float]:
    """Wall time and CPU time of `embedding-jobs up --no-sample --exit-when-idle` on data_dir."""
    started = time.perf_counter()
    cpu = run_cli("up", "--no-sample", "--exit-when-idle", "--data-dir", str(data_dir), "--exporter-port", "0", log=log)
    return time.perf_counter() - started, cpu


def completed_jobs(data_dir: Path, log: Path) -> int:
    """Completed jobs over every tenant, from `embedding-jobs jobs stats --output json`."""
    run_cli("jobs", "stats", "--output", "json", "--data-dir", str(data_dir), log=log)
    stats = json.loads(log.read_text())
    return sum(int(counts.get("completed", 0)) for counts in stats.values())


async def bare_loop(shards: Sequence[Shard], settings: Settings) -> tuple[float, float]:
    """Wall and CPU seconds to chunk and embed every shard as the consumer does, with nothing else around it."""
    embedder = build_embedder(settings)
    config = consumer_config(settings)
    limit = embedder.max_input_tokens
    budget = min(config.chunk_max_tokens, limit) if limit else config.chunk_max_tokens
    overlap = min(config.chunk_overlap_tokens, budget // 2)
    size = embedder.max_batch_size
    started, cpu = time.perf_counter(), time.process_time()
    for shard in shards:
        chunks = [c.text for c in chunk_text(shard.text, max_tokens=budget, overlap_tokens=overlap)]
        for i in range(0, len(chunks), size):
            await embedder.embed(chunks[i : i + size])
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await embedder.close()
    return elapsed, cpu


def bare_main(source: Path) -> None:
    """In the bare loop's own process: read the shards, print the loop's wall and CPU seconds."""
    shards = [item for item in read_shards(str(source)) if not isinstance(item, Rejected)]
    print(*asyncio.run(bare_loop(shards, Settings())))


def bare_seconds(source: Path) -> tuple[float, float]:
    """The bare loop's wall and CPU seconds over source, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_pipeline", "--bare", str(source)],
        env=cli_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    wall, cpu = done.stdout.split()
    return float(wall), float(cpu)


class Rounds:
    """The three measurements of each round, on fresh data directories under root."""

    def __init__(self, root: Path, source: Path) -> None:
        self.root = root
        self.source = source
        self.round = 0
        # CPU seconds per run, beside the wall times the subjects return.
        self.cpu: dict[str, list[float]] = {"empty": [], "full": [], "bare": []}

    def empty(self) -> float:
        """`up` with nothing to do: what the work phase is measured net of."""
        self.round += 1
        wall, cpu = up_seconds(self.root / f"empty-{self.round}", self.root / "empty.log")
        self.cpu["empty"].append(cpu)
        return wall

    def full(self) -> float:
        """`up` over the ingested shards; raises unless every job completed."""
        data_dir = self.root / f"full-{self.round}"
        run_cli("ingest", str(self.source), "--data-dir", str(data_dir), log=self.root / "ingest.log")
        wall, cpu = up_seconds(data_dir, self.root / "up.log")
        self.cpu["full"].append(cpu)
        completed = completed_jobs(data_dir, self.root / "stats.log")
        if completed != SHARDS:
            raise RuntimeError(f"expected {SHARDS} completed jobs, the store counts {completed}")
        return wall

    def bare(self) -> float:
        """The bare loop over the same shards."""
        wall, cpu = bare_seconds(self.source)
        self.cpu["bare"].append(cpu)
        return wall

    def subjects(self) -> Sequence[Callable[[], float]]:
        """In the order each round runs them."""
        return (self.empty, self.full, self.bare)


def main() -> None:
    """Print the pipeline's jobs/s, the bare loop's shards/s and their ratio."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        source = write_jsonl(root / "shards.jsonl", sample_shards(SHARDS))
        rounds = Rounds(root, source)
        empty, full, bare = interleaved(ROUNDS, *rounds.subjects())
    work = [f - e for f, e in zip(full, empty, strict=True)]
    pipeline = [SHARDS / w for w in work]
    loop = [SHARDS / b for b in bare]
    ratio = Figure.of([p / b for p, b in zip(pipeline, loop, strict=True)])
    cpu = rounds.cpu
    job_cpu = [(f - e) / SHARDS for f, e in zip(cpu["full"], cpu["empty"], strict=True)]
    shard_cpu = [b / SHARDS for b in cpu["bare"]]
    report(
        f"`up --exit-when-idle` on {SHARDS} shards against the bare embed loop",
        f"{ratio.show('x')}; pipeline {Figure.of(pipeline).show('jobs/s', digits=0)}, bare loop "
        f"{Figure.of(loop).show('shards/s', digits=0)}; `up` {Figure.of(full).show('s', digits=1)} less "
        f"{Figure.of(empty).show('s', digits=1)} idle; CPU per job {Figure.of(job_cpu).show('ms', 1e3)}, "
        f"per bare shard {Figure.of(shard_cpu).show('ms', 1e3)}, ratio "
        f"{ratios(shard_cpu, job_cpu).show('x')} ({ROUNDS} rounds)",
        f">= {TARGET}x",
        ratio.median >= TARGET,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"] and len(sys.argv) == 3:
        bare_main(Path(sys.argv[2]))
    else:
        main()
