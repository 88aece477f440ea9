"""The /metrics handler's body: rendered off the event loop, cached for a short time, gzip'd on request.

A render at thousands of tenants takes tens of milliseconds or more; on the event loop it would
hold up health probes, the API and span ingest. So a render runs on one worker thread; scrapes
that arrive while it runs wait for that same render, and a body is served again to scrapes
within `ttl` seconds (an HA pair of Prometheus servers, a second scraper, a burst of curl).
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Level 1 is several times faster than the default 9 and still shrinks the exposition,
# which is mostly repeated names and labels, well over tenfold.
GZIP_LEVEL = 1

Key = tuple[bool, bool, bool]  # (openmetrics, gzip, leader)


@dataclass(frozen=True, slots=True)
class _Body:
    data: bytes
    made: float


class ScrapeCache:
    """Renders exposition bodies on a worker thread, one at a time per format, and keeps them for ttl seconds."""

    def __init__(self, render: Callable[[bool], bytes], ttl: float) -> None:
        self._render = render
        self.ttl = ttl
        self._bodies: dict[Key, _Body] = {}
        self._pending: dict[Key, asyncio.Future[_Body]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-render")

    async def body(self, openmetrics: bool, gzipped: bool, leader: bool = True) -> bytes:
        """The exposition in the asked format, gzip'd if asked, at most ttl seconds old.

        leader is whether this exporter reads state now: a body made in another role is never served.
        """
        key = (openmetrics, gzipped, leader)
        cached = self._bodies.get(key)
        if cached is not None and time.monotonic() - cached.made < self.ttl:
            return cached.data
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(self._executor, self._make, openmetrics, gzipped)
            self._pending[key] = pending
            pending.add_done_callback(lambda future: self._store(key, future))
        # Shielded: a scraper that disconnects must not cancel the render others wait for.
        return (await asyncio.shield(pending)).data

    def _make(self, openmetrics: bool, gzipped: bool) -> _Body:
        made = time.monotonic()
        data = self._render(openmetrics)
        if gzipped:
            data = gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
        return _Body(data, made)

    def _store(self, key: Key, future: asyncio.Future[_Body]) -> None:
        self._pending.pop(key, None)
        if not future.cancelled() and future.exception() is None:
            # Keep only what is still useful: a body older than ttl is never served again.
            now = time.monotonic()
            self._bodies = {k: b for k, b in self._bodies.items() if now - b.made < self.ttl}
            if self.ttl > 0:
                self._bodies[key] = future.result()

    def close(self) -> None:
        """Stop the render thread (after any render in progress)."""
        self._executor.shutdown(wait=True)
