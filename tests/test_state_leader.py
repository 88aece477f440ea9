"""One state reader among exporters sharing a store: the elector in process, and the forced roles."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp.plugin import AiohttpClient

from exporter.app import create_app
from exporter.keys import STATE
from exporter.leader import POLLS_PER_DURATION, StateLeadership
from jobs import lease as lease_module
from jobs.lease import Lease
from jobs.model import Job, JobStatus
from jobs.settings import Settings
from jobs.sqlite_lease import SQLiteLeaseBackend
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import StuckJobs
from tests.components import wait_until

Client = TestClient[web.Request, web.Application]
INTERVAL = 0.6
STATE_SERIES = ("embedding_jobs", "embedding_exporter_store_last_success_timestamp_seconds")


class CountingStore(SQLiteJobStore):
    """The real SQLite store, counting the reads the state refresher makes."""

    reads = 0

    async def stats_all(self) -> dict[str, dict[JobStatus, int]]:
        self.reads += 1
        return await super().stats_all()

    async def stuck(self, *args: Any, **kwargs: Any) -> list[StuckJobs]:
        self.reads += 1
        return await super().stuck(*args, **kwargs)


def names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def leader_value(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "embedding_exporter_state_leader":
                return s.value
    raise AssertionError("no embedding_exporter_state_leader sample")


async def scrape(client: Client) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    return await response.text()


@pytest.fixture
async def db(tmp_path: Path) -> Path:
    path = tmp_path / "embedding-jobs.db"
    async with await SQLiteJobStore.open(path) as store:
        await store.create(Job.new(job_id="j1", tenant_id="acme", shard_id="s1", shard_type_id="d"))
    return path


Exporter = Callable[..., Awaitable[tuple[Client, CountingStore, Lease]]]


@pytest.fixture
async def exporter(aiohttp_client: AiohttpClient, db: Path) -> AsyncIterator[Exporter]:
    """Starts an exporter app on the shared file, with its own store and lease connections."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(role: str = "elect") -> tuple[Client, CountingStore, Lease]:
            store = await CountingStore.open(db)
            stack.push_async_callback(store.close)
            lease = Lease(await SQLiteLeaseBackend.open(db), duration=INTERVAL)
            stack.push_async_callback(lease.close)
            settings = Settings(refresh_interval=INTERVAL, state_role=role, metrics_cache_ttl=0)
            client = await aiohttp_client(create_app(settings, store, lease=lease))
            # Stopped before its connections close, so its clean shutdown can release the lease.
            stack.push_async_callback(client.close)
            return client, store, lease

        yield start


async def test_one_of_two_exporters_reads_and_exports_state(exporter: Exporter) -> None:
    (a, store_a, _), (b, store_b, _) = await exporter(), await exporter()

    async def one_leader() -> bool:
        return sorted([leader_value(await scrape(a)), leader_value(await scrape(b))]) == [0, 1]

    await wait_until(one_leader, "one exporter to win the state lease", within=10)
    texts = {c: await scrape(c) for c in (a, b)}
    leader, follower = (a, b) if leader_value(texts[a]) == 1 else (b, a)
    await wait_until(lambda: _has(leader, "embedding_jobs"), "the leader to export the state gauges", within=10)
    follower_text = await scrape(follower)
    assert not set(STATE_SERIES) & names(follower_text)
    assert "embedding_exporter_store_refresh_duration_seconds_count" not in names(follower_text)
    assert "embedding_exporter_tenants_folded" in names(follower_text), "span metrics stay on followers"
    follower_store = store_a if follower is a else store_b
    assert follower_store.reads == 0


async def _has(client: Client, name: str) -> bool:
    return name in names(await scrape(client))


async def test_a_clean_shutdown_hands_the_lease_over_at_once(exporter: Exporter) -> None:
    (a, _, lease_a), (b, _, lease_b) = await exporter(), await exporter()
    await wait_until(lambda: _async(lease_a.held() != lease_b.held()), "one exporter to win the state lease", within=10)
    leader, follower, follower_lease = (a, b, lease_b) if lease_a.held() else (b, a, lease_a)
    stopped = time.monotonic()
    await leader.close()  # runs the app's cleanup: the elector releases the lease
    await wait_until(lambda: _async(follower_lease.held()), "the other exporter to take over", within=10)
    handover = time.monotonic() - stopped
    # Expiry would take a whole lease duration; a release is seen at the follower's next poll.
    assert handover < INTERVAL, f"handover took {handover:.2f}s"
    await wait_until(lambda: _has(follower, "embedding_jobs"), "the new leader to export state", within=10)


async def test_a_leader_that_cannot_renew_stops_before_another_takes_over(exporter: Exporter) -> None:
    (_, _, lease_a), (_, _, lease_b) = await exporter(), await exporter()
    await wait_until(lambda: _async(lease_a.held() != lease_b.held()), "one exporter to win the state lease", within=10)
    leader, follower = (lease_a, lease_b) if lease_a.held() else (lease_b, lease_a)
    await leader.backend.close()  # its store connection is gone: every renewal now fails
    timeline: list[tuple[float, bool, bool]] = []

    def taken_over() -> bool:
        if follower.held():
            return True
        timeline.append((time.monotonic(), leader.held(), follower.held()))
        return False

    await wait_until(taken_over, "the follower to take over", within=10, interval=0.005)
    assert not leader.held()
    assert not any(a and b for _, a, b in timeline), "two leaders at once"
    stepped_down = next(t for t, held, _ in timeline if not held)
    assert time.monotonic() - stepped_down > INTERVAL * (1 - lease_module.RENEW_FRACTION) / 2, (
        "the old leader stepped down well before the takeover"
    )


async def _async(value: bool) -> bool:
    """A plain condition in the awaitable shape wait_until takes."""
    return value


@pytest.mark.parametrize(("role", "exports"), [("always", True), ("never", False)])
async def test_a_forced_role_ignores_the_lease(exporter: Exporter, role: str, exports: bool) -> None:
    (elected, _, elected_lease) = await exporter()
    await wait_until(lambda: _async(elected_lease.held()), "the electing exporter to win the lease", within=10)
    forced, store, lease = await exporter(role)
    if exports:
        await wait_until(lambda: _has(forced, "embedding_jobs"), "the forced exporter to export state", within=10)
    text = await scrape(forced)
    assert leader_value(text) == (1 if exports else 0)
    assert bool(set(STATE_SERIES) & names(text)) is exports
    assert (store.reads > 0) is exports
    assert not lease.held(), "a forced role never takes the lease"
    assert elected_lease.held()
    assert leader_value(await scrape(elected)) == 1


def test_an_unknown_role_is_refused() -> None:
    with pytest.raises(ValueError, match="state role"):
        StateLeadership("sometimes")


async def test_state_collector_wakes_at_once_on_winning(exporter: Exporter) -> None:
    client, _, lease = await exporter()
    started = time.monotonic()
    await wait_until(lambda: _has(client, "embedding_jobs"), "state after winning the lease", within=10)
    assert client.app is not None
    assert client.app[STATE].refreshed.is_set()
    assert lease.held()
    assert time.monotonic() - started < INTERVAL, "the first read waits for no interval"


async def test_lease_traffic_is_a_few_point_operations_per_interval(exporter: Exporter) -> None:
    (_, store_a, lease_a), (_, store_b, lease_b) = await exporter(), await exporter()
    await wait_until(lambda: _async(lease_a.held() != lease_b.held()), "one exporter to win the state lease", within=10)
    backends = [cast(SQLiteLeaseBackend, lease.backend) for lease in (lease_a, lease_b)]
    calls = [b.calls for b in backends]
    reads = store_a.reads + store_b.reads
    started = time.monotonic()
    await asyncio.sleep(5 * INTERVAL)  # the measuring window, not a synchronisation
    intervals = (time.monotonic() - started) / INTERVAL
    assert lease_a.held() != lease_b.held(), "leadership changed during the window"
    for backend, before in zip(backends, calls, strict=True):
        # The leader's renewal is one conditional write, a follower's poll one point read.
        per_interval = (backend.calls - before) / intervals
        assert POLLS_PER_DURATION - 1 <= per_interval <= POLLS_PER_DURATION + 1
    # One refresh per interval, of two store reads (counters and stuck jobs), by the leader alone.
    state_reads = (store_a.reads + store_b.reads - reads) / intervals
    assert 1 <= state_reads <= 2 * 1.25
