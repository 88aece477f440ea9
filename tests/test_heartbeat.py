"""The worker's liveness signal: a real worker process beats, and the probe command sees it stop."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.components import wait_for, wait_until
from tests.helpers.cli import cli_env, run_cli
from tests.helpers.embeddings import API_KEY, FakeEmbeddingsAPI, api

# The embeddings endpoint that holds a request until released, shared with tests/test_embedders.py.
__all__ = ["api"]


def probe(path: Path, max_age: float) -> subprocess.CompletedProcess[str]:
    """The liveness probe's command, as the chart runs it in the worker container."""
    return subprocess.run(
        [sys.executable, "-m", "worker.heartbeat", "--max-age", str(max_age), str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """An idle `embedding-jobs worker` on an empty local queue, with its heartbeat file; stopped with SIGTERM."""
    heartbeat = tmp_path / "worker-heartbeat"
    env = cli_env(tmp_path, EMBEDDING_JOBS_HEARTBEAT_FILE=str(heartbeat))
    # A file, not a pipe: nobody reads stderr while it runs, and a full pipe would block it.
    with tempfile.TemporaryFile(dir=tmp_path) as log:
        process = subprocess.Popen([sys.executable, "-m", "embedding_jobs", "worker"], env=env, stderr=log)
        try:
            yield process, heartbeat
        finally:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            returncode = process.wait(timeout=30)
            log.seek(0)
            assert returncode == 0, log.read().decode(errors="replace")


def test_an_idle_worker_keeps_touching_its_heartbeat_and_the_probe_passes(
    worker: tuple[subprocess.Popen[bytes], Path],
) -> None:
    _, heartbeat = worker
    wait_for(heartbeat.exists, 20, "the consume loop's first heartbeat")
    first = heartbeat.stat().st_mtime_ns
    # An empty queue: only the loop turning moves the file's time on.
    wait_for(lambda: heartbeat.stat().st_mtime_ns > first, 10, "a second heartbeat of the idle loop")
    result = probe(heartbeat, 5)
    assert (result.returncode, result.stderr) == (0, "")


def test_a_frozen_worker_fails_the_probe_and_passes_again_once_it_runs(
    worker: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, heartbeat = worker
    wait_for(heartbeat.exists, 20, "the consume loop's first heartbeat")
    assert probe(heartbeat, 2).returncode == 0
    # SIGSTOP freezes the process as a hung event loop would: nothing beats, nothing else notices.
    process.send_signal(signal.SIGSTOP)
    wait_for(lambda: probe(heartbeat, 2).returncode == 1, 15, "the probe to see a stale heartbeat")
    stale = probe(heartbeat, 2)
    assert "stale heartbeat" in stale.stderr
    assert str(heartbeat) in stale.stderr
    process.send_signal(signal.SIGCONT)
    wait_for(lambda: probe(heartbeat, 2).returncode == 0, 15, "the probe to pass once the loop runs again")


def test_the_probe_fails_while_there_is_no_heartbeat_file(tmp_path: Path) -> None:
    result = probe(tmp_path / "never-written", 60)
    assert result.returncode == 1
    assert "no heartbeat" in result.stderr


def test_no_heartbeat_setting_writes_no_file(tmp_path: Path) -> None:
    corpus = '{"tenantId": "acme", "shardId": "s1", "text": "one shard"}'
    ingest = subprocess.run(
        [sys.executable, "-m", "embedding_jobs", "ingest", "-"],
        input=corpus,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert ingest.returncode == 0, ingest.stderr
    before = set(tmp_path.rglob("*"))
    run = subprocess.run(
        [sys.executable, "-m", "embedding_jobs", "worker", "--exit-when-idle"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert not [path for path in set(tmp_path.rglob("*")) - before if "heartbeat" in path.name]


@pytest.mark.parametrize("then", ["release", "drain"])
async def test_a_worker_whose_every_slot_is_busy_keeps_beating_and_beats_while_it_drains(
    api: FakeEmbeddingsAPI, tmp_path: Path, then: str
) -> None:
    # One slot, taken by a job whose embeddings request the endpoint holds: the loop waits for a slot.
    api.replies = ["hang"]
    corpus = '{"tenantId": "acme", "shardId": "s1", "text": "a shard that takes long to embed"}'
    assert run_cli(tmp_path, "ingest", "-", stdin=corpus).returncode == 0
    heartbeat = tmp_path / "worker-heartbeat"
    env = cli_env(
        tmp_path,
        EMBEDDING_JOBS_HEARTBEAT_FILE=str(heartbeat),
        EMBEDDING_JOBS_CONCURRENCY="1",
        EMBEDDING_JOBS_EMBEDDER="openai",
        EMBEDDING_JOBS_OPENAI_ENDPOINT=f"{api.base_url}/v1",
        EMBEDDING_JOBS_OPENAI_API_KEY=API_KEY,
        EMBEDDING_JOBS_OPENAI_TIMEOUT="60",
    )
    with tempfile.TemporaryFile(dir=tmp_path) as log:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "embedding_jobs", "worker", "--exit-when-idle", env=env, stderr=log
        )
        try:

            async def held() -> bool:
                return len(api.requests) == 1 and heartbeat.exists()

            await wait_until(held, "the job's embeddings request to be held", within=20)
            beats: set[int] = set()

            async def beating() -> bool:
                beats.add(heartbeat.stat().st_mtime_ns)
                return len(beats) >= 3

            await wait_until(beating, "two more heartbeats while the only slot is busy", within=10)
            assert not api.release.is_set()
            assert len(api.requests) == 1
            if then == "drain":
                # SIGTERM: the loop stops taking work and waits for the held job; the drain beats too.
                worker.terminate()
                beats.clear()
                await wait_until(beating, "heartbeats while the worker drains its held job", within=10)
                assert worker.returncode is None
            api.release.set()
            assert await asyncio.wait_for(worker.wait(), 30) == 0
        finally:
            api.release.set()
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
            log.seek(0)
            output = log.read().decode(errors="replace")
    assert worker.returncode == 0, output
