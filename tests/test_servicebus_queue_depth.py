"""Queue depth from the management REST API: the SDK's administration client and the adapter, against the peer.

The async administration client always speaks HTTPS, so these tests trust the peer's
self-signed certificate as a CA bundle; with the default (system trust) it is refused.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ResourceNotFoundError
from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.aio.management import ServiceBusAdministrationClient

from tests.components import wait_until
from tests.servicebus_peer import ServiceBusPeer
from worker.queue import QueueDepth, QueueUnavailableError, ReceivedMessage
from worker.servicebus_queue import ServiceBusQueue

LATER = datetime.timedelta(hours=1)
NAMESPACE_CONNECTION_STRING = "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=v"


@pytest.fixture
def peer(servicebus_peer: ServiceBusPeer) -> ServiceBusPeer:
    return servicebus_peer


@pytest.fixture
def queue(peer: ServiceBusPeer) -> Iterator[str]:
    name = f"depth-{uuid.uuid4().hex[:12]}"
    yield name
    assert peer.errors == []


@pytest.fixture
async def admin(peer: ServiceBusPeer) -> AsyncIterator[ServiceBusAdministrationClient]:
    async with ServiceBusAdministrationClient.from_connection_string(
        peer.admin_connection_string, connection_verify=str(peer.certificate_path)
    ) as admin:
        yield admin


@pytest.fixture
async def client(peer: ServiceBusPeer) -> AsyncIterator[ServiceBusClient]:
    async with ServiceBusClient.from_connection_string(peer.connection_string) as client:
        yield client


@pytest.fixture
async def adapter(peer: ServiceBusPeer, queue: str) -> AsyncIterator[ServiceBusQueue]:
    sb_queue = ServiceBusQueue.from_connection_string(
        peer.connection_string,
        queue,
        admin_endpoint=peer.management_endpoint,
        admin_connection_verify=str(peer.certificate_path),
    )
    try:
        yield await sb_queue.open()
    finally:
        await sb_queue.close()


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def receive(receiver: ServiceBusReceiver, count: int, within: float = 10.0) -> list[ServiceBusReceivedMessage]:
    """Exactly ``count`` messages; a receive may return fewer than asked for, so keep asking until the deadline."""
    received: list[ServiceBusReceivedMessage] = []

    async def got_all() -> bool:
        if len(received) < count:
            received.extend(await receiver.receive_messages(max_message_count=count - len(received), max_wait_time=1))
        return len(received) >= count

    await wait_until(got_all, f"{count} messages", within=within, detail=lambda: f"received {len(received)}")
    assert len(received) == count, f"received {len(received)} of {count}"
    return received


async def receive_one(sb_queue: ServiceBusQueue, within: float = 10.0) -> ReceivedMessage:
    received: list[ReceivedMessage] = []

    async def got_one() -> bool:
        received.extend(await sb_queue.receive(max_messages=1, max_wait=1))
        return bool(received)

    await wait_until(got_one, "a message", within=within)
    return received[0]


# -- the administration client against the peer ------------------------------------------------


async def test_new_queue_reports_zero_counts(
    peer: ServiceBusPeer, admin: ServiceBusAdministrationClient, queue: str
) -> None:
    peer.create_queue(queue)
    props = await admin.get_queue_runtime_properties(queue)
    assert props.name == queue
    assert (props.active_message_count, props.scheduled_message_count, props.dead_letter_message_count) == (0, 0, 0)
    assert (props.total_message_count, props.size_in_bytes) == (0, 0)
    assert (props.transfer_message_count, props.transfer_dead_letter_message_count) == (0, 0)
    assert props.created_at_utc is not None
    assert props.created_at_utc <= utc_now()


async def test_runtime_properties_count_sent_scheduled_locked_and_dead_lettered_messages(
    peer: ServiceBusPeer, admin: ServiceBusAdministrationClient, client: ServiceBusClient, queue: str
) -> None:
    async with client.get_queue_sender(queue) as sender, client.get_queue_receiver(queue) as receiver:
        await sender.send_messages([ServiceBusMessage(f"m-{i}") for i in range(4)])
        await sender.schedule_messages(ServiceBusMessage("later"), utc_now() + LATER)
        poison, held = await receive(receiver, 2)
        await receiver.dead_letter_message(poison, reason="BadInput", error_description="body is not JSON")

        props = await admin.get_queue_runtime_properties(queue)
        # The message `held` is still locked: Service Bus counts locked messages as active.
        assert props.active_message_count == 3
        assert props.scheduled_message_count == 1
        assert props.dead_letter_message_count == 1
        assert props.total_message_count == 5
        assert props.size_in_bytes is not None
        assert props.size_in_bytes > 0
        assert props.created_at_utc is not None
        assert props.accessed_at_utc is not None
        assert props.created_at_utc <= props.accessed_at_utc <= utc_now()
        assert (props.active_message_count, props.scheduled_message_count, props.dead_letter_message_count) == (
            peer.active_count(queue),
            peer.scheduled_count(queue),
            peer.dead_letter_count(queue),
        )

        await receiver.complete_message(held)
    props = await admin.get_queue_runtime_properties(queue)
    assert (props.active_message_count, props.total_message_count) == (2, 4)


async def test_queue_properties_report_the_queues_lock_duration_and_max_delivery_count(
    peer: ServiceBusPeer, admin: ServiceBusAdministrationClient, queue: str
) -> None:
    peer.create_queue(queue, lock_duration=2.5, max_delivery_count=3)
    props = await admin.get_queue(queue)
    assert props.lock_duration == datetime.timedelta(seconds=2.5)
    assert props.max_delivery_count == 3


async def test_unknown_queue_raises_resource_not_found_and_is_not_created(
    admin: ServiceBusAdministrationClient,
) -> None:
    name = f"never-used-{uuid.uuid4().hex[:8]}"
    # Twice: looking a queue up must not create it, though the peer creates queues on first AMQP use.
    for _ in range(2):
        with pytest.raises(ResourceNotFoundError):
            await admin.get_queue_runtime_properties(name)


async def test_management_request_without_credentials_is_refused(peer: ServiceBusPeer, queue: str) -> None:
    peer.create_queue(queue)
    trust = ssl.create_default_context(cafile=peer.certificate_path)
    url = f"https://{peer.management_endpoint}/{queue}?api-version=2021-05"
    async with aiohttp.ClientSession() as session, session.get(url, ssl=trust) as response:
        assert response.status == 401
        assert "<Code>401</Code>" in await response.text()


def test_stopped_peer_closes_its_management_port_and_removes_its_certificate() -> None:
    with ServiceBusPeer() as peer:
        certificate, port = peer.certificate_path, peer.management_port
        assert certificate.is_file()
    assert not certificate.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((peer.host, port), timeout=5).close()


# -- the adapter -----------------------------------------------------------------------------


async def test_depth_reports_active_scheduled_and_dead_lettered_messages(
    peer: ServiceBusPeer, adapter: ServiceBusQueue, queue: str
) -> None:
    assert await adapter.depth() == QueueDepth(active=0, scheduled=0, dead_letter=0)
    for i in range(3):
        await adapter.send(b'{"n": %d}' % i, message_id=f"m-{i}")
    await adapter.send(b"{}", message_id="later", scheduled_enqueue_time=utc_now() + LATER)
    poison = await receive_one(adapter)
    await adapter.dead_letter(poison, "BadInput", "body is not JSON")

    depth = await adapter.depth()
    assert depth == QueueDepth(active=2, scheduled=1, dead_letter=1)
    assert depth == QueueDepth(
        active=peer.active_count(queue),
        scheduled=peer.scheduled_count(queue),
        dead_letter=peer.dead_letter_count(queue),
    )


async def test_depth_of_a_queue_that_does_not_exist_is_unavailable(peer: ServiceBusPeer) -> None:
    # Not opened: opening attaches links, and the peer creates a queue on first use.
    sb_queue = ServiceBusQueue.from_connection_string(
        peer.connection_string,
        f"never-used-{uuid.uuid4().hex[:8]}",
        admin_endpoint=peer.management_endpoint,
        admin_connection_verify=str(peer.certificate_path),
    )
    try:
        with pytest.raises(QueueUnavailableError, match="does not exist"):
            await sb_queue.depth()
    finally:
        await sb_queue.close()


@pytest.mark.slow
async def test_depth_refuses_the_management_certificate_unless_its_ca_bundle_is_given(
    peer: ServiceBusPeer, queue: str
) -> None:
    # About five seconds: the SDK retries the failed connection with back-off before giving up.
    peer.create_queue(queue)
    sb_queue = ServiceBusQueue.from_connection_string(
        peer.connection_string, queue, admin_endpoint=peer.management_endpoint
    )
    try:
        with pytest.raises(QueueUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await sb_queue.depth()
    finally:
        await sb_queue.close()


async def test_admin_endpoint_defaults_to_the_namespace_and_can_be_pointed_elsewhere() -> None:
    default = ServiceBusQueue.from_connection_string(NAMESPACE_CONNECTION_STRING, "q")
    elsewhere = ServiceBusQueue.from_connection_string(
        NAMESPACE_CONNECTION_STRING, "q", admin_endpoint="127.0.0.1:5443"
    )
    try:
        assert default.admin is not None
        assert default.admin.fully_qualified_namespace == "ns.servicebus.windows.net"
        assert elsewhere.admin is not None
        assert elsewhere.admin.fully_qualified_namespace == "127.0.0.1:5443"
    finally:
        await default.close()
        await elsewhere.close()


class _StaticCredential:
    """A token credential that is never asked for a token: nothing here makes a request."""

    async def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        raise AssertionError("no request was expected")

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> _StaticCredential:
        return self

    async def __aexit__(self, *args: object) -> None:
        return None


async def test_admin_endpoint_for_a_namespace_defaults_to_the_namespace_and_can_be_pointed_elsewhere() -> None:
    default = ServiceBusQueue.from_namespace("ns.servicebus.windows.net", _StaticCredential(), "q")
    elsewhere = ServiceBusQueue.from_namespace(
        "ns.servicebus.windows.net", _StaticCredential(), "q", admin_endpoint="127.0.0.1:5443"
    )
    try:
        assert default.admin is not None
        assert default.admin.fully_qualified_namespace == "ns.servicebus.windows.net"
        assert elsewhere.admin is not None
        assert elsewhere.admin.fully_qualified_namespace == "127.0.0.1:5443"
    finally:
        await default.close()
        await elsewhere.close()


@pytest.mark.parametrize("endpoint", ["https://127.0.0.1:5443", "127.0.0.1:5443/", ""])
def test_admin_endpoint_must_be_a_host_and_port(endpoint: str) -> None:
    with pytest.raises(ValueError, match="host or host:port"):
        ServiceBusQueue.from_connection_string(NAMESPACE_CONNECTION_STRING, "q", admin_endpoint=endpoint)
    with pytest.raises(ValueError, match="host or host:port"):
        ServiceBusQueue.from_namespace("ns.servicebus.windows.net", _StaticCredential(), "q", admin_endpoint=endpoint)
