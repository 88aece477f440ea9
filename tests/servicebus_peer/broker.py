"""The peer's proton event handler: links, transfers and dispositions in the Service Bus dialect.

Everything here runs on the reactor thread. Addresses are routed by shape: ``$cbs``
(claims-based security), ``<entity>/$management`` (request/response), else a queue or
its ``/$deadletterqueue`` sub-queue.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import urlsplit

from proton import Condition, Connection, Delivery, Endpoint, Event, Handler, Link, Message, Session
from proton._reactor import Task

from tests.servicebus_peer import codec, management
from tests.servicebus_peer.store import Entity, Envelope, Namespace

_LOG = logging.getLogger(__name__)

CBS = "$cbs"
MANAGEMENT_SUFFIX = "/$management"
DEAD_LETTER_CONDITION = "com.microsoft:dead-letter"
DETACH_FORCED = "amqp:link:detach-forced"
PRODUCER_CREDIT = 100
TICK_SECONDS = 0.02

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def guarded(
    method: Callable[Concatenate[Broker, P], R],
) -> Callable[Concatenate[Broker, P], R | None]:
    """Record a handler's exception instead of letting it end the reactor (and every client with it)."""

    def wrapper(self: Broker, /, *args: P.args, **kwargs: P.kwargs) -> R | None:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            _LOG.exception("test peer handler %s failed", method.__name__)
            self.errors.append(exc)
            return None

    return wrapper


@dataclass(frozen=True)
class Route:
    """What a link is attached to: ``kind`` is cbs, management or entity; ``path`` the entity path."""

    kind: str
    path: str


@dataclass(frozen=True)
class Outstanding:
    """An unsettled peek-lock delivery: which entity and lock it stands for."""

    entity: Entity
    token: uuid.UUID
    link: Link


def required(value: T | None) -> T:
    """An event's endpoint that its type guarantees (proton types them all as optional)."""
    if value is None:
        raise ValueError("event is missing the endpoint its type implies")
    return value


def entity_path(address: str | None) -> str:
    """The entity path of a link address, with any ``amqps://host:port`` prefix removed."""
    if not address:
        return ""
    if "://" in address:
        address = urlsplit(address).path
    return address.strip("/")


class Broker(Handler):
    """Proton handler serving CBS, management and queue links from a ``Namespace``."""

    def __init__(self, namespace: Namespace) -> None:
        super().__init__()
        self.namespace = namespace
        self.errors: list[BaseException] = []
        self.attaches: Counter[str] = Counter()
        self.renewals: Counter[str] = Counter()
        self.refusals: dict[str, deque[Condition]] = {}
        self.calls: deque[Callable[[], None]] = deque()
        self._routes: dict[Link, Route] = {}
        self._consumers: dict[str, list[Link]] = {}
        self._outstanding: dict[Delivery, Outstanding] = {}
        self._timer: Task | None = None
        self.connections: set[Connection] = set()
        self.acceptor_close: Callable[[], None] = lambda: None

    # -- reactor lifecycle ---------------------------------------------------------------

    @guarded
    def on_reactor_init(self, event: Event) -> None:
        """Start the clock that expires locks and reveals scheduled messages."""
        self._timer = event.container.schedule(TICK_SECONDS, self)

    @guarded
    def on_timer_task(self, event: Event) -> None:
        """Periodic tick: lock expiry and scheduled messages, then hand out what became available."""
        now = time.time()
        for entity in self.namespace.entities():
            if entity.tick(now):
                self.pump(entity)
        self._timer = event.container.schedule(TICK_SECONDS, self)

    @guarded
    def on_peer_call(self, _event: Event) -> None:
        """Run calls queued by other threads (see ``ServiceBusPeer._call``)."""
        while self.calls:
            self.calls.popleft()()

    def shutdown(self) -> None:
        """Stop accepting and ticking, and close every connection."""
        self.acceptor_close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for connection in self.connections:
            connection.close()

    def abort(self) -> None:
        """Drop the sockets of connections whose clients never answered the close."""
        for connection in list(self.connections):
            transport = connection.transport
            if transport is not None:
                transport.close_tail()
                transport.close_head()

    # -- connection, session, link -------------------------------------------------------

    @guarded
    def on_connection_remote_open(self, event: Event) -> None:
        """Answer the client's open."""
        connection = required(event.connection)
        self.connections.add(connection)
        if connection.state & Endpoint.LOCAL_UNINIT:
            connection.container = "servicebus-test-peer"
            connection.open()

    @guarded
    def on_session_remote_open(self, event: Event) -> None:
        """Answer the client's begin."""
        session = required(event.session)
        if session.state & Endpoint.LOCAL_UNINIT:
            session.open()

    @guarded
    def on_link_remote_open(self, event: Event) -> None:
        """Route and answer an attach, mirroring the client's terminus and settle modes."""
        link = required(event.link)
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        address = link.remote_source.address if link.is_sender else link.remote_target.address
        path = entity_path(address)
        if not path:
            link.condition = Condition("amqp:not-found", "The test peer needs an entity address.")
            link.open()
            link.close()
            return
        if path == CBS:
            route = Route("cbs", path)
        elif path.endswith(MANAGEMENT_SUFFIX):
            route = Route("management", path.removesuffix(MANAGEMENT_SUFFIX))
        else:
            route = Route("entity", self.namespace.resolve(path).name)
            self.attaches[route.path] += 1
        self._routes[link] = route
        link.open()
        if link.is_receiver:
            link.flow(PRODUCER_CREDIT)
        elif route.kind == "entity":
            self._consumers.setdefault(route.path, []).append(link)

    @guarded
    def on_link_remote_close(self, event: Event) -> None:
        """Detach: forget the link; its peek-locks stay held until they expire, as on Service Bus."""
        link = required(event.link)
        self._forget(link)
        if not link.state & Endpoint.LOCAL_CLOSED:
            link.close()

    @guarded
    def on_session_remote_close(self, event: Event) -> None:
        """End: answer it."""
        session = required(event.session)
        if not session.state & Endpoint.LOCAL_CLOSED:
            session.close()

    @guarded
    def on_connection_remote_close(self, event: Event) -> None:
        """Close: answer it."""
        connection = required(event.connection)
        if not connection.state & Endpoint.LOCAL_CLOSED:
            connection.close()

    @guarded
    def on_transport_closed(self, event: Event) -> None:
        """Socket gone: forget every link of the connection."""
        connection = event.connection
        for link in [link for link in self._routes if link.connection == connection]:
            self._forget(link)
        if connection is not None:
            self.connections.discard(connection)

    def _forget(self, link: Link) -> None:
        route = self._routes.pop(link, None)
        if route is not None and route.kind == "entity" and link in self._consumers.get(route.path, []):
            self._consumers[route.path].remove(link)
        for delivery in [d for d, o in self._outstanding.items() if o.link == link]:
            del self._outstanding[delivery]

    def drop_links(self, path: str) -> int:
        """Detach every queue link on an entity with detach-forced; how many were dropped."""
        dropped = [link for link, route in self._routes.items() if route.kind == "entity" and route.path == path]
        for link in dropped:
            self._forget(link)
            link.condition = Condition(DETACH_FORCED, "The test peer dropped the link.")
            link.close()
        return len(dropped)

    # -- transfers ---------------------------------------------------------------------------

    @guarded
    def on_link_flow(self, event: Event) -> None:
        """Credit from a receiving client: hand out messages, and honour a drain."""
        link = required(event.link)
        route = self._routes.get(link)
        if link.is_sender and route is not None and route.kind == "entity":
            self.pump(self.namespace.resolve(route.path))
            if link.drain_mode:
                link.drained()

    @guarded
    def on_delivery(self, event: Event) -> None:
        """A transfer from a sending client, or a disposition for one of the peer's deliveries."""
        delivery = required(event.delivery)
        link = required(event.link)
        if link.is_receiver:
            if delivery.readable and not delivery.partial:
                self._incoming(link, delivery)
        elif delivery.updated or delivery.remote_settled:
            self._settlement(delivery)

    def _incoming(self, link: Link, delivery: Delivery) -> None:
        raw = bytes(link.recv(delivery.pending) or b"")
        link.advance()
        route = self._routes.get(link)
        try:
            if route is None:
                raise ValueError("transfer on an unrouted link")
            if route.kind == "entity":
                self._enqueue(self.namespace.resolve(route.path), raw)
            else:
                self._request(link, route, raw)
            delivery.update(Delivery.ACCEPTED)
        except ValueError as exc:
            delivery.local.condition = Condition("amqp:decode-error", str(exc))
            delivery.update(Delivery.REJECTED)
        except Exception as exc:
            # Answer anyway, so a peer bug fails the client now instead of at its timeout.
            _LOG.exception("test peer failed to handle a transfer")
            self.errors.append(exc)
            delivery.local.condition = Condition("amqp:internal-error", repr(exc))
            delivery.update(Delivery.REJECTED)
        delivery.settle()
        link.flow(1)

    def _enqueue(self, entity: Entity, raw: bytes) -> None:
        sections = codec.split_sections(raw)
        now = time.time()
        for message in codec.unpack_batch(sections) or [sections]:
            entity.enqueue(message, now)
        self.pump(entity)

    def pump(self, entity: Entity) -> None:
        """Hand available messages to the entity's receivers with credit, round robin."""
        links = self._consumers.get(entity.name, [])
        while entity.available:
            ready = [link for link in links if link.credit > 0 and link.state & Endpoint.LOCAL_ACTIVE]
            if not ready:
                return
            for link in ready:
                envelope = entity.next_available()
                if envelope is None:
                    return
                self._deliver(entity, link, envelope)

    def _deliver(self, entity: Entity, link: Link, envelope: Envelope) -> None:
        receive_and_delete = link.snd_settle_mode == Link.SND_SETTLED
        # Lock token and delivery tag are one value: the client reads UUID(bytes_le=tag).
        token = uuid.uuid4() if receive_and_delete else entity.lock(envelope, time.time())
        payload = envelope.encode(with_lock=not receive_and_delete)
        # proton's stub says str, but the binding takes bytes, and the tag must be the token's 16 bytes.
        delivery = link.delivery(token.bytes_le)  # type: ignore[arg-type]
        link.send(payload)
        link.advance()
        if receive_and_delete:
            delivery.settle()
        else:
            self._outstanding[delivery] = Outstanding(entity, token, link)

    # -- settlement ----------------------------------------------------------------------------

    def _settlement(self, delivery: Delivery) -> None:
        outstanding = self._outstanding.pop(delivery, None)
        if outstanding is None:
            delivery.settle()
            return
        entity, token = outstanding.entity, outstanding.token
        state = delivery.remote_state
        if state == Delivery.RELEASED or not state:
            # Released on close (drain): back to the queue without counting an attempt.
            entity.release(token)
            delivery.settle()
        elif refusal := self._take_refusal(entity):
            self._echo(delivery, Delivery.REJECTED, refusal)
        elif not entity.holds(token, time.time()):
            lost = Condition(management.MESSAGE_LOCK_LOST, f"The lock on message {token} was lost.")
            self._echo(delivery, Delivery.REJECTED, lost)
        elif state == Delivery.ACCEPTED:
            entity.complete(token)
            self._echo(delivery, Delivery.ACCEPTED)
        elif state == Delivery.MODIFIED and delivery.remote.undeliverable:
            # Defer needs receive-by-sequence-number, which the peer does not serve; the lock stays.
            self._echo(delivery, Delivery.REJECTED, Condition("amqp:not-implemented", "defer is not supported"))
        elif state == Delivery.MODIFIED:
            entity.abandon(token)
            delivery.local.failed = True
            self._echo(delivery, Delivery.MODIFIED)
        elif state == Delivery.REJECTED:
            reason, description = _dead_letter_details(delivery.remote.condition)
            entity.dead_letter_locked(token, reason, description)
            self._echo(delivery, Delivery.REJECTED)
        else:
            self._echo(delivery, Delivery.REJECTED, Condition("amqp:not-implemented", f"outcome {state}"))
        self.pump(entity)
        if entity.dead_letter is not None:
            self.pump(entity.dead_letter)

    def _take_refusal(self, entity: Entity) -> Condition | None:
        """The error to answer this settlement with, if a test armed one for the entity."""
        refusals = self.refusals.get(entity.name)
        return refusals.popleft() if refusals else None

    @staticmethod
    def _echo(delivery: Delivery, state: int, condition: Condition | None = None) -> None:
        """Settle with an outcome; the client waits for this echo (rcv-settle-mode second)."""
        if condition is not None:
            delivery.local.condition = condition
        delivery.update(state)
        delivery.settle()

    def expire_locks(self, path: str) -> int:
        """Make every lock held on an entity lapse now; how many did."""
        entity = self.namespace.resolve(path)
        expired = len(entity.expire_all_locks())
        entity.tick(time.time())
        self.pump(entity)
        if entity.dead_letter is not None:
            self.pump(entity.dead_letter)
        return expired

    # -- CBS and management ----------------------------------------------------------------------

    def _request(self, link: Link, route: Route, raw: bytes) -> None:
        """Answer a CBS or management request on the client's response link."""
        incoming = Message()
        incoming.decode(raw)
        if route.kind == "cbs":
            # Any token is accepted: the peer tests messaging, not authorisation.
            properties: dict[str, Any] = {"status-code": 202, "status-description": "Accepted"}
            response = Message(correlation_id=incoming.id, properties=properties)
            self._reply_link(link.session, CBS).send(response)
            return
        entity = self.namespace.resolve(route.path)
        reply = self._management(entity, codec.split_sections(raw))
        response = Message(correlation_id=incoming.id, properties=reply.properties(), body=reply.body)
        self._reply_link(link.session, incoming.reply_to or route.path + MANAGEMENT_SUFFIX).send(response)
        self.pump(entity)

    def _management(self, entity: Entity, sections: list[codec.Section]) -> management.Reply:
        operation = str(codec.map_of(sections, codec.APPLICATION_PROPERTIES).get("operation", ""))
        value = codec.find(sections, codec.AMQP_VALUE)
        body = codec.section_value(value) if value is not None else None
        refusal = self._take_refusal(entity) if operation == management.UPDATE_DISPOSITION else None
        if refusal is not None:
            return management.Reply(500, str(refusal.description), condition=str(refusal.name))
        fields = dict(body) if isinstance(body, dict) else {}
        reply = management.handle(management.Request(entity, operation, fields, time.time()))
        if operation == management.RENEW_LOCK and reply.status == 200:
            self.renewals[entity.name] += 1
        return reply

    def _reply_link(self, session: Session, address: str) -> Link:
        """The client's response link for a request: same session, source address = reply-to."""
        wanted = entity_path(address)
        candidates = [
            link
            for link, route in self._routes.items()
            if link.is_sender and route.kind != "entity" and entity_path(link.remote_source.address) == wanted
        ]
        for link in candidates:
            if link.session == session:
                return link
        if not candidates:
            raise ValueError(f"no response link attached for {address!r}")
        return candidates[0]


def _dead_letter_details(condition: Condition | None) -> tuple[str | None, str | None]:
    """DeadLetterReason / DeadLetterErrorDescription from a rejected outcome's error info."""
    if condition is None:
        return None, None
    info = condition.info if isinstance(condition.info, dict) else {}
    reason = info.get("DeadLetterReason")
    description = info.get("DeadLetterErrorDescription", condition.description)
    if condition.name != DEAD_LETTER_CONDITION and reason is None:
        reason = condition.name
    return (
        None if reason is None else str(reason),
        None if description is None else str(description),
    )
