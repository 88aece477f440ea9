"""The local pipeline against the bare embed loop: `embedding-jobs up --exit-when-idle` on 2000 shards.

Shards: the bundled sample cycled to 2000 with distinct ids over 10 tenants (bench/worker_rig.py),
the hashing embedder and every other setting at its default.

Subject, the work phase of `up`: in a fresh data directory, `embedding-jobs ingest FILE` first
(not timed), then `embedding-jobs up --no-sample --exit-when-idle --exporter-port 0`, timed
from the line it prints once its exporter listens (just before the work starts) to the line it
prints when its progress check finds the queue drained, both read from its stderr as they come.
That is the time to work 2000 jobs through the queue, the job store, the shard store, the spans
and the in-process metrics, without the process start or the shutdown; it includes up to one
progress interval (0.5 s) before the drain is noticed, which only counts against the pipeline.
The job counts are then checked (`jobs stats`: every job completed). Each round also runs `up`
on an empty data directory: the figure is printed a second way too, as whole-process wall time
less the empty run's (the way the first figures were taken; process start-up makes it noisier).

Baseline, the bare embed loop: chunk_text and embedder.embed over the same shards, one after
another, in batches of the embedder's max_batch_size, in a process of its own (so its caches
start as cold as the worker's), no queue, no store; timed inside that process, around the loop.

Rounds run the three in turn (empty `up`, full `up`, bare loop); the figure is the per-round
ratio of the pipeline's jobs/s to the bare loop's shards/s. Beside it, less sensitive to other
load on the machine: CPU per job (the `up` processes' user+system time, full run less empty
run, over 2000) against the bare loop's CPU per shard. Run: python -m bench pipeline
"""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


# `up` prints the first once its exporter listens, just before it ingests (nothing, here) and
# works; the second when its progress check (every 0.5 s) finds the queue drained.
LISTENING = b"status page and API:"
DRAINED = b"[work] queue drained"


@dataclass(frozen=True, slots=True)
class UpRun:
    """One `up --exit-when-idle`: its wall time, its CPU time, and the time from listening to drained."""

    wall: float
    cpu: float
    work: float


def run_up(data_dir: Path, log: Path) -> UpRun:
    """Run `embedding-jobs up --no-sample --exit-when-idle` on data_dir, timing its stderr lines as they come."""
    argv = [sys.executable, "-m", "embedding_jobs", "up", "--no-sample", "--exit-when-idle"]
    argv += ["--data-dir", str(data_dir), "--exporter-port", "0"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    listening = drained = None
    with log.open("wb") as out:
        # Unbuffered: each line is read, and timed, as soon as the process writes it.
        up = subprocess.Popen(argv, env=cli_env(), cwd=REPO, stdout=out, stderr=subprocess.PIPE, bufsize=0)
        assert up.stderr is not None
        for line in up.stderr:
            now = time.perf_counter()
            out.write(line)
            if listening is None and line.startswith(LISTENING):
                listening = now
            elif drained is None and DRAINED in line:
                drained = now
        returncode = up.wait()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if returncode != 0 or listening is None or drained is None:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"`up` exited with {returncode} (listening and drained lines: {listening}, {drained}):\n{tail}"
        )
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return UpRun(wall=wall, cpu=cpu, work=drained - listening)


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
        self.empty_runs: list[UpRun] = []
        self.full_runs: list[UpRun] = []
        self.bare_cpu: list[float] = []

    def empty(self) -> float:
        """`up` with nothing to do: what its wall and CPU time are measured net of."""
        self.round += 1
        self.empty_runs.append(run_up(self.root / f"empty-{self.round}", self.root / "empty.log"))
        return self.empty_runs[-1].work

    def full(self) -> float:
        """`up` over the ingested shards, listening to drained; raises unless every job completed."""
        data_dir = self.root / f"full-{self.round}"
        run_cli("ingest", str(self.source), "--data-dir", str(data_dir), log=self.root / "ingest.log")
        self.full_runs.append(run_up(data_dir, self.root / "up.log"))
        completed = completed_jobs(data_dir, self.root / "stats.log")
        if completed != SHARDS:
            raise RuntimeError(f"expected {SHARDS} completed jobs, the store counts {completed}")
        return self.full_runs[-1].work

    def bare(self) -> float:
        """The bare loop over the same shards."""
        wall, cpu = bare_seconds(self.source)
        self.bare_cpu.append(cpu)
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
        _, work, bare = interleaved(ROUNDS, *rounds.subjects())
    loop = [SHARDS / b for b in bare]
    pipeline = [SHARDS / w for w in work]
    ratio = Figure.of([p / b for p, b in zip(pipeline, loop, strict=True)])
    # The same work phase measured as whole-process wall time, less that of the empty run.
    net = [f.wall - e.wall for f, e in zip(rounds.full_runs, rounds.empty_runs, strict=True)]
    net_ratio = Figure.of([(SHARDS / n) / b for n, b in zip(net, loop, strict=True)])
    job_cpu = [(f.cpu - e.cpu) / SHARDS for f, e in zip(rounds.full_runs, rounds.empty_runs, strict=True)]
    shard_cpu = [b / SHARDS for b in rounds.bare_cpu]
    report(
        f"`up --exit-when-idle` on {SHARDS} shards against the bare embed loop",
        f"{ratio.show('x')}: pipeline {Figure.of(pipeline).show('jobs/s', digits=0)} (listening to drained"
        f" {Figure.of(work).show('s', digits=2)}), bare loop {Figure.of(loop).show('shards/s', digits=0)};"
        f" by whole-process wall time less an empty run {net_ratio.show('x')}; CPU per job"
        f" {Figure.of(job_cpu).show('ms', 1e3)}, per bare shard {Figure.of(shard_cpu).show('ms', 1e3)},"
        f" bare/up {ratios(shard_cpu, job_cpu).show('x')} ({ROUNDS} rounds)",
        f">= {TARGET}x",
        ratio.median >= TARGET,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare"] and len(sys.argv) == 3:
        bare_main(Path(sys.argv[2]))
    else:
        main()
