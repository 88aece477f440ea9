"""AMQP 1.0 message sections: split what a client sent, rebuild what the peer delivers.

Messages are stored as the client encoded them and only the sections the broker owns
(header, message annotations, application properties on the dead-letter queue) are
re-encoded on delivery, so bodies and properties reach the receiver byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proton import Data, symbol, timestamp, ulong

HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
AMQP_SEQUENCE = 0x76
AMQP_VALUE = 0x77
FOOTER = 0x78

BODY_CODES = frozenset({DATA, AMQP_SEQUENCE, AMQP_VALUE})

SCHEDULED_ENQUEUE_TIME = symbol("x-opt-scheduled-enqueue-time")
LOCK_TOKEN = symbol("x-opt-lock-token")
LOCKED_UNTIL = symbol("x-opt-locked-until")
SEQUENCE_NUMBER = symbol("x-opt-sequence-number")
ENQUEUED_TIME = symbol("x-opt-enqueued-time")


@dataclass(frozen=True)
class Section:
    """One top-level section of an encoded message: its descriptor code and its exact bytes."""

    code: int
    raw: bytes


def split_sections(raw: bytes) -> list[Section]:
    """Split an encoded message into its sections; ValueError if it is not one."""
    sections: list[Section] = []
    offset = 0
    data = Data()
    while offset < len(raw):
        data.clear()
        try:
            consumed = data.decode(raw[offset:])
        except Exception as exc:
            raise ValueError(f"undecodable section at byte {offset}") from exc
        data.rewind()
        if consumed <= 0 or not data.next() or data.type() != Data.DESCRIBED:
            raise ValueError(f"section at byte {offset} is not a described type")
        data.enter()
        data.next()
        descriptor = data.get_object()
        if not isinstance(descriptor, int) or not HEADER <= descriptor <= FOOTER:
            raise ValueError(f"unknown section descriptor {descriptor!r}")
        sections.append(Section(int(descriptor), bytes(raw[offset : offset + consumed])))
        offset += consumed
    if not any(section.code in BODY_CODES for section in sections):
        raise ValueError("message has no body section")
    return sections


def section_value(section: Section) -> Any:
    """The described value of a section as Python objects (binary copied out of proton)."""
    data = Data()
    data.decode(section.raw)
    data.rewind()
    data.next()
    data.enter()
    data.next()
    data.next()
    return _copy_binary(data.get_object())


def find(sections: list[Section], code: int) -> Section | None:
    """The first section with the descriptor code, if any."""
    return next((section for section in sections if section.code == code), None)


def map_of(sections: list[Section], code: int) -> dict[Any, Any]:
    """A map-valued section (annotations, application properties) as a dict; empty if absent."""
    section = find(sections, code)
    value = section_value(section) if section is not None else None
    return dict(value) if isinstance(value, dict) else {}


def message_id(sections: list[Section]) -> Any:
    """The message-id from the properties section, if the sender set one."""
    section = find(sections, PROPERTIES)
    fields = section_value(section) if section is not None else None
    return fields[0] if isinstance(fields, list) and fields else None


def unpack_batch(sections: list[Section]) -> list[list[Section]] | None:
    """Inner messages of a batch transfer, or None if the message is not shaped like one.

    Proton does not expose the transfer's message-format (0x80013700 for a batch), so a
    batch is recognised by shape: only data sections for a body, no application
    properties, and every data section is itself a complete encoded message.
    """
    if find(sections, APPLICATION_PROPERTIES) is not None:
        return None
    bodies = [section for section in sections if section.code in BODY_CODES]
    if not bodies or any(section.code != DATA for section in bodies):
        return None
    inner: list[list[Section]] = []
    for section in bodies:
        payload = section_value(section)
        if not isinstance(payload, bytes):
            return None
        try:
            inner.append(split_sections(payload))
        except ValueError:
            return None
    return inner


def encode_described(code: int, value: Any) -> bytes:
    """Encode a section: descriptor code plus value."""
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(ulong(code))
    data.put_object(value)
    data.exit()
    return bytes(data.encode())


def encode_header(original: Section | None, delivery_count: int) -> bytes:
    """A header section with an explicit delivery-count.

    Proton's message encoder leaves delivery-count out when it is 0 and the client then
    reads None, so the list is written field by field, keeping the sender's durable,
    priority and ttl.
    """
    fields: list[Any] = list(section_value(original)) if original is not None else []
    fields += [None] * (5 - len(fields))
    durable, priority, ttl = fields[0], fields[1], fields[2]
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(ulong(HEADER))
    data.put_list()
    data.enter()
    data.put_bool(bool(durable))
    if priority is None:
        data.put_null()
    else:
        data.put_ubyte(int(priority))
    if ttl is None:
        data.put_null()
    else:
        data.put_uint(int(ttl))
    data.put_bool(delivery_count == 0)  # first-acquirer
    data.put_uint(delivery_count)
    data.exit()
    data.exit()
    return bytes(data.encode())


def render(
    sections: list[Section],
    *,
    delivery_count: int,
    annotations: dict[Any, Any],
    application_properties: dict[str, Any] | None = None,
) -> bytes:
    """Encode a message for delivery: broker header and annotations, the sender's other sections.

    Delivery annotations are the sender's hop-by-hop data and are not forwarded.
    ``application_properties`` entries are added to the sender's own.
    """
    merged_annotations = {**map_of(sections, MESSAGE_ANNOTATIONS), **annotations}
    parts = [
        encode_header(find(sections, HEADER), delivery_count),
        encode_described(MESSAGE_ANNOTATIONS, merged_annotations),
    ]
    for section in sections:
        if section.code == PROPERTIES:
            parts.append(section.raw)
    if application_properties:
        merged = {**map_of(sections, APPLICATION_PROPERTIES), **application_properties}
        parts.append(encode_described(APPLICATION_PROPERTIES, merged))
    else:
        parts += [section.raw for section in sections if section.code == APPLICATION_PROPERTIES]
    parts += [section.raw for section in sections if section.code in BODY_CODES or section.code == FOOTER]
    return b"".join(parts)


def millis(epoch_seconds: float) -> timestamp:
    """An AMQP timestamp (milliseconds since the epoch)."""
    return timestamp(round(epoch_seconds * 1000))


def _copy_binary(value: Any) -> Any:
    """Copy binary values out of proton's buffers, which may be views over memory it reuses."""
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, dict):
        return {_copy_binary(key): _copy_binary(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_binary(item) for item in value]
    return value
