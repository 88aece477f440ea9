"""State metrics read from the store in the background and served from memory at scrape time.

A scrape never waits on the store: the refresher reads counters, stuck jobs and queue depth
on an interval with a bounded timeout, and the collector serves the last good snapshot.
Staleness shows in the last-success timestamp and the error counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter import exposition as ex
from exporter import metrics as m
from exporter.tenants import TenantLimiter
from jobs.model import JobStatus
from jobs.store import JobStore

log = logging.getLogger(__name__)
_STUCK_STATUSES = (JobStatus.PENDING.value, JobStatus.PROCESSING.value)
_QUEUE_STATES = ("active", "scheduled", "dead_letter")

# Returns {"active": n, "scheduled": n, "dead_letter": n} for the queue.
DepthSource = Callable[[], Awaitable[Mapping[str, int]]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the last successful refresh read."""

    jobs: Mapping[str, Mapping[JobStatus, int]] = field(default_factory=dict)
    stuck: Mapping[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    depth: Mapping[str, int] | None = None


class StateCollector(Collector):
    """Serves per-tenant status gauges, stuck-job gauges and queue depth from a snapshot."""

    def __init__(
        self,
        store: JobStore,
        registry: CollectorRegistry,
        *,
        limiter: TenantLimiter,
        interval: float = 15.0,
        timeout: float = 10.0,
        stuck_after: float = 900.0,
        depth_source: DepthSource | None = None,
        queue_name: str = "embedding-jobs",
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.interval = interval
        self.timeout = timeout
        self.stuck_after = stuck_after
        self.depth_source = depth_source
        self.queue_name = queue_name
        self.snapshot = Snapshot()
        self._folded: tuple[Snapshot, _StateFamilies] | None = None
        self.refreshed = asyncio.Event()
        # Only the state leader reads the store; the others export none of what a read produces.
        self.is_leader = is_leader
        self._wake = asyncio.Event()
        self._duration = Histogram(
            m.REFRESH_DURATION,
            "Time taken to read state metrics from the store.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=None,
        )
        self._errors = Counter(
            m.REFRESH_ERRORS, "Failed or timed-out reads of state metrics from the store.", registry=None
        )
        self._last_success = Gauge(
            m.REFRESH_LAST_SUCCESS, "Unix time of the last successful read of state metrics.", registry=None
        )
        # A follower's last-success time would age and fire the stale-state alert: leader only.
        registry.register(_LeaderOnly(is_leader, (self._duration, self._errors, self._last_success)))
        Gauge(m.STATE_LEADER, m.STATE_LEADER_HELP, registry=registry).set_function(lambda: float(self.is_leader()))
        registry.register(self)

    async def run(self) -> None:
        """Refresh on the interval while leader, at once when woken (cancel to stop)."""
        while True:
            self._wake.clear()
            if self.is_leader():
                await self.refresh()
            else:
                # Regaining leadership must not serve what was read before the last term.
                self.snapshot = Snapshot()
                self.refreshed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()

    def wake(self) -> None:
        """Refresh now instead of at the end of the interval (on winning leadership)."""
        self._wake.set()

    async def refresh(self) -> bool:
        """Read a new snapshot within the timeout; on failure keep the old one and count the error."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                snapshot = await self._read()
        except Exception as exc:  # a failed read must never stop the refresher
            self._errors.inc()
            log.warning("state refresh failed: %s", exc or "timed out")
            return False
        finally:
            self._duration.observe(time.perf_counter() - started)
        # Tenants the store knows take their label places ahead of names seen only in spans.
        self.limiter.admit_known(snapshot.jobs)
        self.snapshot = snapshot
        self._last_success.set(time.time())
        self.refreshed.set()
        return True

    async def _read(self) -> Snapshot:
        jobs = await self.store.stats_all()
        now = datetime.now(UTC)
        stuck = {
            (s.tenant_id, s.status.value): (s.count, (now - s.oldest_updated_at).total_seconds())
            for s in await self.store.stuck(timedelta(seconds=self.stuck_after))
        }
        depth = dict(await self.depth_source()) if self.depth_source is not None else None
        return Snapshot(jobs=jobs, stuck=stuck, depth=depth)

    def _families(self) -> _StateFamilies:
        """The current snapshot folded by tenant label: jobs, and stuck count with oldest age."""
        # Folded once per snapshot, not per scrape: a store tenant's label never changes once
        # the refresh that read it has admitted or folded it.
        snapshot = self.snapshot
        cached = self._folded
        if cached is not None and cached[0] is snapshot:
            return cached[1]
        families = self._fold(snapshot)
        self._folded = (snapshot, families)
        return families

    def _fold(self, snapshot: Snapshot) -> _StateFamilies:
        label = self.limiter.label
        jobs: dict[tuple[str, str], float] = {}
        for tenant, counts in ex.paced(sorted(snapshot.jobs.items())):
            name = label(tenant)
            for job_status, count in counts.items():
                key = (name, job_status.value)
                jobs[key] = jobs.get(key, 0) + count
        stuck: dict[tuple[str, str], tuple[float, float]] = {}
        # Zero for every known tenant so an alert on "> 0" resolves instead of going absent.
        for tenant, status_name in jobs:
            if status_name in _STUCK_STATUSES:
                stuck[(tenant, status_name)] = (0, 0.0)
        for (tenant, status_name), (stuck_count, age) in snapshot.stuck.items():
            key = (label(tenant), status_name)
            previous = stuck.get(key, (0, 0.0))
            stuck[key] = (previous[0] + stuck_count, max(previous[1], age))
        return _StateFamilies(jobs, dict(sorted(stuck.items())), snapshot.depth)

    def render(self, out: list[str], openmetrics: bool) -> None:
        """Append the state gauges to out in the text or OpenMetrics format (nothing on a follower)."""
        if not self.is_leader():
            return
        families = self._families()
        ex.header(out, m.JOBS, m.JOBS_HELP, "gauge", openmetrics)
        for (tenant, status_name), value in ex.paced(families.jobs.items()):
            out.append(f"{m.JOBS}{{{ex.label_pairs(tenant=tenant, status=status_name)}}} {ex.number(value)}\n")
        ex.header(out, m.JOBS_STUCK, m.JOBS_STUCK_HELP, "gauge", openmetrics)
        for (tenant, status_name), (count, _) in ex.paced(families.stuck.items()):
            out.append(f"{m.JOBS_STUCK}{{{ex.label_pairs(tenant=tenant, status=status_name)}}} {ex.number(count)}\n")
        ex.header(out, m.JOBS_STUCK_OLDEST, m.JOBS_STUCK_OLDEST_HELP, "gauge", openmetrics)
        for (tenant, status_name), (_, age) in ex.paced(families.stuck.items()):
            fragment = ex.label_pairs(tenant=tenant, status=status_name)
            out.append(f"{m.JOBS_STUCK_OLDEST}{{{fragment}}} {ex.number(age)}\n")
        if families.depth is not None:
            ex.header(out, m.QUEUE_MESSAGES, m.QUEUE_MESSAGES_HELP, "gauge", openmetrics)
            for state in _QUEUE_STATES:
                fragment = ex.label_pairs(queue=self.queue_name, state=state)
                out.append(f"{m.QUEUE_MESSAGES}{{{fragment}}} {ex.number(families.depth.get(state, 0))}\n")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The same gauges as standard metric families (for registry readers; slower than render)."""
        if not self.is_leader():
            return
        families = self._families()
        jobs = GaugeMetricFamily(m.JOBS, m.JOBS_HELP, labels=["tenant", "status"])
        for (tenant, status_name), value in families.jobs.items():
            jobs.add_metric([tenant, status_name], value)
        yield jobs
        stuck = GaugeMetricFamily(m.JOBS_STUCK, m.JOBS_STUCK_HELP, labels=["tenant", "status"])
        oldest = GaugeMetricFamily(m.JOBS_STUCK_OLDEST, m.JOBS_STUCK_OLDEST_HELP, labels=["tenant", "status"])
        for (tenant, status_name), (stuck_count, age) in families.stuck.items():
            stuck.add_metric([tenant, status_name], stuck_count)
            oldest.add_metric([tenant, status_name], age)
        yield stuck
        yield oldest
        if families.depth is not None:
            depth = GaugeMetricFamily(m.QUEUE_MESSAGES, m.QUEUE_MESSAGES_HELP, labels=["queue", "state"])
            for state in _QUEUE_STATES:
                depth.add_metric([self.queue_name, state], families.depth.get(state, 0))
            yield depth


@dataclass(frozen=True, slots=True)
class _StateFamilies:
    jobs: Mapping[tuple[str, str], float]
    stuck: Mapping[tuple[str, str], tuple[float, float]]
    depth: Mapping[str, int] | None


class _LeaderOnly(Collector):
    """Serves some metrics only while this exporter is the state leader."""

    def __init__(self, is_leader: Callable[[], bool], collectors: Iterable[Counter | Gauge | Histogram]) -> None:
        self.is_leader = is_leader
        self.collectors = tuple(collectors)

    def describe(self) -> Iterator[Metric]:
        """Every wrapped metric, leader or not, so the registry can refuse duplicate names."""
        for collector in self.collectors:
            yield from collector.describe()

    def collect(self) -> Iterator[Metric]:
        """The wrapped metrics, or nothing on a follower."""
        if self.is_leader():
            for collector in self.collectors:
                yield from collector.collect()
