"""Atom/XML documents of the Service Bus management REST API, as the SDK's deserialiser reads them.

Shapes follow what the service returns for ``GET /{queue}``: an Atom ``entry`` whose
content is a ``QueueDescription`` (with ``CountDetails`` in the 2011/06 namespace); for a
queue that does not exist, an empty Atom ``feed`` with status 200, which the SDK turns into
``ResourceNotFoundError``; for failures, an ``Error`` document with ``Code`` and ``Detail``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from xml.sax.saxutils import escape, quoteattr

from tests.servicebus_peer.store import QueueRuntime

ATOM = "http://www.w3.org/2005/Atom"
CONNECT = "http://schemas.microsoft.com/netservices/2010/10/servicebus/connect"
COUNTS = "http://schemas.microsoft.com/netservices/2011/06/servicebus"
INSTANCE = "http://www.w3.org/2001/XMLSchema-instance"

ENTRY_CONTENT_TYPE = "application/atom+xml;type=entry;charset=utf-8"
FEED_CONTENT_TYPE = "application/atom+xml;type=feed;charset=utf-8"
ERROR_CONTENT_TYPE = "application/xml;charset=utf-8"

# What the service reports for "never" and "forever" (.NET's DateTime.MinValue and TimeSpan.MaxValue).
NEVER = "0001-01-01T00:00:00Z"
FOREVER = "P10675199DT2H48M5.4775807S"


def timestamp(epoch_seconds: float, *, fraction: bool = False) -> str:
    """UTC ISO 8601 with a Z suffix; Atom's own dates have whole seconds, the description's millis."""
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += f".{moment.microsecond // 1000:03d}"
    return text + "Z"


def duration(seconds: float) -> str:
    """An ISO 8601 duration in seconds (``PT30S``, ``PT1.5S``)."""
    return f"PT{seconds:g}S"


def queue_entry(runtime: QueueRuntime, url: str, namespace: str) -> bytes:
    """The Atom entry for one queue: its description and live message counts."""
    total = runtime.active + runtime.scheduled + runtime.dead_letter
    created = timestamp(runtime.created_at, fraction=True)
    accessed = timestamp(runtime.accessed_at, fraction=True) if runtime.accessed_at else NEVER
    description = (
        f'<QueueDescription xmlns="{CONNECT}" xmlns:i="{INSTANCE}">'
        f"<LockDuration>{duration(runtime.lock_duration)}</LockDuration>"
        "<MaxSizeInMegabytes>1024</MaxSizeInMegabytes>"
        "<RequiresDuplicateDetection>false</RequiresDuplicateDetection>"
        "<RequiresSession>false</RequiresSession>"
        f"<DefaultMessageTimeToLive>{FOREVER}</DefaultMessageTimeToLive>"
        "<DeadLetteringOnMessageExpiration>false</DeadLetteringOnMessageExpiration>"
        "<DuplicateDetectionHistoryTimeWindow>PT10M</DuplicateDetectionHistoryTimeWindow>"
        f"<MaxDeliveryCount>{runtime.max_delivery_count}</MaxDeliveryCount>"
        "<EnableBatchedOperations>true</EnableBatchedOperations>"
        f"<SizeInBytes>{runtime.size_in_bytes}</SizeInBytes>"
        f"<MessageCount>{total}</MessageCount>"
        "<IsAnonymousAccessible>false</IsAnonymousAccessible>"
        "<AuthorizationRules></AuthorizationRules>"
        "<Status>Active</Status>"
        f"<CreatedAt>{created}</CreatedAt>"
        f"<UpdatedAt>{created}</UpdatedAt>"
        f"<AccessedAt>{accessed}</AccessedAt>"
        "<SupportOrdering>true</SupportOrdering>"
        f'<CountDetails xmlns:d2p1="{COUNTS}">'
        f"<d2p1:ActiveMessageCount>{runtime.active}</d2p1:ActiveMessageCount>"
        f"<d2p1:DeadLetterMessageCount>{runtime.dead_letter}</d2p1:DeadLetterMessageCount>"
        f"<d2p1:ScheduledMessageCount>{runtime.scheduled}</d2p1:ScheduledMessageCount>"
        # The peer has no auto-forwarding, so nothing is ever in transfer.
        "<d2p1:TransferMessageCount>0</d2p1:TransferMessageCount>"
        "<d2p1:TransferDeadLetterMessageCount>0</d2p1:TransferDeadLetterMessageCount>"
        "</CountDetails>"
        f"<AutoDeleteOnIdle>{FOREVER}</AutoDeleteOnIdle>"
        "<EnablePartitioning>false</EnablePartitioning>"
        "<EntityAvailabilityStatus>Available</EntityAvailabilityStatus>"
        "<EnableExpress>false</EnableExpress>"
        "</QueueDescription>"
    )
    entry = (
        f'<entry xmlns="{ATOM}">'
        f"<id>{escape(url)}</id>"
        f'<title type="text">{escape(runtime.name)}</title>'
        f"<published>{timestamp(runtime.created_at)}</published>"
        f"<updated>{timestamp(runtime.created_at)}</updated>"
        f"<author><name>{escape(namespace)}</name></author>"
        f'<link rel="self" href={quoteattr(url)}/>'
        f'<content type="application/xml">{description}</content>'
        "</entry>"
    )
    return entry.encode()


def empty_feed(now: float) -> bytes:
    """The service's answer to a GET for an entity that does not exist."""
    feed = (
        f'<feed xmlns="{ATOM}">'
        '<title type="text">Publicly Listed Services</title>'
        '<subtitle type="text">This is the list of publicly-listed services currently available.</subtitle>'
        f"<id>uuid:servicebus-test-peer</id><updated>{timestamp(now)}</updated>"
        "<generator>Service Bus 1.1</generator>"
        "</feed>"
    )
    return feed.encode()


def error(code: int, detail: str) -> bytes:
    """An error document; the SDK uses ``Detail`` as the message of the HttpResponseError it raises."""
    return f"<Error><Code>{code}</Code><Detail>{escape(detail)}</Detail></Error>".encode()
