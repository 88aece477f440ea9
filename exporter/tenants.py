"""The bound on the `tenant` label: tenants the store knows come first, names seen only in spans after.

Past the limit, new tenants fold into `tenant="__other__"`. The state reader hands the limiter
every tenant the store knows on each refresh; those are admitted ahead of tenants seen only in
spans, and a span-only tenant gives up its place (its series are dropped) when a tenant the
store knows needs the room. So span traffic, however many names it carries, never pushes a
real tenant out of the exposition.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from exporter import metrics as m


class TenantLimiter:
    """Maps tenant names to label values within a bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._admitted: set[str] = set()
        self._known: set[str] = set()
        self._folded: set[str] = set()
        self.evicted = 0
        self._lock = threading.Lock()
        self._on_evict: list[Callable[[str], None]] = []
        self._on_admit_known: list[Callable[[list[str]], None]] = []

    def on_admit_known(self, callback: Callable[[list[str]], None]) -> None:
        """Call callback(tenants) with the store's tenants that hold a label place, after each admission."""
        self._on_admit_known.append(callback)

    def on_evict(self, callback: Callable[[str], None]) -> None:
        """Call callback(tenant) when a span-only tenant loses its label to a tenant the store knows."""
        self._on_evict.append(callback)

    @property
    def folded(self) -> int:
        """How many distinct tenants are folded into __other__."""
        return len(self._folded)

    def label(self, tenant: str) -> str:
        """The label value for tenant: itself while there is room, else __other__."""
        # Membership of a set is safe to read without the lock; only admission changes it.
        if tenant in self._admitted:
            return tenant
        with self._lock:
            if tenant in self._admitted:
                return tenant
            if len(self._admitted) < self.limit:
                self._admitted.add(tenant)
                return tenant
            self._folded.add(tenant)
            return m.OTHER_TENANT

    def admit_known(self, tenants: Iterable[str]) -> None:
        """Admit the store's tenants first (in name order), evicting span-only tenants if needed."""
        evicted: list[str] = []
        with self._lock:
            known = set(tenants)
            self._known |= known
            waiting = sorted(t for t in known if t not in self._admitted)
            room = self.limit - len(self._admitted)
            if room < len(waiting):
                span_only = sorted(self._admitted - self._known)
                evicted = span_only[: len(waiting) - room]
                self._admitted.difference_update(evicted)
                self._folded.update(evicted)
                self.evicted += len(evicted)
                room += len(evicted)
            for tenant in waiting[:room]:
                self._admitted.add(tenant)
                self._folded.discard(tenant)
            self._folded.update(waiting[room:])
            labelled = sorted(known & self._admitted)
        for tenant in evicted:
            for callback in self._on_evict:
                callback(tenant)
        for admitted in self._on_admit_known:
            admitted(labelled)
