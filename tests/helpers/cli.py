"""Running the command line as a user does: a clean environment on a temporary data folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import CosmosDatabase


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without our own or OpenTelemetry settings, on data_dir, with extra added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_JOBS_", "OTEL_"))}
    env.update({"EMBEDDING_JOBS_DATA_DIR": str(data_dir), "EMBEDDING_JOBS_LOG_LEVEL": "WARNING", **extra})
    return env


def run_cli(data_dir: Path, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`embedding-jobs ARGS` run to completion on data_dir, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "embedding_jobs", *args],
        env=cli_env(data_dir, **env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


def cosmos_env(db: CosmosDatabase) -> dict[str, str]:
    """Settings that put the job store on db in the Cosmos test server."""
    return {
        "EMBEDDING_JOBS_STORE": "cosmos",
        "EMBEDDING_JOBS_COSMOS_ENDPOINT": db.server.endpoint,
        "EMBEDDING_JOBS_COSMOS_KEY": db.server.key,
        "EMBEDDING_JOBS_COSMOS_DATABASE": db.name,
    }
