"""A running `embedding-jobs exporter` process."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp

from tests.components import free_port, wait_until
from tests.helpers.cli import cli_env


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
