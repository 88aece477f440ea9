"""Shared fixtures: every JobStore backend behind one parametrised `store` fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobs.sqlite_store import SQLiteJobStore
from jobs.store import JobStore

STORE_BACKENDS = ["sqlite"]


@pytest.fixture(params=STORE_BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """A fresh, empty job store of each backend."""
    backend = request.param
    if backend == "sqlite":
        sqlite_store = await SQLiteJobStore.open(tmp_path / "jobs.db")
        try:
            yield sqlite_store
        finally:
            await sqlite_store.close()
    else:  # pragma: no cover - a backend listed without a factory
        raise AssertionError(f"no factory for backend {backend}")
