"""The Service Bus test peer driven by the unmodified azure-servicebus SDK (async, and sync once).

Each test uses its own queue on one peer per module. Timing-dependent behaviour (lock
expiry, scheduling, auto-renewal) uses queues with lock durations of a second or
few, and waits on observable conditions with deadlines rather than fixed sleeps.
"""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from azure.servicebus import (
    ServiceBusClient as SyncServiceBusClient,
)
from azure.servicebus import (
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.aio import AutoLockRenewer, ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import MessageLockLostError, MessageNotFoundError, ServiceBusError

from tests.components import wait_until
from tests.servicebus_peer import ServiceBusPeer
from tests.servicebus_peer.__main__ import READY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def peer() -> Iterator[ServiceBusPeer]:
    with ServiceBusPeer() as peer:
        yield peer
    assert peer.errors == []


@pytest.fixture
def queue(peer: ServiceBusPeer) -> Iterator[str]:
    name = f"q-{uuid.uuid4().hex[:12]}"
    yield name
    assert peer.errors == []


@pytest.fixture
async def client(peer: ServiceBusPeer) -> AsyncIterator[ServiceBusClient]:
    async with ServiceBusClient.from_connection_string(peer.connection_string) as client:
        yield client


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def wait_for(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Poll until the condition holds; fail the test at the deadline."""
    await wait_until(condition, "the condition", within=within)


async def send(client: ServiceBusClient, queue: str, *bodies: str) -> None:
    async with client.get_queue_sender(queue) as sender:
        for body in bodies:
            await sender.send_messages(ServiceBusMessage(body))


async def receive_one(receiver: ServiceBusReceiver, max_wait_time: float = 5.0) -> ServiceBusReceivedMessage:
    messages = await receiver.receive_messages(max_message_count=1, max_wait_time=max_wait_time)
    assert len(messages) == 1, "expected one message"
    return messages[0]


# -- send, receive, settle ---------------------------------------------------------------------


async def test_sent_message_is_received_with_broker_properties_and_completed(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    async with client.get_queue_sender(queue) as sender:
        await sender.send_messages(
            ServiceBusMessage("hello", application_properties={"job": "j-1"}, message_id="m-1", subject="s")
        )
    before = utc_now()
    async with client.get_queue_receiver(queue) as receiver:
        message = await receive_one(receiver)
        assert str(message) == "hello"
        assert message.message_id == "m-1"
        assert message.subject == "s"
        assert message.application_properties == {b"job": b"j-1"}  # pyamqp decodes strings to bytes
        assert message.delivery_count == 0
        assert message.sequence_number == 1
        assert isinstance(message.lock_token, uuid.UUID)
        assert message.locked_until_utc is not None
        assert message.locked_until_utc > before + datetime.timedelta(seconds=25)
        assert message.enqueued_time_utc is not None
        assert peer.locked_count(queue) == 1
        await receiver.complete_message(message)
    assert peer.active_count(queue) == 0


async def test_batch_send_delivers_every_message_in_order(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    async with client.get_queue_sender(queue) as sender:
        batch = await sender.create_message_batch()
        for i in range(5):
            batch.add_message(ServiceBusMessage(f"batch-{i}"))
        await sender.send_messages(batch)
        await sender.send_messages([ServiceBusMessage("list-0"), ServiceBusMessage("list-1")])
    assert peer.active_count(queue) == 7
    received: list[str] = []
    async with client.get_queue_receiver(queue) as receiver:
        while len(received) < 7:
            for message in await receiver.receive_messages(max_message_count=7, max_wait_time=5):
                received.append(str(message))
                await receiver.complete_message(message)
    assert received == [f"batch-{i}" for i in range(5)] + ["list-0", "list-1"]


async def test_abandoned_message_is_redelivered_with_its_delivery_count_raised(
    client: ServiceBusClient, queue: str
) -> None:
    await send(client, queue, "retry-me")
    async with client.get_queue_receiver(queue) as receiver:
        first = await receive_one(receiver)
        assert first.delivery_count == 0
        await receiver.abandon_message(first)
        second = await receive_one(receiver)
        # Service Bus counts prior attempts in the AMQP header: 0 first time, 1 after one abandon.
        assert second.delivery_count == 1
        assert second.sequence_number == first.sequence_number
        assert second.lock_token != first.lock_token
        await receiver.complete_message(second)


async def test_dead_lettered_message_is_readable_with_its_reason_from_the_sub_queue(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    async with client.get_queue_sender(queue) as sender:
        await sender.send_messages(ServiceBusMessage("poison", message_id="job-7"))
    async with client.get_queue_receiver(queue) as receiver:
        message = await receive_one(receiver)
        await receiver.dead_letter_message(message, reason="BadInput", error_description="body is not JSON")
    assert peer.active_count(queue) == 0
    [dead] = peer.dead_lettered(queue)
    assert (dead.message_id, dead.reason, dead.description) == ("job-7", "BadInput", "body is not JSON")

    async with client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        dead_message = await receive_one(dlq)
        assert str(dead_message) == "poison"
        assert dead_message.dead_letter_reason == "BadInput"
        assert dead_message.dead_letter_error_description == "body is not JSON"
        await dlq.complete_message(dead_message)
    assert peer.dead_letter_count(queue) == 0


async def test_receive_and_delete_removes_the_message_on_delivery(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    await send(client, queue, "once")
    async with client.get_queue_receiver(queue, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
        message = await receive_one(receiver)
        assert str(message) == "once"
    assert peer.active_count(queue) == 0


async def test_peek_browses_messages_without_locking_them(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    await send(client, queue, "p-1", "p-2", "p-3")
    async with client.get_queue_receiver(queue) as receiver:
        peeked = await receiver.peek_messages(max_message_count=10)
        assert [str(m) for m in peeked] == ["p-1", "p-2", "p-3"]
        assert [m.sequence_number for m in peeked] == [1, 2, 3]
        assert peer.locked_count(queue) == 0
        assert await receiver.peek_messages(max_message_count=10, sequence_number=4) == []


async def test_closing_a_receiver_releases_its_prefetched_messages(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    await send(client, queue, "r-1", "r-2", "r-3")
    async with client.get_queue_receiver(queue, prefetch_count=10) as receiver:
        message = await receive_one(receiver)
        await receiver.complete_message(message)
        await wait_for(lambda: peer.locked_count(queue) == 2)
    await wait_for(lambda: peer.locked_count(queue) == 0)
    assert peer.active_count(queue) == 2
    async with client.get_queue_receiver(queue) as receiver:
        again = await receive_one(receiver)
        # Released, not abandoned: the attempt is not counted.
        assert again.delivery_count == 0
        await receiver.complete_message(again)


# -- scheduling --------------------------------------------------------------------------------


async def test_scheduled_message_is_invisible_until_its_time(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    # Both links are open before scheduling: opening one costs the SDK about half a second.
    async with client.get_queue_sender(queue) as sender, client.get_queue_receiver(queue) as receiver:
        due = utc_now() + datetime.timedelta(seconds=2)
        [sequence_number] = await sender.schedule_messages(ServiceBusMessage("later"), due)
        assert peer.scheduled_count(queue) == 1
        assert await receiver.receive_messages(max_wait_time=1) == []
        assert utc_now() < due, "the empty receive must have happened before the scheduled time"

        message = await receive_one(receiver, max_wait_time=10)
        assert utc_now() >= due
        assert str(message) == "later"
        assert message.sequence_number == sequence_number
        assert message.enqueued_time_utc is not None
        assert message.enqueued_time_utc >= due - datetime.timedelta(milliseconds=1)
        await receiver.complete_message(message)


async def test_cancelled_scheduled_message_is_never_delivered(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    async with client.get_queue_sender(queue) as sender, client.get_queue_receiver(queue) as receiver:
        due = utc_now() + datetime.timedelta(seconds=0.5)
        [sequence_number] = await sender.schedule_messages(ServiceBusMessage("never"), due)
        await sender.cancel_scheduled_messages(sequence_number)
        assert peer.scheduled_count(queue) == 0
        assert await receiver.receive_messages(max_wait_time=1.5) == []
        assert utc_now() > due


async def test_cancelling_an_unknown_scheduled_message_fails(peer: ServiceBusPeer, queue: str) -> None:
    # The SDK retries this error; without retries the test does not wait out the back-off.
    client = ServiceBusClient.from_connection_string(peer.connection_string, retry_total=0)
    async with client, client.get_queue_sender(queue) as sender:
        with pytest.raises(MessageNotFoundError):
            await sender.cancel_scheduled_messages(424242)


# -- locks --------------------------------------------------------------------------------------


async def test_renew_lock_keeps_a_message_past_its_original_expiry(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    peer.create_queue(queue, lock_duration=2.0)
    await send(client, queue, "renew-me")
    async with client.get_queue_receiver(queue) as receiver:
        message = await receive_one(receiver)
        original = message.locked_until_utc
        assert original is not None
        latest = original
        while utc_now() < original + datetime.timedelta(seconds=1):
            renewed = await receiver.renew_message_lock(message)
            assert renewed >= latest
            latest = renewed
            await asyncio.sleep(0.3)  # paces the renewals; nothing waits on it
        assert latest > original
        await receiver.complete_message(message)
    assert peer.active_count(queue) == 0
    assert peer.renewal_count(queue) >= 2


async def test_auto_lock_renewer_keeps_a_message_locked_past_its_lock_duration(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    # The renewer checks once a second and renews with ~3/4 of the lock left to run: a
    # 4-second lock leaves it margin for opening the management link on first use.
    peer.create_queue(queue, lock_duration=4.0)
    await send(client, queue, "long-job")
    renewer = AutoLockRenewer(max_lock_renewal_duration=30)
    async with client.get_queue_receiver(queue) as receiver:
        message = await receive_one(receiver)
        original = message.locked_until_utc
        assert original is not None
        renewer.register(receiver, message)
        await wait_for(lambda: utc_now() > original + datetime.timedelta(seconds=0.5), within=15)
        assert peer.renewal_count(queue) >= 1
        assert peer.locked_count(queue) == 1
        await receiver.complete_message(message)
    await renewer.close()
    assert message.auto_renew_error is None
    assert peer.active_count(queue) == 0
    assert peer.dead_letter_count(queue) == 0


async def test_expired_lock_redelivers_and_settling_the_old_message_fails(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    peer.create_queue(queue, lock_duration=1.0)
    await send(client, queue, "slow")
    async with client.get_queue_receiver(queue) as receiver:
        first = await receive_one(receiver)
        second = await receive_one(receiver, max_wait_time=10)
        assert second.sequence_number == first.sequence_number
        assert second.delivery_count == 1
        with pytest.raises(MessageLockLostError):
            await receiver.complete_message(first)
        await receiver.complete_message(second)
    assert peer.active_count(queue) == 0


async def test_message_is_dead_lettered_once_max_delivery_count_is_reached(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    peer.create_queue(queue, max_delivery_count=3)
    await send(client, queue, "doomed")
    async with client.get_queue_receiver(queue) as receiver:
        for attempt in range(3):
            message = await receive_one(receiver)
            assert message.delivery_count == attempt
            await receiver.abandon_message(message)
        assert await receiver.receive_messages(max_wait_time=0.5) == []
    async with client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        dead = await receive_one(dlq)
        assert str(dead) == "doomed"
        assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
        await dlq.complete_message(dead)


# -- fault injection ------------------------------------------------------------------------------


@pytest.fixture
async def fast_retry_client(peer: ServiceBusPeer) -> AsyncIterator[ServiceBusClient]:
    """A client whose retries do not wait out the SDK's default back-off (seconds per attempt)."""
    async with ServiceBusClient.from_connection_string(peer.connection_string, retry_backoff_factor=0.01) as client:
        yield client


async def test_sdk_reattaches_after_the_peer_drops_its_links(
    peer: ServiceBusPeer, fast_retry_client: ServiceBusClient, queue: str
) -> None:
    client = fast_retry_client
    async with client.get_queue_sender(queue) as sender, client.get_queue_receiver(queue) as receiver:
        await sender.send_messages(ServiceBusMessage("before"))
        before = await receive_one(receiver)
        attaches = peer.attach_count(queue)
        assert peer.drop_links(queue) == 2

        await sender.send_messages(ServiceBusMessage("after"))
        after = await receive_one(receiver)
        assert str(after) == "after"
        assert peer.attach_count(queue) == attaches + 2
        # The old receive link is gone; the SDK settles the earlier message by lock token
        # over the management link instead.
        await receiver.dead_letter_message(before, reason="Stale", error_description="held across a reconnect")
        await receiver.complete_message(after)
    assert peer.active_count(queue) == 0
    [dead] = peer.dead_lettered(queue)
    assert (dead.reason, dead.description) == ("Stale", "held across a reconnect")


async def test_peer_expired_locks_fail_settlement_with_lock_lost(
    peer: ServiceBusPeer, client: ServiceBusClient, queue: str
) -> None:
    await send(client, queue, "expire-me")
    async with client.get_queue_receiver(queue) as receiver:
        first = await receive_one(receiver)
        assert peer.expire_locks(queue) == 1
        with pytest.raises(MessageLockLostError):
            await receiver.complete_message(first)
        second = await receive_one(receiver)
        assert second.delivery_count == 1
        await receiver.complete_message(second)
    assert peer.active_count(queue) == 0


async def test_refused_settlement_is_retried_by_the_sdk_over_the_management_link(
    peer: ServiceBusPeer, fast_retry_client: ServiceBusClient, queue: str
) -> None:
    client = fast_retry_client
    await send(client, queue, "retried")
    async with client.get_queue_receiver(queue) as receiver:
        message = await receive_one(receiver)
        peer.refuse_next_settlement(queue)
        await receiver.complete_message(message)
    assert peer.active_count(queue) == 0
    assert peer.refusals_pending(queue) == 0


async def test_refused_settlement_raises_and_leaves_the_message_locked(peer: ServiceBusPeer, queue: str) -> None:
    # Without retries the first refusal reaches the caller.
    async with ServiceBusClient.from_connection_string(peer.connection_string, retry_total=0) as client:
        await send(client, queue, "sticky")
        async with client.get_queue_receiver(queue) as receiver:
            message = await receive_one(receiver)
            peer.refuse_next_settlement(queue)
            with pytest.raises(ServiceBusError, match="refused"):
                await receiver.complete_message(message)
            assert peer.locked_count(queue) == 1
    assert peer.active_count(queue) == 1


# -- sync client and separate process ---------------------------------------------------------------


def test_sync_client_sends_receives_abandons_and_dead_letters(peer: ServiceBusPeer, queue: str) -> None:
    with SyncServiceBusClient.from_connection_string(peer.connection_string) as client:
        with client.get_queue_sender(queue) as sender:
            sender.send_messages([ServiceBusMessage("s-1"), ServiceBusMessage("s-2")])
        with client.get_queue_receiver(queue) as receiver:
            first, second = receiver.receive_messages(max_message_count=2, max_wait_time=5)
            assert receiver.renew_message_lock(first) >= utc_now()
            receiver.abandon_message(first)
            receiver.dead_letter_message(second, reason="sync", error_description="from the sync client")
            again = receiver.receive_messages(max_message_count=1, max_wait_time=5)[0]
            assert (str(again), again.delivery_count) == ("s-1", 1)
            receiver.complete_message(again)
        with client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            dead = dlq.receive_messages(max_message_count=1, max_wait_time=5)[0]
            assert dead.dead_letter_reason == "sync"
            dlq.complete_message(dead)
    assert peer.active_count(queue) == 0
    assert peer.dead_letter_count(queue) == 0


def test_peer_runs_as_a_separate_process() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "tests.servicebus_peer", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(READY), line
        assert " management_port=" in line, line
        assert " certificate=" in line, line
        connection_string = line.split("connection_string=", 1)[1].strip()
        with SyncServiceBusClient.from_connection_string(connection_string) as client:
            with client.get_queue_sender("proc") as sender:
                sender.send_messages(ServiceBusMessage("across processes"))
            with client.get_queue_receiver("proc") as receiver:
                [message] = receiver.receive_messages(max_message_count=1, max_wait_time=5)
                assert str(message) == "across processes"
                receiver.complete_message(message)
        process.terminate()
        assert process.wait(timeout=10) == 0
