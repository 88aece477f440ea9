"""A lease in the store that lets one of several processes act alone: the protocol and its policy.

A backend only stores a small record and swaps it conditionally (compare-and-swap on a
version that changes with every write: the Cosmos etag, a counter in SQLite). `Lease`
holds the policy on top, the same for every backend.

Clocks. Expiry never compares wall clocks of two machines. As in Kubernetes' client-go
leaderelection, a contender judges expiry by how long it has itself seen the record
unchanged, on its own monotonic clock: it may take the lease over only once the record
kept one version for the record's duration, counted from when the contender first read
that version. The holder counts its term from the moment it *sent* its last successful
write (earlier than any contender can have read the result) and considers itself the
holder for only `RENEW_FRACTION` of the duration. So the holder stops before any contender
may start, provided the two monotonic clocks run at rates within a third of each other;
no agreement on the time of day is needed. Every takeover is itself a conditional write,
so two contenders racing for one version cannot both win.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Protocol

# The share of the lease duration for which the holder trusts its last renewal: the other
# third is the margin for clock-rate differences and for the holder to notice it lost.
RENEW_FRACTION: Final = 2 / 3
STATE_LEASE: Final = "exporter-state"


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What the store holds for one lease; holder "" means released."""

    name: str
    holder: str
    version: str
    duration: float
    renewed_at: datetime  # the writer's wall clock: for people reading the record, never for expiry


class LeaseBackend(Protocol):
    """Stores lease records and swaps them only when their version is still the expected one."""

    async def read(self, name: str) -> LeaseRecord | None:
        """The record, or None when it was never written."""
        ...

    async def write(self, name: str, expected: str | None, holder: str, duration: float) -> LeaseRecord | None:
        """Write holder if the record is still at version expected (None: it does not exist yet).

        Returns the new record, or None when another writer got there first.
        """
        ...

    async def close(self) -> None:
        """Release the backend's connection."""
        ...


def default_holder() -> str:
    """A name for this process that no other process, nor a restart of this one, shares."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


class Lease:
    """One named lease as seen by one contender: acquire, renew, release, and whether it is held now."""

    def __init__(
        self,
        backend: LeaseBackend,
        *,
        name: str = STATE_LEASE,
        holder: str | None = None,
        duration: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if duration <= 0:
            raise ValueError("a lease duration must be positive")
        self.backend = backend
        self.name = name
        self.holder = holder or default_holder()
        self.duration = duration
        self._clock = clock
        self._held_until = -math.inf
        self._written: str | None = None  # the version of our own last successful write
        self._observed: str | None = None  # the version last read, and when (our clock) it was first seen
        self._observed_at = -math.inf

    def held(self) -> bool:
        """True while our last renewal is recent enough that no contender can have taken over."""
        return self._clock() < self._held_until

    async def acquire_or_renew(self) -> bool:
        """Take the lease if it is free or expired, renew it if ours; True when we hold it afterwards."""
        started = self._clock()
        if self._written is not None:
            # Steady state of the holder: one conditional write, no read. When it fails, the
            # read below decides (our own write may have landed after its call timed out).
            written = await self.backend.write(self.name, self._written, self.holder, self.duration)
            if written is not None:
                self._hold(written, started)
                return True
        record = await self.backend.read(self.name)
        if record is not None:
            now = self._clock()
            if record.version != self._observed:
                # Read after the write that made this version: counting from now is never too early.
                self._observed, self._observed_at = record.version, now
            free = record.holder in ("", self.holder)
            if not free and now < self._observed_at + record.duration:
                self._lose()
                return False
        written = await self.backend.write(
            self.name, None if record is None else record.version, self.holder, self.duration
        )
        if written is None:
            self._lose()
            return False
        self._hold(written, started)
        return True

    async def release(self) -> None:
        """Give the lease up so a contender can take it at once (a no-op if it is no longer ours)."""
        version, self._written = self._written, None
        self._held_until = -math.inf
        if version is not None:
            await self.backend.write(self.name, version, "", self.duration)

    async def close(self) -> None:
        """Close the backend (without releasing: call release first for that)."""
        await self.backend.close()

    def _hold(self, written: LeaseRecord, started: float) -> None:
        self._written = self._observed = written.version
        self._observed_at = started
        self._held_until = started + self.duration * RENEW_FRACTION

    def _lose(self) -> None:
        self._written = None
        self._held_until = -math.inf
