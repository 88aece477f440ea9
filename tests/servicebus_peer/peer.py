"""``ServiceBusPeer``: the AMQP test peer on a background reactor thread, and its test-facing API.

Every inspection and fault-injection call is run on the reactor thread through an
event injector, so tests never touch proton or the store concurrently with it. Beside
the AMQP port the peer serves the management REST API over HTTPS on a port of its own,
with a self-signed certificate made at start (see ``admin_http``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from proton import Condition
from proton.reactor import ApplicationEvent, Container, EventInjector

from tests.servicebus_peer.admin_http import ManagementServer
from tests.servicebus_peer.broker import Broker
from tests.servicebus_peer.store import DeadLettered, Namespace, QueueRuntime
from tests.servicebus_peer.tls import Certificate, self_signed

T = TypeVar("T")

CALL_TIMEOUT = 10.0
CLOSE_GRACE = 2.0
STOP_TIMEOUT = 5.0


def _connection_string(endpoint: str) -> str:
    return f"Endpoint=sb://{endpoint};SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"


class PeerError(RuntimeError):
    """The peer is not running, or a call into its reactor failed."""


class ServiceBusPeer:
    """An AMQP 1.0 peer speaking enough of the Service Bus dialect for the unmodified SDK."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        lock_duration: float = 30.0,
        max_delivery_count: int = 10,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._namespace = Namespace(lock_duration=lock_duration, max_delivery_count=max_delivery_count)
        self._broker = Broker(self._namespace)
        self._container: Container | None = None
        self._injector: EventInjector | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._stopped = False
        self._files: tempfile.TemporaryDirectory[str] | None = None
        self._certificate: Certificate | None = None
        self._management: ManagementServer | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind the ports and start serving on daemon threads."""
        if self._thread is not None or self._stopped:
            raise PeerError("a peer starts once; create a new one")
        self._start_management()
        container = Container(self._broker)
        try:
            acceptor = container.acceptor(self.host, str(self._requested_port))
        except BaseException:
            self._stop_management()
            raise
        # The acceptor does not report the port it bound; its socket does (port 0 = any free port).
        self._port = int(acceptor._selectable.getsockname()[1])
        self._broker.acceptor_close = acceptor.close
        self._injector = EventInjector()
        container.selectable(self._injector)
        self._container = container
        self._thread = threading.Thread(target=self._run, name=f"servicebus-peer-{self._port}", daemon=True)
        self._thread.start()
        return self

    def _start_management(self) -> None:
        """Make the certificate and start the HTTPS management endpoint."""
        self._files = tempfile.TemporaryDirectory(prefix="servicebus-peer-")
        try:
            self._certificate = self_signed(Path(self._files.name), self.host)
            self._management = ManagementServer(self.host, self._certificate, self._runtime, self._broker.errors)
            self._management.start()
        except BaseException:
            self._stop_management()
            raise

    def _stop_management(self) -> None:
        if self._management is not None:
            self._management.stop()
            self._management = None
        if self._files is not None:
            self._files.cleanup()
            self._files = None

    def _runtime(self, queue: str) -> QueueRuntime | None:
        """Runtime properties for the management endpoint, read on the reactor thread."""
        return self._call(lambda: self._namespace.runtime(queue))

    def _run(self) -> None:
        assert self._container is not None
        try:
            self._container.run()
        except Exception as exc:  # the reactor itself failed; surface it through `errors`
            self._broker.errors.append(exc)

    def stop(self) -> None:
        """Close every connection (waiting briefly for clients to answer) and end the reactor thread."""
        # First, so no management request is still asking the reactor for queue state.
        self._stop_management()
        thread, container, injector = self._thread, self._container, self._injector
        if thread is None or container is None or injector is None:
            return
        with contextlib.suppress(PeerError):  # a reactor that already died has nothing to close
            self._call(self._broker.shutdown)
            deadline = time.monotonic() + CLOSE_GRACE
            while self._call(lambda: bool(self._broker.connections)) and time.monotonic() < deadline:
                time.sleep(0.01)
            # Clients that never answer the close would keep the reactor alive; stop regardless.
            self._call(self._broker.abort)
            self._call(container.stop)
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            raise PeerError("the peer's reactor did not stop")
        # Proton never closes an injector's pipe.
        for fd in injector.pipe:
            os.close(fd)
        self._thread = None
        self._stopped = True

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The TCP port the peer listens on."""
        if not self._port:
            raise PeerError("the peer is not started")
        return self._port

    @property
    def connection_string(self) -> str:
        """A connection string the SDK accepts: development endpoint, so no TLS and any key."""
        return _connection_string(f"{self.host}:{self.port}")

    @property
    def management_port(self) -> int:
        """The TCP port of the HTTPS management endpoint."""
        if self._management is None:
            raise PeerError("the peer is not started")
        return self._management.port

    @property
    def management_endpoint(self) -> str:
        """``host:port`` of the management endpoint, where an administration client must be pointed."""
        return f"{self.host}:{self.management_port}"

    @property
    def admin_connection_string(self) -> str:
        """A connection string whose endpoint is the management endpoint (for the administration client)."""
        return _connection_string(self.management_endpoint)

    @property
    def certificate_path(self) -> Path:
        """The management endpoint's self-signed certificate (PEM): the CA bundle a client must trust."""
        if self._certificate is None:
            raise PeerError("the peer is not started")
        return self._certificate.certificate_path

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised inside the peer's handlers (a test can assert there are none)."""
        return list(self._broker.errors)

    # -- thread hop -----------------------------------------------------------------------

    def _call(self, function: Callable[[], T]) -> T:
        """Run ``function`` on the reactor thread and return its result."""
        if self._thread is None or not self._thread.is_alive() or self._injector is None:
            raise PeerError("the peer is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

        self._broker.calls.append(run)  # deque appends are atomic; the reactor pops
        self._injector.trigger(ApplicationEvent("peer_call"))
        try:
            return future.result(CALL_TIMEOUT)
        except concurrent.futures.TimeoutError as exc:
            raise PeerError("the peer's reactor did not answer") from exc

    # -- queues and inspection ---------------------------------------------------------------

    def create_queue(
        self, name: str, *, lock_duration: float | None = None, max_delivery_count: int | None = None
    ) -> None:
        """Create a queue with its own lock duration / max delivery count (else the peer's)."""

        def create() -> None:
            if self._namespace.exists(name):
                raise PeerError(f"queue {name!r} already exists")
            self._namespace.create_queue(name, lock_duration=lock_duration, max_delivery_count=max_delivery_count)

        self._call(create)

    def active_count(self, queue: str) -> int:
        """Messages a receiver can get or currently holds locked."""
        return self._call(lambda: self._namespace.resolve(queue).active_count)

    def locked_count(self, queue: str) -> int:
        """Messages currently peek-locked by a receiver."""
        return self._call(lambda: len(self._namespace.resolve(queue).locked))

    def scheduled_count(self, queue: str) -> int:
        """Messages waiting for their scheduled enqueue time."""
        return self._call(lambda: len(self._namespace.resolve(queue).scheduled))

    def dead_letter_count(self, queue: str) -> int:
        """Messages in the queue's dead-letter sub-queue."""
        return len(self.dead_lettered(queue))

    def dead_lettered(self, queue: str) -> list[DeadLettered]:
        """The dead-letter sub-queue's messages, with reason and description."""
        return self._call(lambda: self._namespace.resolve(queue).dead_lettered())

    def attach_count(self, queue: str) -> int:
        """How many send/receive links have ever attached to the queue (reconnects add to it)."""
        return self._call(lambda: self._broker.attaches[self._namespace.resolve(queue).name])

    def renewal_count(self, queue: str) -> int:
        """How many lock renewals the queue's management node has granted."""
        return self._call(lambda: self._broker.renewals[self._namespace.resolve(queue).name])

    # -- fault injection --------------------------------------------------------------------

    def drop_links(self, queue: str) -> int:
        """Detach the queue's send/receive links with detach-forced; the client must re-attach."""
        return self._call(lambda: self._broker.drop_links(self._namespace.resolve(queue).name))

    def expire_locks(self, queue: str) -> int:
        """Let every lock on the queue lapse now: redelivery, and lock-lost for the old holders."""
        return self._call(lambda: self._broker.expire_locks(queue))

    def refuse_next_settlement(
        self,
        queue: str,
        condition: str = "amqp:internal-error",
        description: str = "The test peer refused this settlement.",
    ) -> None:
        """Answer the queue's next settlement with this error instead of applying it.

        Applies to a receive-link disposition or a management update-disposition, whichever
        comes first. The SDK retries retryable conditions (the default one included), so
        arm several refusals, or use a client without retries, to see the error surface.
        """
        refusal = Condition(condition, description)

        def arm() -> None:
            name = self._namespace.resolve(queue).name
            self._broker.refusals.setdefault(name, deque()).append(refusal)

        self._call(arm)

    def refusals_pending(self, queue: str) -> int:
        """Armed refusals the queue's settlements have not used up yet."""
        return self._call(lambda: len(self._broker.refusals.get(self._namespace.resolve(queue).name, ())))
