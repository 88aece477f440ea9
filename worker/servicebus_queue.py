"""The Queue protocol on Azure Service Bus (`azure.servicebus.aio`), in peek-lock mode.

One sender and one peek-lock receiver per queue, opened once. Lock renewal for in-flight
messages is done by the consume loop through `renew_lock`, the same way for every queue.
Queue depth comes from the administration client's runtime properties when it can reach
the namespace.

Prefetch stays 0: the SDK then gives the broker credit for what a receive asks for. The
consume loop asks for as many messages as it has free slots (`max_message_count`), so a full
queue fills a batch in one round trip without prefetch. A prefetched message would wait in
the client's buffer with its lock running and no renewal (the loop renews only messages it
has started), and past the lock duration its job would run twice. Credit left by a receive
that timed out stays with the broker: up to that many messages can arrive before the next
receive, which the loop makes at once, since their slots are still free.

Calls on one connection take turns: receive, settle and renew on the receiver's, send and
schedule on the sender's. The SDK's AMQP connection lets one caller at a time read its
socket, for up to 0.2 s per read: when two callers wait on it, one can take the frame the
other waits for and leave that one blocked for the whole read timeout. Measured on the test
peer: three settlements at once took 200 ms instead of 1.5 ms, four sends 200 ms instead
of 6 ms. A receive that waits for messages holds its turn for at most RECEIVE_TURN seconds
at a time, so settlements never wait long behind an idle queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Self

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError
from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender
from azure.servicebus.aio.management import ServiceBusAdministrationClient
from azure.servicebus.amqp import AmqpMessageBodyType
from azure.servicebus.exceptions import MessageLockLostError as SdkLockLostError
from azure.servicebus.exceptions import ServiceBusError

from worker.queue import (
    DeadLetteredMessage,
    MessageLockLostError,
    QueueDepth,
    QueueUnavailableError,
    ReceivedMessage,
)

log = logging.getLogger(__name__)
DEAD_LETTER_REASON = "DeadLetterReason"
DEAD_LETTER_DESCRIPTION = "DeadLetterErrorDescription"
# The longest a waiting receive keeps other calls off the receiver's connection: the SDK's
# socket read timeout, so one turn is about one read.
RECEIVE_TURN = 0.2


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _properties(message: ServiceBusReceivedMessage) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in (message.application_properties or {}).items()}


def _body(message: ServiceBusReceivedMessage) -> tuple[bytes, str | None]:
    """The body's bytes, or b"" and why there are none: a message is not always a data section."""
    body_type = message.body_type
    try:
        body = message.body
        if body_type == AmqpMessageBodyType.DATA:
            if isinstance(body, bytes | bytearray):
                return bytes(body), None
            return b"".join(bytes(part) for part in body), None
        # Some producers (JMS, AMQP libraries) put a text body in a value section: take it as its text.
        if body_type == AmqpMessageBodyType.VALUE and isinstance(body, bytes | bytearray | str):
            return (body.encode() if isinstance(body, str) else bytes(body)), None
    except (TypeError, ValueError) as exc:
        return b"", f"the body cannot be read as bytes: {exc}"
    held = "a sequence" if body_type == AmqpMessageBodyType.SEQUENCE else f"a {type(body).__name__} value"
    return b"", f"the body is {held}, not data or text"


def _checked_endpoint(endpoint: str) -> str:
    """An administration endpoint as the SDK takes it: ``host`` or ``host:port``, always spoken to over HTTPS."""
    if not endpoint or "/" in endpoint:
        raise ValueError(f"admin_endpoint must be host or host:port, not {endpoint!r}")
    return endpoint


def _with_endpoint(connection_string: str, endpoint: str) -> str:
    """The connection string with its Endpoint replaced; its credential parts are kept for the SDK to parse."""
    parts = []
    replaced = False
    for part in connection_string.strip().rstrip(";").split(";"):
        key, _, _ = part.partition("=")
        if key.strip().lower() == "endpoint":
            part = f"{key}=sb://{endpoint}/"
            replaced = True
        parts.append(part)
    if not replaced:
        raise ValueError("the connection string has no Endpoint to point elsewhere")
    return ";".join(parts)


class ServiceBusQueue:
    """A Service Bus queue behind the worker's Queue protocol."""

    def __init__(
        self,
        client: ServiceBusClient,
        name: str,
        *,
        admin: ServiceBusAdministrationClient | None = None,
        prefetch: int = 0,
    ) -> None:
        self.client = client
        self.name = name
        self.admin = admin
        self.prefetch = prefetch
        self._sender: ServiceBusSender | None = None
        self._receiver: ServiceBusReceiver | None = None
        self._locked: dict[str, ServiceBusReceivedMessage] = {}
        # One caller at a time on each link's connection (see the module docstring).
        self._turn = asyncio.Lock()
        self._sending = asyncio.Lock()

    @classmethod
    def from_connection_string(
        cls,
        connection_string: str,
        name: str,
        *,
        prefetch: int = 0,
        admin_endpoint: str | None = None,
        admin_connection_verify: bool | str = True,
    ) -> Self:
        """A queue reached with a connection string (shared access key).

        Management calls go to the namespace unless ``admin_endpoint`` (host:port) says otherwise;
        ``admin_connection_verify`` is azure-core's ``connection_verify`` (a CA bundle path to trust).
        """
        admin_connection_string = connection_string
        if admin_endpoint is not None:
            admin_connection_string = _with_endpoint(connection_string, _checked_endpoint(admin_endpoint))
        client = ServiceBusClient.from_connection_string(connection_string)
        try:
            admin: ServiceBusAdministrationClient | None = ServiceBusAdministrationClient.from_connection_string(
                admin_connection_string, connection_verify=admin_connection_verify
            )
        except ValueError:
            admin = None
        return cls(client, name, admin=admin, prefetch=prefetch)

    @classmethod
    def from_namespace(
        cls,
        namespace: str,
        credential: AsyncTokenCredential,
        name: str,
        *,
        prefetch: int = 0,
        admin_endpoint: str | None = None,
        admin_connection_verify: bool | str = True,
    ) -> Self:
        """A queue reached with Microsoft Entra ID (for example DefaultAzureCredential).

        ``admin_endpoint`` and ``admin_connection_verify`` as for ``from_connection_string``.
        """
        admin_host = namespace if admin_endpoint is None else _checked_endpoint(admin_endpoint)
        client = ServiceBusClient(namespace, credential)
        admin = ServiceBusAdministrationClient(admin_host, credential, connection_verify=admin_connection_verify)
        return cls(client, name, admin=admin, prefetch=prefetch)

    async def open(self) -> Self:
        """Open the sender and the peek-lock receiver."""
        self._sender = self.client.get_queue_sender(self.name)
        self._receiver = self.client.get_queue_receiver(self.name, prefetch_count=self.prefetch)
        # Open the links now: opened lazily, the first receive would spend its short wait on the
        # link handshake and time out.
        try:
            await self._sender.__aenter__()
            await self._receiver.__aenter__()
        except ServiceBusError as exc:
            await self.close()
            raise QueueUnavailableError(f"opening Service Bus queue {self.name!r}: {exc}") from exc
        return self

    async def close(self) -> None:
        """Close links, the client and the administration client."""
        for closable in (self._receiver, self._sender, self.client, self.admin):
            if closable is not None:
                try:
                    await closable.close()
                except ServiceBusError as exc:
                    log.warning("closing %s failed: %s", type(closable).__name__, exc)
        self._locked.clear()

    def _parts(self) -> tuple[ServiceBusSender, ServiceBusReceiver]:
        if self._sender is None or self._receiver is None:
            raise QueueUnavailableError(f"Service Bus queue {self.name!r} is not open")
        return self._sender, self._receiver

    async def send(
        self,
        body: bytes,
        *,
        message_id: str,
        application_properties: Mapping[str, str] | None = None,
        scheduled_enqueue_time: datetime | None = None,
    ) -> int:
        """Send now (returns 0: Service Bus does not report it) or schedule (returns its sequence number)."""
        if not message_id:
            raise ValueError("message_id must be a non-empty string")
        sender, _ = self._parts()
        message = ServiceBusMessage(
            body,
            message_id=message_id,
            application_properties=dict(application_properties or {}),  # type: ignore[arg-type]
            content_type="application/json",
        )
        try:
            async with self._sending:
                if scheduled_enqueue_time is not None:
                    [sequence] = await sender.schedule_messages(message, scheduled_enqueue_time.astimezone(UTC))
                    return sequence
                await sender.send_messages(message)
                return 0
        except ServiceBusError as exc:
            raise QueueUnavailableError(f"sending to {self.name}: {exc}") from exc

    async def receive(self, max_messages: int = 1, max_wait: float = 1.0) -> Sequence[ReceivedMessage]:
        """Lock and return up to max_messages, waiting at most max_wait seconds for the first.

        The SDK asks the broker for max_messages at once (one flow, one round trip), and after
        the first message arrives it waits up to 0.2 s more for the rest of the batch.
        """
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        _, receiver = self._parts()
        deadline = time.monotonic() + max(max_wait, 0.0)
        while True:
            # The SDK refuses a wait of 0; a millisecond takes what has already arrived.
            turn = min(max(deadline - time.monotonic(), 0.001), RECEIVE_TURN)
            try:
                async with self._turn:
                    messages = await receiver.receive_messages(max_message_count=max_messages, max_wait_time=turn)
            except ServiceBusError as exc:
                raise QueueUnavailableError(f"receiving from {self.name}: {exc}") from exc
            if messages or time.monotonic() >= deadline:
                break
        out = []
        for message in messages:
            token = str(message.lock_token)
            self._locked[token] = message
            body, body_error = _body(message)
            out.append(
                ReceivedMessage(
                    message_id=_text(message.message_id or ""),
                    body=body,
                    lock_token=token,
                    locked_until=message.locked_until_utc or datetime.now(UTC),
                    # The SDK reports prior deliveries (0 at first); the protocol counts this one too.
                    delivery_count=(message.delivery_count or 0) + 1,
                    enqueued_time=message.enqueued_time_utc or datetime.now(UTC),
                    sequence_number=message.sequence_number or 0,
                    application_properties=_properties(message),
                    body_error=body_error,
                )
            )
        return out

    def _held(self, message: ReceivedMessage) -> ServiceBusReceivedMessage:
        held = self._locked.get(message.lock_token)
        if held is None:
            raise MessageLockLostError(f"message {message.message_id} is settled or was not received here")
        return held

    async def _settle(self, message: ReceivedMessage, action: str, **kwargs: Any) -> None:
        _, receiver = self._parts()
        held = self._held(message)
        try:
            async with self._turn:
                await getattr(receiver, action)(held, **kwargs)
        except SdkLockLostError as exc:
            raise MessageLockLostError(str(exc)) from exc
        except ServiceBusError as exc:
            raise QueueUnavailableError(f"{action} on {self.name}: {exc}") from exc
        finally:
            self._locked.pop(message.lock_token, None)

    async def complete(self, message: ReceivedMessage) -> None:
        """Remove the message."""
        await self._settle(message, "complete_message")

    async def abandon(self, message: ReceivedMessage) -> None:
        """Release the lock for redelivery."""
        await self._settle(message, "abandon_message")

    async def dead_letter(self, message: ReceivedMessage, reason: str, description: str) -> None:
        """Move the message to the dead-letter sub-queue with a reason."""
        await self._settle(message, "dead_letter_message", reason=reason, error_description=description)

    async def renew_lock(self, message: ReceivedMessage) -> datetime:
        """Extend the lock; MessageLockLostError once it has expired."""
        _, receiver = self._parts()
        held = self._held(message)
        try:
            async with self._turn:
                return await receiver.renew_message_lock(held)
        except SdkLockLostError as exc:
            self._locked.pop(message.lock_token, None)
            raise MessageLockLostError(str(exc)) from exc
        except ServiceBusError as exc:
            raise QueueUnavailableError(f"renewing a lock on {self.name}: {exc}") from exc

    async def peek_dead_letters(
        self, max_messages: int = 100, from_sequence_number: int = 0
    ) -> Sequence[DeadLetteredMessage]:
        """Peek the dead-letter sub-queue without removing anything."""
        try:
            async with self.client.get_queue_receiver(self.name, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
                messages = await dlq.peek_messages(max_message_count=max_messages, sequence_number=from_sequence_number)
        except ServiceBusError as exc:
            raise QueueUnavailableError(f"peeking the dead-letter queue of {self.name}: {exc}") from exc
        out = []
        for message in messages:
            properties = _properties(message)
            out.append(
                DeadLetteredMessage(
                    message_id=_text(message.message_id or ""),
                    body=_body(message)[0],
                    reason=_text(message.dead_letter_reason or properties.get(DEAD_LETTER_REASON, "")),
                    description=_text(
                        message.dead_letter_error_description or properties.get(DEAD_LETTER_DESCRIPTION, "")
                    ),
                    delivery_count=message.delivery_count or 0,
                    enqueued_time=message.enqueued_time_utc or datetime.now(UTC),
                    sequence_number=message.sequence_number or 0,
                    application_properties=properties,
                )
            )
        return out

    async def depth(self) -> QueueDepth:
        """Active, scheduled and dead-lettered counts from the queue's runtime properties."""
        if self.admin is None:
            raise QueueUnavailableError("no administration client: queue depth is not available")
        try:
            props = await self.admin.get_queue_runtime_properties(self.name)
        except AzureError as exc:  # the management API speaks HTTP; its errors are azure-core's, not ServiceBusErrors
            raise QueueUnavailableError(f"reading runtime properties of {self.name}: {exc}") from exc
        return QueueDepth(
            active=props.active_message_count or 0,
            scheduled=props.scheduled_message_count or 0,
            dead_letter=props.dead_letter_message_count or 0,
        )
