"""The feeder: follows the shard store's changes and enqueues a job for every new or changed shard.

A feed (the Cosmos DB change feed of the shards container, or the change log
that triggers keep in the local SQLite file) yields changed shards in write
order. For each, the feeder compares the content hash with the last one it
enqueued for that shard, and only when they differ enqueues through the
Producer (pending job record + message) and records the new hash. After each
page it persists the feed position. A restart therefore resumes after the last
page; a crash inside a page re-reads that page, and the recorded hashes skip
what was already enqueued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from jobs.errors import JobError
from worker.feed import ShardFeed
from worker.messages import JobMessage
from worker.producer import Producer, job_id_for
from worker.queue import QueueError

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100


@dataclass(slots=True)
class FeedResult:
    """What one poll did."""

    enqueued: int = 0
    unchanged: int = 0


class Feeder:
    """Turns a shard feed into jobs through a Producer."""

    def __init__(self, feed: ShardFeed, producer: Producer, *, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        self.feed = feed
        self.producer = producer
        self.page_size = page_size
        self.totals = FeedResult()

    async def poll(self) -> FeedResult:
        """Process every change up to now; return what was enqueued and skipped."""
        result = FeedResult()
        while True:
            page = await self.feed.read(self.page_size)
            if page.position is None:
                return result
            for shard in page.shards:
                if await self.feed.enqueued_hash(shard.tenant_id, shard.id) == shard.content_hash:
                    result.unchanged += 1
                    self.totals.unchanged += 1
                    continue
                await self.producer.enqueue(
                    JobMessage(
                        job_id=job_id_for(shard),
                        tenant_id=shard.tenant_id,
                        shard_id=shard.id,
                        shard_type_id=shard.shard_type_id,
                    )
                )
                # Recorded after the send: a crash in between re-sends the same job id, which the
                # job record dedupes; recording first could lose the job instead.
                await self.feed.record(shard)
                result.enqueued += 1
                self.totals.enqueued += 1
            await self.feed.advance(page.position)

    async def run(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Poll every interval seconds until stop is set; store and queue outages are logged and retried."""
        while not stop.is_set():
            try:
                result = await self.poll()
                if result.enqueued:
                    log.info("feeder enqueued %d job(s), skipped %d unchanged", result.enqueued, result.unchanged)
            except (JobError, QueueError) as exc:
                log.warning("feeder poll failed, retrying in %.1fs: %s", interval, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)


async def run_feeder(feed: ShardFeed, producer: Producer, stop: asyncio.Event, *, interval: float = 1.0) -> FeedResult:
    """Follow feed until stop is set; return the totals. The feed stays open: whoever opened it closes it."""
    feeder = Feeder(feed, producer)
    await feeder.run(stop, interval)
    return feeder.totals
