"""What a shard feed is: changed shards in write order, with the feeder's position and hashes beside them.

Two feeds implement it (worker/local_feed.py on the SQLite file, worker/cosmos_feed.py on the
Cosmos DB change feed); the feeder (worker/feeder.py) reads either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from worker.shards import Shard

DEFAULT_FEEDER_NAME: Final = "feeder"


@dataclass(frozen=True, slots=True)
class ChangePage:
    """Shards read from a feed, and the position after them (None when nothing new was read)."""

    shards: Sequence[Shard]
    position: str | None


class ShardFeed(Protocol):
    """Changed shards in write order, plus the feeder's persisted position and per-shard hashes."""

    async def read(self, max_items: int) -> ChangePage:
        """Up to max_items changes after the persisted position (not advancing it)."""
        ...

    async def enqueued_hash(self, tenant_id: str, shard_id: str) -> str | None:
        """The content hash last enqueued for the shard, None if never."""
        ...

    async def record(self, shard: Shard) -> None:
        """Remember shard.content_hash as enqueued."""
        ...

    async def advance(self, position: str) -> None:
        """Persist position: the next read starts after it."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
