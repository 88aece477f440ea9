"""The progress line people see while a command ingests or works the queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TextIO

from jobs.telemetry import Outcome
from worker.consumer import Consumer
from worker.queue import Queue, QueueError


class Progress:
    """One status line, rewritten in place on a terminal and printed sparingly elsewhere."""

    def __init__(self, label: str, out: TextIO) -> None:
        self.label = label
        self.out = out
        self.tty = out.isatty()
        self._last = ""
        self._count = 0

    def show(self, text: str) -> None:
        """Show text as the current status, unless it is the one shown already."""
        if text == self._last:
            return
        self._last = text
        self._count += 1
        if self.tty:
            print(f"\r\033[K[{self.label}] {text}", end="", file=self.out, flush=True)
        elif self._count % 10 == 1:
            print(f"[{self.label}] {text}", file=self.out, flush=True)

    def done(self, text: str) -> None:
        """Print a final status on a line of its own."""
        prefix = "\r\033[K" if self.tty else ""
        print(f"{prefix}[{self.label}] {text}", file=self.out, flush=True)
        self._last = ""


async def watch_work(
    consumer: Consumer,
    queue: Queue,
    stop: asyncio.Event,
    exit_when_idle: bool,
    out: TextIO,
    on_idle: Callable[[], Awaitable[None]] | None,
) -> None:
    """Show progress until stop; when the queue drains, report (and stop if asked to)."""
    progress = Progress("work", out)
    announced_idle = False
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        try:
            depth = await queue.depth()
        except QueueError as exc:
            progress.show(f"completed {consumer.processed[Outcome.COMPLETED]} (queue depth unavailable: {exc})")
            continue
        done = consumer.processed
        progress.show(
            f"completed {done[Outcome.COMPLETED]}, retried {done[Outcome.FAILED]}, "
            f"dead-lettered {done[Outcome.DEAD_LETTERED]}, "
            f"in flight {consumer.in_flight}, queued {depth.active}, scheduled {depth.scheduled}"
        )
        idle = depth.active == 0 and depth.scheduled == 0 and consumer.in_flight == 0
        if idle and not announced_idle:
            progress.done("queue drained" + ("" if exit_when_idle else "; waiting for more work (Ctrl-C to stop)"))
            announced_idle = True
            if on_idle is not None:
                await on_idle()
            if exit_when_idle:
                stop.set()
        elif not idle:
            announced_idle = False
