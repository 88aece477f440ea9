"""Which exporter reads the store for state metrics: forced by the role setting, or elected by a lease.

With the role "elect", every exporter of a deployment runs an elector on the same store lease.
Timing, with D the lease duration (the refresh interval, set where the lease is built):
the holder renews and the others poll every D/4, and every call is bounded by D/4. The
holder counts as leader for 2/3 D after it sent its last successful renewal, so a leader
that cannot renew stops exporting before anyone may take over (see jobs/lease.py). A
contender takes over once it has seen the record unchanged for D, i.e. at most D + 2 x D/4
after the leader's last renewal: a dead leader is replaced within 1.5 refresh intervals,
plus the duration of one call. A clean shutdown releases the lease, and the next poll of
another exporter (within D/4) takes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import web

from jobs.errors import StoreUnavailableError
from jobs.lease import Lease

log = logging.getLogger(__name__)

ROLES: Final = ("elect", "always", "never")
# Polls per lease duration; 4 leaves two retries for a renewal before the holder's 2/3 is up.
POLLS_PER_DURATION: Final = 4


class StateLeadership:
    """Answers "does this exporter read and export state now?"; runs the elector for the role "elect".

    Without a lease, "elect" means always: a lone exporter (tests, `up`) has nobody to defer to.
    """

    def __init__(self, role: str, lease: Lease | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"state role must be one of {', '.join(ROLES)}; got {role!r}")
        self.role = role
        self.lease = lease if role == "elect" else None
        self.period = self.lease.duration / POLLS_PER_DURATION if self.lease is not None else 0.0
        self.on_elected: Callable[[], None] = lambda: None
        self._leading = False

    def is_leader(self) -> bool:
        """True while this exporter should read and export state."""
        if self.lease is not None:
            return self.lease.held()
        return self.role != "never"

    async def run(self) -> None:
        """Acquire or renew every period until cancelled; call on_elected when leadership is won."""
        lease = self.lease
        if lease is None:
            return
        while True:
            try:
                async with asyncio.timeout(self.period):
                    await lease.acquire_or_renew()
            except (TimeoutError, StoreUnavailableError) as exc:
                log.warning("state lease: %s", exc or "the store did not answer in time")
            except Exception:  # an elector that dies would leave the deployment without a reader
                log.exception("state lease: unexpected error")
            self._note_change()
            await asyncio.sleep(self.period)

    def _note_change(self) -> None:
        leading = self.is_leader()
        if leading and not self._leading:
            log.info("holding the state lease: this exporter now reads and exports state metrics")
            self.on_elected()
        elif self._leading and not leading:
            log.warning("lost the state lease: this exporter stops exporting state metrics")
        self._leading = leading

    async def release(self) -> None:
        """Give the lease up (bounded by one period) so another exporter takes over at once."""
        if self.lease is None:
            return
        try:
            async with asyncio.timeout(self.period):
                await self.lease.release()
        except (TimeoutError, StoreUnavailableError) as exc:
            log.warning("could not release the state lease (it expires by itself): %s", exc or "timed out")
        self._leading = False

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: elect while the app runs, release on shutdown."""
        task = asyncio.create_task(self.run(), name="state-lease")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await self.release()
