"""An AMQP 1.0 test peer that speaks the Azure Service Bus dialect, for tests with the real SDK."""

from tests.servicebus_peer.peer import PeerError, ServiceBusPeer
from tests.servicebus_peer.store import DeadLettered

__all__ = ["DeadLettered", "PeerError", "ServiceBusPeer"]
