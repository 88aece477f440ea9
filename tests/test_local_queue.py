"""The SQLite-backed queue across tasks, processes and files it shares.

The Queue protocol itself (peek-lock, settlement, scheduling, dead letters, depth) is held on
every queue by tests/test_queue_contract.py; these are the local queue's own cases.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from jobs.sqlite_store import SQLiteJobStore
from worker.local_queue import MAX_DELIVERY_COUNT_EXCEEDED, LocalQueue
from worker.queue import QueueDepth, QueueUnavailableError, ReceivedMessage

REPO_ROOT = Path(__file__).resolve().parents[1]
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


async def test_queue_dead_letter_names_the_constant_reason_and_the_attempts(db: Path) -> None:
    # The contract (tests/test_queue_contract.py) covers when; this is the local queue's wording.
    async with LocalQueue(db, max_delivery_count=2) as queue:
        await queue.send(b"poison", message_id="poison")
        for _ in range(2):
            await queue.abandon(await receive_one(queue))
        # The next receive moves it, finding it past the limit.
        assert list(await queue.receive(max_wait=0)) == []

        [dead] = await queue.peek_dead_letters()
        assert dead.reason == MAX_DELIVERY_COUNT_EXCEEDED == "MaxDeliveryCountExceeded"
        assert "2 delivery attempts" in dead.description


async def test_purge_dead_letters_removes_dead_letters_up_to_a_sequence_number(queue: LocalQueue) -> None:
    numbers = [await queue.send(b"x", message_id=f"m{i}") for i in range(3)]
    await queue.send(b"x", message_id="alive")
    for message in await queue.receive(max_messages=3, max_wait=0):
        await queue.dead_letter(message, "Reason", "description")

    assert await queue.purge_dead_letters(up_to_sequence_number=numbers[1]) == 2
    assert [d.sequence_number for d in await queue.peek_dead_letters()] == numbers[2:]
    assert await queue.purge_dead_letters() == 1
    assert await queue.depth() == QueueDepth(active=1, scheduled=0, dead_letter=0)


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
