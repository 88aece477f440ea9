"""The worker's tracking health reaches Prometheus: over OTLP from a worker process to a separate
exporter process, and read in process by `up`. Real processes, the Cosmos test server's faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.components import free_port, wait_until
from tests.conftest import CosmosDatabase
from tests.test_cli import cli_env, run_cli
from tests.test_cli_cosmos import cosmos_env
from tests.test_exporter_process import exporter_process, samples

JOB_CONTAINER = "embedding-jobs"
BUFFER = 5
JOBS = 12
PREFIX = "embedding_worker_tracking_"


def by_worker(text: str, name: str) -> dict[str, float]:
    """{worker: value} of one embedding_worker_tracking_* sample name."""
    return {dict(labels)["worker"]: value for labels, value in samples(text, PREFIX + name).items()}


async def scrape(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def run_worker(data_dir: Path, env: dict[str, str]) -> str:
    """`embedding-jobs worker --exit-when-idle` to the end; its stderr."""
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "embedding_jobs", "worker", "--exit-when-idle", env=env, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(worker.communicate(), 60)
    assert worker.returncode == 0, err.decode()
    return err.decode()


async def test_failing_job_store_shows_as_failed_buffered_and_dropped_writes_on_the_exporter(
    tmp_path: Path, cosmos_db: CosmosDatabase
) -> None:
    cosmos = cosmos_env(cosmos_db)
    assert run_cli(tmp_path, "init-db", **cosmos).returncode == 0
    corpus = "\n".join(json.dumps({"tenantId": "acme", "shardId": f"s{n}", "text": f"text {n}"}) for n in range(JOBS))
    ingested = run_cli(tmp_path, "ingest", "-", stdin=corpus, **cosmos)
    assert ingested.returncode == 0, ingested.stderr
    async with exporter_process(tmp_path, env=cosmos) as exporter, aiohttp.ClientSession() as session:
        # No worker has reported yet: the families are there, without series.
        assert by_worker(await scrape(session, exporter.base), "dropped_writes_total") == {}
        env = cli_env(
            tmp_path,
            **cosmos,
            EMBEDDING_JOBS_OTLP_ENDPOINT=exporter.otlp_base,
            EMBEDDING_JOBS_TRACKING_BUFFER=str(BUFFER),
            EMBEDDING_JOBS_STORE_TIMEOUT="1",
            EMBEDDING_JOBS_RECONCILE_INTERVAL="0",
            OTEL_METRIC_EXPORT_INTERVAL="200",
        )
        try:
            await asyncio.to_thread(cosmos_db.server.set_fault, JOB_CONTAINER, "fail")
            # Every job is embedded while no status write lands: BUFFER writes wait, the rest are dropped.
            await run_worker(tmp_path, env)
        finally:
            await asyncio.to_thread(cosmos_db.server.set_fault, JOB_CONTAINER, None)
        text = await scrape(session, exporter.base)
        [first] = by_worker(text, "buffered_writes")
        assert by_worker(text, "buffered_writes")[first] == BUFFER
        assert by_worker(text, "store_failures_total")[first] >= 1
        # Two writes a job (begin, finish); the buffer kept BUFFER of them.
        assert by_worker(text, "dropped_writes_total")[first] == 2 * JOBS - BUFFER
        assert by_worker(text, "replayed_writes_total")[first] == 0
        assert by_worker(text, "adopted_writes_total")[first] == 0

        # The store is back: the next worker on this data folder adopts the spool and replays it.
        await run_worker(tmp_path, env)
        text = await scrape(session, exporter.base)
        [second] = set(by_worker(text, "buffered_writes")) - {first}
        assert by_worker(text, "adopted_writes_total")[second] == BUFFER
        assert by_worker(text, "replayed_writes_total")[second] == BUFFER
        assert by_worker(text, "buffered_writes")[second] == 0
        assert by_worker(text, "dropped_writes_total")[second] == 0
        assert by_worker(text, "store_failures_total")[second] == 0
        assert "Traceback" not in exporter.log_text()


async def test_up_serves_its_worker_tracking_health_from_zero(tmp_path: Path) -> None:
    port = free_port()
    up = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedding_jobs",
        "up",
        "--no-sample",
        "--exporter-port",
        str(port),
        env=cli_env(tmp_path),
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            text = ""

            async def reported() -> bool:
                nonlocal text
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    text = await scrape(session, base)
                return bool(by_worker(text, "dropped_writes_total"))

            await wait_until(reported, "up to serve its worker's tracking health", within=30)
        for name in ("store_failures_total", "dropped_writes_total", "replayed_writes_total", "buffered_writes"):
            assert list(by_worker(text, name).values()) == [0], name
    finally:
        up.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(up.wait(), 20) == 0
