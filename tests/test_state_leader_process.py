"""Three `embedding-jobs exporter` processes on one store: one reads and exports state, and a killed one is replaced.

Run on SQLite and on the Cosmos DB test server. Lease operations (one point read per
follower, one conditional write by the leader, each four times per refresh interval) are
not state reads and are not counted here; tests/test_state_leader.py counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.components import wait_until
from tests.conftest import STORE_BACKENDS, CosmosDatabase
from tests.helpers.cli import cosmos_env, run_cli
from tests.helpers.exporter import ExporterProcess, exporter_process

INTERVAL = 1.0
# The design bound is two refresh intervals (the lease timing gives 1.5 plus one store call);
# the margin covers scheduling on a loaded two-core machine running four processes and a server.
TAKEOVER_BOUND = 2 * INTERVAL + 1.0
LAST_SUCCESS = "embedding_exporter_store_last_success_timestamp_seconds"
REFRESHES = "embedding_exporter_store_refresh_duration_seconds_count"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=STORE_BACKENDS)
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Environment for commands on a fresh store holding one job, of each backend."""
    env: dict[str, str] = {}
    if request.param == "cosmos":
        db: CosmosDatabase = request.getfixturevalue("cosmos_db")
        env = cosmos_env(db)
        done = run_cli(tmp_path, "init-db", **env)
        assert done.returncode == 0, done.stderr
    shard = json.dumps({"tenantId": "acme", "shardId": "s1", "text": "some text"})
    done = run_cli(tmp_path, "ingest", "-", stdin=shard, **env)
    assert done.returncode == 0, done.stderr
    return env


Scrape = dict[str, float]


async def scrape(session: aiohttp.ClientSession, exporter: ExporterProcess) -> Scrape:
    """Each sample name of /metrics with the sum of its values (enough for what these tests ask)."""
    async with session.get(f"{exporter.base}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def scrape_all(session: aiohttp.ClientSession, exporters: list[ExporterProcess]) -> list[Scrape]:
    return list(await asyncio.gather(*(scrape(session, e) for e in exporters)))


async def one_leader(session: aiohttp.ClientSession, exporters: list[ExporterProcess], within: float) -> int:
    """Index of the one exporter exporting state, once exactly one does and the rest export none of it."""
    leaders: list[int] = []

    async def single_leader() -> bool:
        nonlocal leaders
        scrapes = await scrape_all(session, exporters)
        leaders = [i for i, s in enumerate(scrapes) if s["embedding_exporter_state_leader"] == 1]
        if len(leaders) != 1 or "embedding_jobs" not in scrapes[leaders[0]]:
            return False
        followers = [s for i, s in enumerate(scrapes) if i != leaders[0]]
        if not all(s["embedding_exporter_state_leader"] == 0 for s in followers):
            return False
        for s in followers:
            assert "embedding_jobs" not in s
            assert "embedding_jobs_stuck" not in s
            assert "embedding_queue_messages" not in s
            assert LAST_SUCCESS not in s
            assert REFRESHES not in s
        return True

    await wait_until(
        single_leader, "a single state leader", within=within, interval=0.05, detail=lambda: f"leaders {leaders}"
    )
    return leaders[0]


async def start(
    stack: contextlib.AsyncExitStack, data_dir: Path, env: dict[str, str], count: int
) -> list[ExporterProcess]:
    """count exporters with a short refresh interval, stopped when the stack closes."""
    args = ("--refresh-interval", str(INTERVAL), "--metrics-cache-ttl", "0")
    contexts = [exporter_process(data_dir, *args, env=env) for _ in range(count)]
    return list(await asyncio.gather(*(stack.enter_async_context(c) for c in contexts)))


async def test_one_exporter_of_three_exports_state_and_a_killed_one_is_replaced(
    tmp_path: Path, store_env: dict[str, str]
) -> None:
    async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
        running = await start(stack, tmp_path, store_env, 3)
        leader = running[await one_leader(session, running, within=20)]

        killed = time.monotonic()
        await leader.kill()
        survivors = [e for e in running if e is not leader]
        while True:
            scrapes = await scrape_all(session, survivors)
            if any(s["embedding_exporter_state_leader"] == 1 for s in scrapes):
                break
            assert time.monotonic() - killed < TAKEOVER_BOUND * 3, "nobody took over"
            await asyncio.sleep(0.02)
        takeover = time.monotonic() - killed
        print(f"takeover after SIGKILL: {takeover:.2f}s (refresh interval {INTERVAL}s)")
        assert takeover <= TAKEOVER_BOUND, f"a new leader took {takeover:.2f}s (bound {TAKEOVER_BOUND}s)"
        await one_leader(session, survivors, within=10)


async def reads_per_interval(session: aiohttp.ClientSession, running: list[ExporterProcess], intervals: int) -> float:
    """State reads (refreshes) by all exporters together per refresh interval, over a window with one leader."""
    for _ in range(3):
        first = await one_leader(session, running, within=20)
        before = (await scrape(session, running[first]))[REFRESHES]
        started = time.monotonic()
        await asyncio.sleep(intervals * INTERVAL)  # the measuring window, not a synchronisation
        scrapes = await scrape_all(session, running)
        elapsed = time.monotonic() - started
        if scrapes[first]["embedding_exporter_state_leader"] == 1:
            # Followers export no refresh count: the sum over exporters is the leader's.
            total = sum(s.get(REFRESHES, 0.0) for s in scrapes)
            return (total - before) / (elapsed / INTERVAL)
    raise AssertionError("leadership kept changing during the measuring window")


async def test_store_reads_per_interval_do_not_grow_with_exporters(tmp_path: Path, store_env: dict[str, str]) -> None:
    async with contextlib.AsyncExitStack() as stack, aiohttp.ClientSession() as session:
        running = await start(stack, tmp_path, store_env, 1)
        alone = await reads_per_interval(session, running, intervals=6)
        running += await start(stack, tmp_path, store_env, 2)
        together = await reads_per_interval(session, running, intervals=6)
    print(f"state reads per interval: 1 exporter {alone:.2f}, 3 exporters {together:.2f}")
    assert 0.5 <= alone <= 1.2
    # Every exporter reading would make this 3x; one reader keeps it at 1x, give or take a refresh.
    assert together <= alone * 1.5
