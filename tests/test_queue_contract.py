"""The Queue contract (worker/queue.py), held on every queue: the local SQLite queue and Service Bus.

Service Bus runs through its test peer with the unmodified azure-servicebus SDK. Where the two
differ by design, the test says so and why; the contract itself is the same for both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from tests.components import wait_for, wait_until
from tests.queues import QueueBackend
from worker.queue import MessageLockLostError, Queue, QueueDepth, ReceivedMessage

SHORT_LOCK = 0.3
# Long enough for any receive to come back: a test that polls for a message fails, not hangs.
WAIT = 5.0


async def receive_one(queue: Queue, max_wait: float = WAIT) -> ReceivedMessage:
    messages = await queue.receive(max_messages=1, max_wait=max_wait)
    assert len(messages) == 1, f"expected one message within {max_wait}s, got {messages}"
    return messages[0]


async def receive_all(queue: Queue, count: int, max_messages: int) -> list[ReceivedMessage]:
    """Receive count messages in calls of at most max_messages, checking each call keeps the bound.

    A Service Bus receive may return part of a batch that has not all arrived on the link yet
    (the SDK waits 0.2 s after the first message), so callers collect until they have them all.
    """
    received: list[ReceivedMessage] = []

    async def got_all() -> bool:
        if len(received) >= count:
            return True
        batch = await queue.receive(max_messages=max_messages, max_wait=WAIT)
        assert len(batch) <= max_messages
        received.extend(batch)
        return len(received) >= count

    await wait_until(got_all, f"{count} messages", within=WAIT, detail=lambda: f"got {len(received)}")
    assert len(received) == count, f"expected {count} messages, got {len(received)}"
    return received


async def wait_until_past(moment: datetime) -> None:
    await asyncio.to_thread(wait_for, lambda: datetime.now(UTC) > moment, WAIT, f"the clock to pass {moment}")


def sequence_numbers(messages: Sequence[ReceivedMessage]) -> list[int]:
    return [m.sequence_number for m in messages]


async def test_receive_locks_messages_in_send_order_with_their_content(queues: QueueBackend) -> None:
    queue = await queues.new()
    before = datetime.now(UTC) - timedelta(milliseconds=1)  # Service Bus times have millisecond precision
    await queue.send(b"one", message_id="a", application_properties={"tenantId": "t1"})
    await queue.send(b"two", message_id="b")
    await queue.send(b"three", message_id="c")

    batch = await receive_all(queue, 2, max_messages=2)

    assert [(m.message_id, m.body) for m in batch] == [("a", b"one"), ("b", b"two")]
    assert dict(batch[0].application_properties) == {"tenantId": "t1"}
    assert dict(batch[1].application_properties) == {}
    assert all(m.delivery_count == 1 for m in batch)
    assert batch[0].lock_token != batch[1].lock_token
    assert all(before <= m.enqueued_time <= datetime.now(UTC) for m in batch)
    assert all(m.locked_until > datetime.now(UTC) + timedelta(seconds=20) for m in batch)
    [third] = await receive_all(queue, 1, max_messages=5)
    assert third.message_id == "c"
    numbers = sequence_numbers([*batch, third])
    assert numbers == sorted(set(numbers))


async def test_send_returns_the_sequence_number_the_message_is_received_with(queues: QueueBackend) -> None:
    queue = await queues.new()
    sent = [await queue.send(b"x", message_id=f"m{i}") for i in range(3)]
    received = sequence_numbers(await receive_all(queue, 3, max_messages=3))
    if queues.kind == "servicebus":
        # Service Bus assigns the number on the broker and the SDK's send does not report it;
        # only a scheduled send returns one (see the scheduled test). The adapter returns 0.
        assert sent == [0, 0, 0]
    else:
        assert sent == received
    assert received == sorted(set(received))


async def test_receive_returns_at_most_max_messages(queues: QueueBackend) -> None:
    queue = await queues.new()
    for i in range(5):
        await queue.send(b"x", message_id=f"m{i}")

    first = await queue.receive(max_messages=3, max_wait=WAIT)

    assert 1 <= len(first) <= 3
    rest = await receive_all(queue, 5 - len(first), max_messages=5)
    assert sorted(m.message_id for m in [*first, *rest]) == [f"m{i}" for i in range(5)]
    with pytest.raises(ValueError, match="max_messages"):
        await queue.receive(max_messages=0)


async def test_receive_on_an_empty_queue_waits_max_wait_and_no_longer(queues: QueueBackend) -> None:
    queue = await queues.new()
    started = time.monotonic()
    assert list(await queue.receive(max_wait=0.5)) == []
    elapsed = time.monotonic() - started
    # Generous above: the machine may be busy, but a receive must not sit out a fixed poll period.
    assert 0.5 <= elapsed < 2.0, elapsed


async def test_receive_returns_as_soon_as_a_message_arrives(queues: QueueBackend) -> None:
    queue = await queues.new()
    sender = await queues.receiver(queue)
    started = time.monotonic()

    async def send_soon() -> None:
        await asyncio.sleep(0.2)  # the arrival being timed, not a synchronisation
        await sender.send(b"x", message_id="late")

    sending = asyncio.create_task(send_soon())
    message = await receive_one(queue, max_wait=10.0)
    await sending
    assert message.message_id == "late"
    assert time.monotonic() - started < 3.0


async def test_locked_message_is_not_delivered_to_another_receiver(queues: QueueBackend) -> None:
    one = await queues.new()
    other = await queues.receiver(one)
    await one.send(b"x", message_id="m")
    await receive_one(one)

    assert list(await other.receive(max_wait=0.3)) == []
    assert list(await one.receive(max_wait=0.3)) == []


async def test_complete_removes_the_message_and_a_second_settlement_raises_lock_lost(queues: QueueBackend) -> None:
    queue = await queues.new()
    await queue.send(b"x", message_id="m")
    message = await receive_one(queue)

    await queue.complete(message)

    assert await queue.depth() == QueueDepth(active=0, scheduled=0, dead_letter=0)
    with pytest.raises(MessageLockLostError):
        await queue.complete(message)
    with pytest.raises(MessageLockLostError):
        await queue.abandon(message)


async def test_abandon_makes_the_message_visible_again_with_its_delivery_count_raised(queues: QueueBackend) -> None:
    queue = await queues.new()
    await queue.send(b"x", message_id="m")
    first = await receive_one(queue)

    await queue.abandon(first)

    again = await receive_one(queue)
    assert (again.message_id, again.sequence_number) == ("m", first.sequence_number)
    assert again.delivery_count == 2
    assert again.lock_token != first.lock_token


async def test_lock_expiry_redelivers_with_delivery_count_raised(queues: QueueBackend) -> None:
    one = await queues.new(lock_duration=SHORT_LOCK)
    other = await queues.receiver(one)
    await one.send(b"x", message_id="m")
    first = await receive_one(one)

    again = await receive_one(other)

    assert datetime.now(UTC) >= first.locked_until
    assert (again.message_id, again.sequence_number) == ("m", first.sequence_number)
    assert again.delivery_count == 2
    assert again.lock_token != first.lock_token


async def test_settling_after_the_lock_expired_raises_lock_lost(queues: QueueBackend) -> None:
    queue = await queues.new(lock_duration=SHORT_LOCK)
    await queue.send(b"x", message_id="m")
    message = await receive_one(queue)
    await wait_until_past(message.locked_until)

    with pytest.raises(MessageLockLostError):
        await queue.renew_lock(message)
    with pytest.raises(MessageLockLostError):
        await queue.complete(message)
    with pytest.raises(MessageLockLostError):
        await queue.abandon(message)
    with pytest.raises(MessageLockLostError):
        await queue.dead_letter(message, "Reason", "description")
    assert (await receive_one(queue)).delivery_count == 2


async def test_settling_a_lock_the_queue_dropped_raises_lock_lost_and_the_new_holder_settles(
    queues: QueueBackend,
) -> None:
    one = await queues.new()
    other = await queues.receiver(one)
    await one.send(b"x", message_id="m")
    stale = await receive_one(one)
    # Within its locked-until time as far as the receiver knows: only the queue can refuse it.
    await queues.expire_locks(one)
    current = await receive_one(other)

    assert stale.locked_until > datetime.now(UTC)
    with pytest.raises(MessageLockLostError):
        await one.complete(stale)
    await other.complete(current)
    assert await other.depth() == QueueDepth(active=0, scheduled=0, dead_letter=0)


async def test_renew_lock_extends_locked_until(queues: QueueBackend) -> None:
    queue = await queues.new(lock_duration=2.0)
    other = await queues.receiver(queue)
    await queue.send(b"x", message_id="m")
    message = await receive_one(queue)
    await wait_until_past(message.locked_until - timedelta(seconds=1.0))

    renewed = await queue.renew_lock(message)

    assert renewed >= message.locked_until + timedelta(seconds=0.9)
    await wait_until_past(message.locked_until)
    assert list(await other.receive(max_wait=0.2)) == []
    await queue.complete(message)
    assert await queue.depth() == QueueDepth(active=0, scheduled=0, dead_letter=0)


async def test_scheduled_message_is_invisible_until_its_time(queues: QueueBackend) -> None:
    queue = await queues.new()
    at = datetime.now(UTC) + timedelta(seconds=0.5)
    scheduled = await queue.send(b"later", message_id="later", scheduled_enqueue_time=at)
    await queue.send(b"now", message_id="now")

    assert (await receive_one(queue)).message_id == "now"
    assert (await queue.depth()).scheduled == 1
    assert list(await queue.receive(max_wait=0)) == []

    later = await receive_one(queue)
    assert datetime.now(UTC) >= at - timedelta(milliseconds=1)
    assert (later.message_id, later.body, later.sequence_number) == ("later", b"later", scheduled)
    # The message counts as enqueued when it became visible: at its scheduled time, not when sent.
    assert at - timedelta(milliseconds=1) <= later.enqueued_time < at + timedelta(seconds=1)
    if queues.kind == "local":
        # The local queue stamps the scheduled time itself; the peer, like the broker, stamps the
        # moment its timer moved the message into the active queue, a few milliseconds later.
        assert abs(later.enqueued_time - at) < timedelta(milliseconds=1)


async def test_dead_letter_keeps_reason_description_and_content(queues: QueueBackend) -> None:
    queue = await queues.new()
    await queue.send(b"x", message_id="m", application_properties={"tenantId": "t1"})
    message = await receive_one(queue)

    await queue.dead_letter(message, "ShardMissing", "shard s-1 not found")

    assert list(await queue.receive(max_wait=0.2)) == []
    for _ in range(2):  # peeking leaves the message where it is
        [dead] = await queue.peek_dead_letters()
        assert (dead.message_id, dead.body) == ("m", b"x")
        assert (dead.reason, dead.description) == ("ShardMissing", "shard s-1 not found")
        properties = dict(dead.application_properties)
        assert properties.pop("tenantId") == "t1"
        if queues.kind == "servicebus":
            # The broker also writes the reason into the message's own properties, as Azure does.
            reason = {"DeadLetterReason": "ShardMissing", "DeadLetterErrorDescription": "shard s-1 not found"}
            assert properties == reason
        else:
            assert properties == {}
        assert dead.enqueued_time == message.enqueued_time
    assert (await queue.depth()).dead_letter == 1


async def test_message_past_max_delivery_count_is_dead_lettered_by_the_queue(queues: QueueBackend) -> None:
    queue = await queues.new(max_delivery_count=2)
    await queue.send(b"poison", message_id="poison")
    for attempt in (1, 2):
        message = await receive_one(queue)
        assert message.delivery_count == attempt
        await queue.abandon(message)
    await queue.send(b"fine", message_id="fine")

    assert (await receive_one(queue)).message_id == "fine"

    [dead] = await queue.peek_dead_letters()
    assert (dead.message_id, dead.body) == ("poison", b"poison")
    assert dead.reason == "MaxDeliveryCountExceeded"
    assert dead.delivery_count == 2


async def test_peek_dead_letters_pages_in_sequence_order_from_a_sequence_number(queues: QueueBackend) -> None:
    queue = await queues.new()
    for i in range(4):
        await queue.send(b"x", message_id=f"m{i}")
    received = await receive_all(queue, 4, max_messages=4)
    for message in reversed(received):
        await queue.dead_letter(message, "Reason", "description")

    peeked = await queue.peek_dead_letters()

    if queues.kind == "servicebus":
        # The dead-letter sub-queue is a queue of its own: Service Bus numbers messages anew as
        # they arrive there, so its order is the order they were dead-lettered in.
        assert [d.message_id for d in peeked] == [f"m{i}" for i in reversed(range(4))]
    else:
        # The local queue keeps each message's number, so its order is the order they were sent in.
        assert [d.sequence_number for d in peeked] == sequence_numbers(received)
        assert [d.message_id for d in peeked] == [f"m{i}" for i in range(4)]
    numbers = [d.sequence_number for d in peeked]
    assert numbers == sorted(set(numbers))
    # A page starts at the sequence number given, inclusive: the reconciler resumes from the last one + 1.
    assert [d.sequence_number for d in await queue.peek_dead_letters(2, numbers[1])] == numbers[1:3]
    assert [d.sequence_number for d in await queue.peek_dead_letters(100, numbers[3] + 1)] == []


async def test_depth_counts_active_scheduled_and_dead_lettered(queues: QueueBackend) -> None:
    queue = await queues.new()
    for message_id in ("a", "b"):
        await queue.send(b"x", message_id=message_id)
    await queue.send(b"x", message_id="c", scheduled_enqueue_time=datetime.now(UTC) + timedelta(hours=1))
    await queue.send(b"x", message_id="d")
    assert await queue.depth() == QueueDepth(active=3, scheduled=1, dead_letter=0)

    a, b, d = await receive_all(queue, 3, max_messages=3)
    await queue.dead_letter(d, "Reason", "description")
    # Locked messages still count as active.
    assert await queue.depth() == QueueDepth(active=2, scheduled=1, dead_letter=1)

    await queue.abandon(b)
    await queue.complete(a)
    assert await queue.depth() == QueueDepth(active=1, scheduled=1, dead_letter=1)


async def test_empty_message_id_is_rejected(queues: QueueBackend) -> None:
    queue = await queues.new()
    with pytest.raises(ValueError, match="message_id must be a non-empty string"):
        await queue.send(b"x", message_id="")
