"""The SQLite-backed queue keeps Service Bus peek-lock semantics, across tasks and processes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobs.sqlite_store import SQLiteJobStore
from tests.components import wait_for
from worker.local_queue import MAX_DELIVERY_COUNT_EXCEEDED, LocalQueue
from worker.queue import MessageLockLostError, QueueDepth, QueueUnavailableError, ReceivedMessage

REPO_ROOT = Path(__file__).resolve().parents[1]
SHORT_LOCK = 0.2
# Long enough for any receive to come back: a test that polls for a message fails, not hangs.
WAIT = 5.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
async def queue(db: Path) -> AsyncIterator[LocalQueue]:
    async with LocalQueue(db) as q:
        yield q


async def receive_one(queue: LocalQueue, max_wait: float = WAIT) -> ReceivedMessage:
    messages = await queue.receive(max_messages=1, max_wait=max_wait)
    assert len(messages) == 1, f"expected one message within {max_wait}s, got {messages}"
    return messages[0]


async def wait_until_past(moment: datetime) -> None:
    await asyncio.to_thread(wait_for, lambda: datetime.now(UTC) > moment, WAIT, f"the clock to pass {moment}")


async def test_send_returns_increasing_sequence_numbers(queue: LocalQueue) -> None:
    numbers = [await queue.send(b"x", message_id=f"m{i}") for i in range(5)]
    assert numbers == sorted(numbers)
    assert len(set(numbers)) == len(numbers)


async def test_receive_locks_messages_in_sequence_order_with_their_content(queue: LocalQueue) -> None:
    before = datetime.now(UTC)
    first = await queue.send(b"one", message_id="a", application_properties={"tenantId": "t1"})
    second = await queue.send(b"two", message_id="b")
    third = await queue.send(b"three", message_id="c")

    batch = await queue.receive(max_messages=2, max_wait=0)

    assert [m.sequence_number for m in batch] == [first, second]
    assert [(m.message_id, m.body) for m in batch] == [("a", b"one"), ("b", b"two")]
    assert dict(batch[0].application_properties) == {"tenantId": "t1"}
    assert dict(batch[1].application_properties) == {}
    assert all(m.delivery_count == 1 for m in batch)
    assert batch[0].lock_token != batch[1].lock_token
    assert all(before <= m.enqueued_time <= datetime.now(UTC) for m in batch)
    assert all(m.locked_until > datetime.now(UTC) + timedelta(seconds=20) for m in batch)
    assert [m.sequence_number for m in await queue.receive(max_messages=5, max_wait=0)] == [third]


async def test_receive_on_empty_queue_returns_empty_list_after_max_wait(queue: LocalQueue) -> None:
    started = time.monotonic()
    assert list(await queue.receive(max_wait=0.2)) == []
    assert time.monotonic() - started >= 0.2


async def test_locked_message_is_not_delivered_to_another_receiver(db: Path) -> None:
    async with LocalQueue(db) as one, LocalQueue(db) as other:
        await one.send(b"x", message_id="m")
        await receive_one(one, max_wait=0)
        assert list(await other.receive(max_wait=0)) == []
        assert list(await one.receive(max_wait=0)) == []


async def test_complete_removes_the_message(queue: LocalQueue) -> None:
    await queue.send(b"x", message_id="m")
    message = await receive_one(queue, max_wait=0)

    await queue.complete(message)

    assert await queue.depth() == QueueDepth(active=0, scheduled=0, dead_letter=0)
    with pytest.raises(MessageLockLostError):
        await queue.complete(message)


async def test_abandon_makes_message_visible_again(queue: LocalQueue) -> None:
    await queue.send(b"x", message_id="m")
    first = await receive_one(queue, max_wait=0)

    await queue.abandon(first)

    again = await receive_one(queue, max_wait=0)
    assert again.sequence_number == first.sequence_number
    assert again.delivery_count == 2
    assert again.lock_token != first.lock_token


async def test_lock_expiry_redelivers_with_higher_delivery_count(db: Path) -> None:
    async with LocalQueue(db, lock_duration=SHORT_LOCK) as one, LocalQueue(db) as other:
        await one.send(b"x", message_id="m")
        first = await receive_one(one, max_wait=0)

        again = await receive_one(other)

        assert datetime.now(UTC) >= first.locked_until
        assert (again.message_id, again.sequence_number) == ("m", first.sequence_number)
        assert again.delivery_count == 2
        assert again.lock_token != first.lock_token


async def test_settling_after_lock_expiry_raises_lock_lost(db: Path) -> None:
    async with LocalQueue(db, lock_duration=SHORT_LOCK) as queue:
        await queue.send(b"x", message_id="m")
        message = await receive_one(queue, max_wait=0)
        await wait_until_past(message.locked_until)

        with pytest.raises(MessageLockLostError):
            await queue.complete(message)
        with pytest.raises(MessageLockLostError):
            await queue.abandon(message)
        with pytest.raises(MessageLockLostError):
            await queue.dead_letter(message, "Reason", "description")
        with pytest.raises(MessageLockLostError):
            await queue.renew_lock(message)
        assert (await receive_one(queue, max_wait=0)).delivery_count == 2


async def test_settling_with_a_superseded_lock_raises_lock_lost(db: Path) -> None:
    async with LocalQueue(db, lock_duration=SHORT_LOCK) as one, LocalQueue(db, lock_duration=30) as other:
        await one.send(b"x", message_id="m")
        stale = await receive_one(one, max_wait=0)
        current = await receive_one(other)

        with pytest.raises(MessageLockLostError):
            await one.complete(stale)
        await other.complete(current)
        assert await other.depth() == QueueDepth(active=0, scheduled=0, dead_letter=0)


async def test_renew_lock_extends_locked_until(db: Path) -> None:
    async with LocalQueue(db, lock_duration=1.0) as queue, LocalQueue(db) as other:
        await queue.send(b"x", message_id="m")
        message = await receive_one(queue, max_wait=0)
        await wait_until_past(message.locked_until - timedelta(seconds=0.5))

        renewed = await queue.renew_lock(message)

        assert renewed >= message.locked_until + timedelta(seconds=0.4)
        await wait_until_past(message.locked_until)
        assert list(await other.receive(max_wait=0)) == []
        await queue.complete(message)


async def test_scheduled_message_is_invisible_until_its_time(queue: LocalQueue) -> None:
    at = datetime.now(UTC) + timedelta(seconds=0.3)
    scheduled = await queue.send(b"later", message_id="later", scheduled_enqueue_time=at)
    await queue.send(b"now", message_id="now")

    assert (await receive_one(queue, max_wait=0)).message_id == "now"
    assert list(await queue.receive(max_wait=0)) == []
    assert (await queue.depth()).scheduled == 1

    later = await receive_one(queue)
    assert datetime.now(UTC) >= at
    assert later.sequence_number == scheduled
    assert abs(later.enqueued_time - at) < timedelta(milliseconds=1)


async def test_message_past_max_delivery_count_is_dead_lettered(db: Path) -> None:
    async with LocalQueue(db, max_delivery_count=2) as queue:
        await queue.send(b"poison", message_id="poison")
        for attempt in (1, 2):
            message = await receive_one(queue, max_wait=0)
            assert message.delivery_count == attempt
            await queue.abandon(message)
        await queue.send(b"fine", message_id="fine")

        assert (await receive_one(queue, max_wait=0)).message_id == "fine"

        [dead] = await queue.peek_dead_letters()
        assert (dead.message_id, dead.body) == ("poison", b"poison")
        assert dead.reason == MAX_DELIVERY_COUNT_EXCEEDED == "MaxDeliveryCountExceeded"
        assert "2 delivery attempts" in dead.description
        assert dead.delivery_count == 2


async def test_dead_letter_keeps_reason_and_description(queue: LocalQueue) -> None:
    number = await queue.send(b"x", message_id="m", application_properties={"tenantId": "t1"})
    message = await receive_one(queue, max_wait=0)

    await queue.dead_letter(message, "ShardMissing", "shard s-1 not found")

    assert list(await queue.receive(max_wait=0)) == []
    for _ in range(2):  # peeking leaves the message where it is
        [dead] = await queue.peek_dead_letters()
        assert (dead.message_id, dead.body, dead.sequence_number) == ("m", b"x", number)
        assert (dead.reason, dead.description) == ("ShardMissing", "shard s-1 not found")
        assert dead.delivery_count == 1
        assert dict(dead.application_properties) == {"tenantId": "t1"}


async def test_peek_dead_letters_reads_in_sequence_order_from_a_sequence_number(queue: LocalQueue) -> None:
    numbers = [await queue.send(b"x", message_id=f"m{i}") for i in range(4)]
    for message in reversed(await queue.receive(max_messages=4, max_wait=0)):
        await queue.dead_letter(message, "Reason", "description")

    assert [d.sequence_number for d in await queue.peek_dead_letters()] == numbers
    assert [d.sequence_number for d in await queue.peek_dead_letters(2, numbers[1])] == numbers[1:3]


async def test_purge_dead_letters_removes_dead_letters_up_to_a_sequence_number(queue: LocalQueue) -> None:
    numbers = [await queue.send(b"x", message_id=f"m{i}") for i in range(3)]
    await queue.send(b"x", message_id="alive")
    for message in await queue.receive(max_messages=3, max_wait=0):
        await queue.dead_letter(message, "Reason", "description")

    assert await queue.purge_dead_letters(up_to_sequence_number=numbers[1]) == 2
    assert [d.sequence_number for d in await queue.peek_dead_letters()] == numbers[2:]
    assert await queue.purge_dead_letters() == 1
    assert await queue.depth() == QueueDepth(active=1, scheduled=0, dead_letter=0)


async def test_depth_counts_active_scheduled_and_dead_lettered(queue: LocalQueue) -> None:
    await queue.send(b"x", message_id="a")
    await queue.send(b"x", message_id="b")
    await queue.send(b"x", message_id="c", scheduled_enqueue_time=datetime.now(UTC) + timedelta(hours=1))
    await queue.send(b"x", message_id="d")
    assert await queue.depth() == QueueDepth(active=3, scheduled=1, dead_letter=0)

    a, b, d = await queue.receive(max_messages=3, max_wait=0)
    await queue.dead_letter(d, "Reason", "description")
    assert await queue.depth() == QueueDepth(active=2, scheduled=1, dead_letter=1)

    await queue.abandon(b)
    await queue.complete(a)
    assert await queue.depth() == QueueDepth(active=1, scheduled=1, dead_letter=1)


async def test_queues_sharing_a_file_keep_their_messages_apart(db: Path) -> None:
    async with LocalQueue(db, "left") as left, LocalQueue(db, "right") as right:
        await left.send(b"l", message_id="l")

        assert list(await right.receive(max_wait=0)) == []
        assert await right.depth() == QueueDepth(active=0, scheduled=0, dead_letter=0)
        assert (await receive_one(left, max_wait=0)).body == b"l"


async def test_queue_shares_a_file_with_the_job_store(db: Path) -> None:
    async with await SQLiteJobStore.open(db) as store, LocalQueue(db) as queue:
        await queue.send(b"x", message_id="m")
        await store.ping()
        assert (await receive_one(queue, max_wait=0)).message_id == "m"


async def test_messages_survive_reopening_the_file(db: Path) -> None:
    async with LocalQueue(db) as queue:
        number = await queue.send(b"kept", message_id="m")
    async with LocalQueue(db) as queue:
        message = await receive_one(queue, max_wait=0)
    assert (message.sequence_number, message.body) == (number, b"kept")


async def test_empty_message_id_is_rejected(queue: LocalQueue) -> None:
    with pytest.raises(ValueError, match="message_id must be a non-empty string"):
        await queue.send(b"x", message_id="")


async def test_naive_scheduled_enqueue_time_is_rejected(queue: LocalQueue) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await queue.send(b"x", message_id="m", scheduled_enqueue_time=datetime.now())


async def test_unopenable_file_raises_queue_unavailable(tmp_path: Path) -> None:
    with pytest.raises(QueueUnavailableError, match="cannot open local queue"):
        await LocalQueue(tmp_path).open()  # a directory, not a database file


async def test_concurrent_consumers_in_one_process_never_share_a_message(db: Path) -> None:
    async with LocalQueue(db) as producer:
        sent = {await producer.send(b"x", message_id=f"m{i}") for i in range(200)}
    held: set[int] = set()
    received: Counter[int] = Counter()

    async def consume(queue: LocalQueue) -> None:
        while True:
            batch = await queue.receive(max_messages=3, max_wait=0.05)
            if not batch and (await queue.depth()).active == 0:
                return
            for message in batch:
                assert message.sequence_number not in held, "two consumers hold one message"
                held.add(message.sequence_number)
                received[message.sequence_number] += 1
            for message in batch:
                await queue.complete(message)
                held.discard(message.sequence_number)

    # Several connections, each shared by several tasks: both kinds of sharing at once.
    queues = [LocalQueue(db) for _ in range(4)]
    for q in queues:
        await q.open()
    try:
        await asyncio.gather(*(consume(q) for q in queues for _ in range(2)))
    finally:
        for q in queues:
            await q.close()

    assert set(received) == sent
    assert set(received.values()) == {1}


CONSUMER = """
import asyncio, json, sys
from worker.local_queue import LocalQueue

async def main(path):
    async with LocalQueue(path) as queue:
        print("ready", flush=True)
        sys.stdin.readline()
        while True:
            batch = await queue.receive(max_messages=2, max_wait=0.05)
            if not batch and (await queue.depth()).active == 0:
                return
            for message in batch:
                print(json.dumps([message.sequence_number, message.delivery_count]), flush=True)
                await queue.complete(message)

asyncio.run(main(sys.argv[1]))
"""


async def test_two_processes_never_receive_the_same_message(db: Path) -> None:
    async with LocalQueue(db) as producer:
        sent = {await producer.send(b"x", message_id=f"m{i}") for i in range(300)}
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CONSUMER,
            str(db),
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert await asyncio.wait_for(process.stdout.readline(), 30) == b"ready\n"
        # Released together, so the consumers really contend for the same rows.
        outputs = await asyncio.wait_for(asyncio.gather(*(process.communicate(b"go\n") for process in processes)), 45)
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()

    per_process: list[list[int]] = []
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()
        records = [json.loads(line) for line in stdout.decode().splitlines()]
        assert all(delivery_count == 1 for _, delivery_count in records)
        per_process.append([number for number, _ in records])
    received = Counter(number for numbers in per_process for number in numbers)
    assert set(received) == sent
    assert set(received.values()) == {1}
    assert sum(1 for numbers in per_process if numbers) >= 2, "the consumers did not run concurrently"
