"""A worker process sends its spans over OTLP/HTTP to a separately running exporter process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from jobs.model import JobStatus
from jobs.sqlite_store import SQLiteJobStore
from tests.components import free_port, wait_until
from tests.test_cli import cli_env, run_cli


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@dataclass
class ExporterProcess:
    """A running `embedding-jobs exporter`: the base URLs of its API/metrics listener and its OTLP receiver."""

    process: asyncio.subprocess.Process
    base: str
    otlp_base: str
    log: IO[bytes]

    def log_text(self) -> str:
        """What the process has written to stderr so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    async def kill(self) -> None:
        """SIGKILL it, as an OOM kill or a lost node would: no clean shutdown."""
        self.process.kill()
        await self.process.wait()


@contextlib.asynccontextmanager
async def exporter_process(
    data_dir: Path, *args: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[ExporterProcess]:
    """An `embedding-jobs exporter` process on free ports (API/metrics and OTLP), answering /healthz.

    Stopped with SIGTERM on exit (unless killed before), which it must survive with status 0.
    """
    port, otlp_port = free_port(), free_port()
    # A file, not a pipe: nobody reads stderr while it runs, and a full pipe would block it.
    with tempfile.TemporaryFile(dir=data_dir) as log:
        exporter = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "embedding_jobs",
            "exporter",
            "--exporter-port",
            str(port),
            "--otlp-port",
            str(otlp_port),
            *args,
            env=cli_env(data_dir, **(env or {})),
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:

                async def healthy() -> bool:
                    try:
                        async with session.get(f"{base}/healthz") as response:
                            return response.status == 200
                    except aiohttp.ClientConnectionError:
                        return False

                await wait_until(healthy, "the exporter to start", within=20)
            yield ExporterProcess(exporter, base, f"http://127.0.0.1:{otlp_port}", log)
        finally:
            if exporter.returncode is None:
                exporter.terminate()
                await asyncio.wait_for(exporter.wait(), 20)
                log.seek(0)
                assert exporter.returncode == 0, log.read().decode()


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
