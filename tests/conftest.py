"""Shared fixtures: every JobStore backend behind `store`, every queue kind behind `queues`; the test peers."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobs.cosmos_store import CosmosJobStore
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import JobStore
from tests.components import missing
from tests.cosmos_server import CosmosDatabase as CosmosDatabase
from tests.cosmos_server import CosmosServer, CosmosServerUnavailable, cosmos_database, start_cosmos_server
from tests.pipeline import QUEUE_KINDS
from tests.podman_tools import (
    IMAGE_FIGURES,
    IMAGE_REPOSITORY,
    Podman,
    build_image,
    ensure_base,
    keep_cache_and_prune,
    require_podman,
)
from tests.queues import LocalBackend, QueueBackend, ServiceBusBackend
from tests.servicebus_peer import ServiceBusPeer

# The shared helpers assert like tests do; rewriting their asserts keeps pytest's detailed failure messages.
pytest.register_assert_rewrite("tests.helpers")

STORE_BACKENDS = ["sqlite", "cosmos"]


@pytest.fixture(scope="session")
def cosmos_server() -> Iterator[CosmosServer]:
    """One Cosmos DB test server for the session; tests isolate themselves by database."""
    try:
        server = start_cosmos_server()
    except CosmosServerUnavailable as exc:
        missing(str(exc))
    with server:
        yield server


@pytest.fixture(scope="session")
def servicebus_peer() -> Iterator[ServiceBusPeer]:
    """One Service Bus test peer for the session; tests isolate themselves by queue name."""
    with ServiceBusPeer() as peer:
        yield peer
    assert peer.errors == [], peer.errors


@pytest.fixture(scope="session")
def podman() -> Podman:
    """podman with the project's containers.conf, or a skip (a failure under CI=true) naming what is missing."""
    return require_podman()


@pytest.fixture(scope="session")
def image(podman: Podman, request: pytest.FixtureRequest) -> Iterator[str]:
    """The image built from the working tree's Dockerfile under a tag of this run's own, removed afterwards.

    The base is reused when present; an unchanged tree rebuilds from podman's layer cache in seconds.
    """
    base_seconds = ensure_base(podman)
    tag = f"{IMAGE_REPOSITORY}:test-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    build_image(podman, tag)
    request.config.stash[IMAGE_FIGURES] = [
        f"base image ready in {base_seconds:.0f}s",
        f"image built in {time.monotonic() - started:.0f}s",
    ]
    try:
        yield tag
    finally:
        keep_cache_and_prune(podman, tag)


@pytest.fixture
async def cosmos_db(cosmos_server: CosmosServer) -> AsyncIterator[CosmosDatabase]:
    """A fresh database name (created by whoever needs it), dropped after the test."""
    async with cosmos_database(cosmos_server) as db:
        yield db


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
    elif backend == "cosmos":
        # Looked up here, not declared, so sqlite-only runs never start the server.
        server: CosmosServer = request.getfixturevalue("cosmos_server")
        async with cosmos_database(server) as db:
            cosmos_store = await CosmosJobStore.open(client=db.client, database=db.name, create_if_missing=True)
            try:
                yield cosmos_store
            finally:
                await cosmos_store.close()
    else:  # pragma: no cover - a backend listed without a factory
        raise AssertionError(f"no factory for backend {backend}")


@pytest.fixture(params=QUEUE_KINDS)
async def queues(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueBackend]:
    """Fresh queues of each kind: the local SQLite queue and Service Bus through its test peer."""
    backend: QueueBackend
    if request.param == "servicebus":
        # Looked up here, not declared, so local-only runs never start the peer.
        backend = ServiceBusBackend(request.getfixturevalue("servicebus_peer"))
    else:
        backend = LocalBackend(tmp_path / "queue.db")
    try:
        yield backend
    finally:
        await backend.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List the figures tests measured (their "figure" user properties: image size, build times)."""
    figures = [
        (report.nodeid, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", ())
        if name == "figure"
    ]
    if figures:
        terminalreporter.section("figures measured")
        for nodeid, value in figures:
            terminalreporter.write_line(f"{value}  ({nodeid})")
