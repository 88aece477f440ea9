"""The lease contract: every lease backend runs these same tests, with a hand-driven monotonic clock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from jobs.cosmos_lease import CosmosLeaseBackend
from jobs.lease import RENEW_FRACTION, Lease, LeaseBackend
from jobs.sqlite_lease import SQLiteLeaseBackend
from tests.conftest import STORE_BACKENDS
from tests.cosmos_server import CosmosServer, cosmos_database

DURATION = 10.0
OpenBackend = Callable[[], Awaitable[LeaseBackend]]


class Clock:
    """A monotonic clock the test moves by hand, so expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=STORE_BACKENDS)
async def open_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenBackend]:
    """Opens backends on one fresh store, each with its own connection, as separate processes would."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":

            async def open_one() -> LeaseBackend:
                backend = await SQLiteLeaseBackend.open(tmp_path / "embedding-jobs.db")
                stack.push_async_callback(backend.close)
                return backend

        else:
            # Looked up here, not declared, so sqlite-only runs never start the server.
            server: CosmosServer = request.getfixturevalue("cosmos_server")
            name = (await stack.enter_async_context(cosmos_database(server))).name

            async def open_one() -> LeaseBackend:
                backend = await CosmosLeaseBackend.open(
                    endpoint=server.endpoint, key=server.key, database=name, create_if_missing=True
                )
                stack.push_async_callback(backend.close)
                return backend

        yield open_one


async def holder_of(lease: Lease) -> str | None:
    record = await lease.backend.read(lease.name)
    return None if record is None else record.holder


async def contenders(open_backend: OpenBackend, clock: Clock, *names: str) -> list[Lease]:
    return [Lease(await open_backend(), holder=name, duration=DURATION, clock=clock) for name in names]


async def test_acquire_when_free(open_backend: OpenBackend) -> None:
    clock = Clock()
    [a] = await contenders(open_backend, clock, "a")
    assert not a.held()
    assert await a.acquire_or_renew()
    assert a.held()
    record = await a.backend.read(a.name)
    assert record is not None
    assert (record.holder, record.duration) == ("a", DURATION)


async def test_holder_renews_and_each_renewal_extends_its_term(open_backend: OpenBackend) -> None:
    clock = Clock()
    [a] = await contenders(open_backend, clock, "a")
    assert await a.acquire_or_renew()
    first = await a.backend.read(a.name)
    clock.advance(DURATION * RENEW_FRACTION * 0.9)
    assert await a.acquire_or_renew()
    second = await a.backend.read(a.name)
    assert first is not None
    assert second is not None
    assert second.holder == "a"
    assert second.version != first.version
    clock.advance(DURATION * RENEW_FRACTION * 0.9)
    assert a.held(), "the renewal counts from when it was sent, not from the first acquisition"


async def test_holder_stops_holding_by_its_own_clock_when_it_cannot_renew(open_backend: OpenBackend) -> None:
    clock = Clock()
    [a] = await contenders(open_backend, clock, "a")
    assert await a.acquire_or_renew()
    clock.advance(DURATION * RENEW_FRACTION)
    assert not a.held()


async def test_a_held_lease_is_refused_to_another(open_backend: OpenBackend) -> None:
    clock = Clock()
    a, b = await contenders(open_backend, clock, "a", "b")
    assert await a.acquire_or_renew()
    assert not await b.acquire_or_renew()
    # The holder keeps renewing: however long b waits, the record keeps changing under it.
    for _ in range(5):
        clock.advance(DURATION * 0.5)
        assert await a.acquire_or_renew()
        assert not await b.acquire_or_renew()
        assert not b.held()
    assert await holder_of(b) == "a"


async def test_takeover_once_the_record_stayed_unchanged_for_the_duration(open_backend: OpenBackend) -> None:
    clock = Clock()
    a, b = await contenders(open_backend, clock, "a", "b")
    assert await a.acquire_or_renew()
    assert not await b.acquire_or_renew()  # b first sees a's record now
    clock.advance(DURATION - 0.001)
    assert not await b.acquire_or_renew(), "not expired yet by b's own observation"
    assert not a.held(), "the holder gave up before anyone could take over"
    clock.advance(0.002)
    assert await b.acquire_or_renew()
    assert b.held()
    assert not await a.acquire_or_renew(), "the old holder cannot renew a lease taken over"
    assert not a.held()


async def test_a_newcomer_waits_a_full_duration_whatever_the_written_times_say(open_backend: OpenBackend) -> None:
    clock = Clock()
    [a] = await contenders(open_backend, clock, "a")
    assert await a.acquire_or_renew()
    # Much later (by every clock), a new contender appears: it has not seen the record age itself.
    clock.advance(DURATION * 100)
    [c] = await contenders(open_backend, clock, "c")
    assert not await c.acquire_or_renew()
    clock.advance(DURATION)
    assert await c.acquire_or_renew()


async def test_release_lets_another_take_the_lease_at_once(open_backend: OpenBackend) -> None:
    clock = Clock()
    a, b = await contenders(open_backend, clock, "a", "b")
    assert await a.acquire_or_renew()
    assert not await b.acquire_or_renew()
    await a.release()
    assert not a.held()
    assert await b.acquire_or_renew()
    assert await holder_of(b) == "b"


async def test_releasing_a_lease_lost_to_another_leaves_it_alone(open_backend: OpenBackend) -> None:
    clock = Clock()
    a, b = await contenders(open_backend, clock, "a", "b")
    assert await a.acquire_or_renew()
    assert not await b.acquire_or_renew()
    clock.advance(DURATION + 1)
    assert await b.acquire_or_renew()
    await a.release()
    assert await holder_of(b) == "b"
    assert await b.acquire_or_renew()


async def test_two_contenders_racing_for_a_free_lease_one_wins(open_backend: OpenBackend) -> None:
    clock = Clock()
    a, b = await contenders(open_backend, clock, "a", "b")
    won = await asyncio.gather(a.acquire_or_renew(), b.acquire_or_renew())
    assert sorted(won) == [False, True]
    assert [a.held(), b.held()] == list(won)


async def test_two_contenders_racing_for_one_version_one_write_wins(open_backend: OpenBackend) -> None:
    first, second = await open_backend(), await open_backend()
    created = await first.write("race", None, "a", DURATION)
    assert created is not None
    assert await second.write("race", None, "b", DURATION) is None, "a second create is refused"
    # Both read the same version and both try to replace it: exactly one write lands.
    results = await asyncio.gather(
        first.write("race", created.version, "a", DURATION), second.write("race", created.version, "b", DURATION)
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    stored = await first.read("race")
    assert stored is not None
    assert (stored.holder, stored.version) == (winners[0].holder, winners[0].version)


async def test_two_contenders_racing_for_an_expired_lease_one_wins(open_backend: OpenBackend) -> None:
    clock = Clock()
    a, b, c = await contenders(open_backend, clock, "a", "b", "c")
    assert await a.acquire_or_renew()
    assert not await b.acquire_or_renew()
    assert not await c.acquire_or_renew()
    clock.advance(DURATION + 1)
    won = await asyncio.gather(b.acquire_or_renew(), c.acquire_or_renew())
    assert sorted(won) == [False, True]
    assert not a.held()
