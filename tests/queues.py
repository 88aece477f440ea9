"""Fresh queues of each kind behind one interface, for tests that hold every Queue to one contract."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from pathlib import Path
from typing import Protocol

from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.aio.management import ServiceBusAdministrationClient

from tests.servicebus_peer import ServiceBusPeer
from worker.local_queue import LocalQueue
from worker.queue import Queue
from worker.servicebus_queue import ServiceBusQueue


class QueueBackend(Protocol):
    """Opens fresh queues of one kind; every queue it opened is closed by close()."""

    kind: str

    async def new(self, *, lock_duration: float = 30.0, max_delivery_count: int = 10) -> Queue:
        """A fresh, empty queue."""
        ...

    async def receiver(self, queue: Queue) -> Queue:
        """Another handle on the same queue, as a second worker would hold it."""
        ...

    async def expire_locks(self, queue: Queue) -> None:
        """Make every current lock on the queue run out now, as if its holder had stalled."""
        ...

    async def close(self) -> None:
        """Close every queue opened here."""
        ...


class LocalBackend:
    """Local queues in one SQLite file, each under its own name."""

    kind = "local"

    def __init__(self, db: Path) -> None:
        self.db = db
        self._opened: list[LocalQueue] = []

    async def _open(self, name: str, lock_duration: float, max_delivery_count: int) -> LocalQueue:
        queue = await LocalQueue(
            self.db, name, lock_duration=lock_duration, max_delivery_count=max_delivery_count
        ).open()
        self._opened.append(queue)
        return queue

    async def new(self, *, lock_duration: float = 30.0, max_delivery_count: int = 10) -> Queue:
        """A fresh queue in the shared file."""
        return await self._open(f"q-{uuid.uuid4().hex[:12]}", lock_duration, max_delivery_count)

    async def receiver(self, queue: Queue) -> Queue:
        """A second connection to the same queue with the same settings."""
        assert isinstance(queue, LocalQueue)
        return await self._open(queue.name, queue.lock_duration, queue.max_delivery_count)

    async def expire_locks(self, queue: Queue) -> None:
        """Every lock on the queue runs out now."""

        def run() -> None:
            with contextlib.closing(sqlite3.connect(self.db, isolation_level=None)) as conn:
                conn.execute(
                    "UPDATE queue_messages SET visible_at = 0 WHERE queue = ? AND lock_token IS NOT NULL",
                    (queue.name,),
                )

        await asyncio.to_thread(run)

    async def close(self) -> None:
        """Close every connection opened here."""
        for queue in self._opened:
            await queue.close()


class ServiceBusBackend:
    """Queues on the Service Bus test peer, reached through the real azure-servicebus SDK."""

    kind = "servicebus"

    def __init__(self, peer: ServiceBusPeer) -> None:
        self.peer = peer
        self._opened: list[ServiceBusQueue] = []

    async def _open(self, name: str) -> ServiceBusQueue:
        client = ServiceBusClient.from_connection_string(self.peer.connection_string, retry_backoff_factor=0.01)
        admin = ServiceBusAdministrationClient.from_connection_string(
            self.peer.admin_connection_string, connection_verify=str(self.peer.certificate_path)
        )
        queue = await ServiceBusQueue(client, name, admin=admin).open()
        self._opened.append(queue)
        return queue

    async def new(self, *, lock_duration: float = 30.0, max_delivery_count: int = 10) -> Queue:
        """A fresh queue on the peer; its lock duration and max delivery count belong to the queue."""
        name = f"q-{uuid.uuid4().hex[:12]}"
        self.peer.create_queue(name, lock_duration=lock_duration, max_delivery_count=max_delivery_count)
        return await self._open(name)

    async def receiver(self, queue: Queue) -> Queue:
        """A second client with its own connection to the same queue."""
        return await self._open(queue.name)

    async def expire_locks(self, queue: Queue) -> None:
        """The peer drops every lock on the queue; the SDK still believes it holds them."""
        self.peer.expire_locks(queue.name)

    async def close(self) -> None:
        """Close every client opened here, together: each close waits on its own links."""
        await asyncio.gather(*(queue.close() for queue in self._opened))
