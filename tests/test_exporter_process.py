"""A worker process sends its spans over OTLP/HTTP to a separately running exporter process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from jobs.model import JobStatus
from jobs.sqlite_store import SQLiteJobStore
from tests.components import wait_until
from tests.helpers.cli import cli_env, run_cli
from tests.helpers.exporter import exporter_process
from tests.helpers.metrics import samples


async def test_worker_spans_reach_a_separate_exporter_over_otlp(tmp_path: Path) -> None:
    corpus = "\n".join(
        json.dumps({"tenantId": tenant, "shardId": f"s{n}", "text": f"text {n} of {tenant}"})
        for tenant in ("acme", "globex")
        for n in range(5)
    )
    assert run_cli(tmp_path, "ingest", "-", stdin=corpus).returncode == 0
    async with (
        exporter_process(tmp_path, "--refresh-interval", "0.2") as exporter,
        aiohttp.ClientSession() as session,
    ):
        base = exporter.base
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "embedding_jobs",
            "worker",
            "--exit-when-idle",
            "--otlp-endpoint",
            exporter.otlp_base,
            env=cli_env(tmp_path),
            stderr=subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(worker.communicate(), 40)
        assert worker.returncode == 0, err.decode()

        text = ""

        async def reflected() -> bool:
            # The worker flushes its span batch on exit; the exporter's state refresh runs every 0.2 s.
            nonlocal text
            async with session.get(f"{base}/metrics") as response:
                text = await response.text()
            attempts = samples(text, "embedding_job_attempts_total")
            jobs = samples(text, "embedding_jobs")
            return (
                attempts.get((("outcome", "completed"), ("tenant", "acme"))) == 5
                and jobs.get((("status", "completed"), ("tenant", "globex"))) == 5
            )

        await wait_until(reflected, "the worker's spans and the store state in /metrics", within=40)
        attempts = samples(text, "embedding_job_attempts_total")
        assert attempts[(("outcome", "completed"), ("tenant", "globex"))] == 5
        assert attempts[(("outcome", "failed"), ("tenant", "globex"))] == 0
        durations = samples(text, "embedding_job_duration_seconds_count")
        assert durations[(("tenant", "acme"),)] == 5
        received = samples(text, "embedding_exporter_spans_received_total")
        assert received[(("source", "otlp"),)] == 10
        depth = samples(text, "embedding_queue_messages")
        assert depth[(("queue", "embedding-jobs"), ("state", "active"))] == 0


async def test_retry_through_the_exporter_api_reprocesses_a_dead_lettered_job(tmp_path: Path) -> None:
    corpus = json.dumps({"tenantId": "acme", "shardId": "s1", "text": "some text"})
    assert run_cli(tmp_path, "ingest", "-", stdin=corpus).returncode == 0
    async with await SQLiteJobStore.open(tmp_path / "embedding-jobs.db") as store:
        [job] = (await store.list("acme")).items
        await store.transition("acme", job.id, JobStatus.PENDING, JobStatus.DEAD_LETTERED, error="gave up")
    # The original message is still queued; drain it so only the retry's message remains.
    assert run_cli(tmp_path, "worker", "--exit-when-idle").returncode == 0
    async with exporter_process(tmp_path) as exporter, aiohttp.ClientSession() as session:
        url = f"{exporter.base}/api/v1/embedding-jobs/{job.id}/retry?tenantId=acme"
        async with session.post(url) as response:
            assert response.status == 202, await response.text()
            assert (await response.json())["status"] == "pending"
    assert run_cli(tmp_path, "worker", "--exit-when-idle").returncode == 0
    async with await SQLiteJobStore.open(tmp_path / "embedding-jobs.db") as store:
        done = await store.get("acme", job.id)
    assert done.status is JobStatus.COMPLETED
    assert done.retry_count == 0
