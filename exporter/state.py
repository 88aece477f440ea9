"""State metrics read in the background and served from memory at scrape time.

A scrape never waits on the store or the queue: the refresher reads counters and stuck jobs
from the store, and the queue depth from the queue, each on the interval with its own bounded
timeout, and the collector serves the last good reading of each. The two readings are apart
so that one source failing never blanks or ages the other's gauges. Staleness shows in each
reading's last-success timestamp and error counter.
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

# Returns {"active": n, "scheduled": n, "dead_letter": n} for the queue.
DepthSource = Callable[[], Awaitable[Mapping[str, int]]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the last successful read of the store returned."""

    jobs: Mapping[str, Mapping[JobStatus, int]] = field(default_factory=dict)
    stuck: Mapping[tuple[str, str], tuple[float, float]] = field(default_factory=dict)


class StateCollector(Collector):
    """Serves per-tenant status gauges and stuck-job gauges from a store snapshot, queue depth from its own."""

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
        depth_timeout: float = 10.0,
        queue_name: str = "embedding-jobs",
        is_leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.interval = interval
        self.timeout = timeout
        self.stuck_after = stuck_after
        self.depth_source = depth_source
        self.depth_timeout = depth_timeout
        self.queue_name = queue_name
        self.snapshot = Snapshot()
        # The last good queue-depth reading, None until one succeeds (then no depth gauge is served).
        self.depth: Mapping[str, int] | None = None
        self._folded: tuple[Snapshot, _StateFamilies] | None = None
        self.refreshed = asyncio.Event()
        self.depth_refreshed = asyncio.Event()
        # Only the state leader reads the store; the others export none of what a read produces.
        self.is_leader = is_leader
        self._wake_store = asyncio.Event()
        self._wake_depth = asyncio.Event()
        self._duration = Histogram(
            m.REFRESH_DURATION, m.REFRESH_DURATION_HELP, unit=m.SECONDS, buckets=m.READ_BUCKETS, registry=None
        )
        self._errors = Counter(m.REFRESH_ERRORS, m.REFRESH_ERRORS_HELP, registry=None)
        self._last_success = Gauge(m.REFRESH_LAST_SUCCESS, m.REFRESH_LAST_SUCCESS_HELP, unit=m.SECONDS, registry=None)
        own: list[Counter | Gauge | Histogram] = [self._duration, self._errors, self._last_success]
        # Only served when there is a queue to read.
        depth_duration = Histogram(
            m.QUEUE_DEPTH_DURATION,
            m.QUEUE_DEPTH_DURATION_HELP,
            m.QUEUE_DEPTH_LABELS,
            unit=m.SECONDS,
            buckets=m.READ_BUCKETS,
            registry=None,
        )
        depth_errors = Counter(m.QUEUE_DEPTH_ERRORS, m.QUEUE_DEPTH_ERRORS_HELP, m.QUEUE_DEPTH_LABELS, registry=None)
        depth_last_success = Gauge(
            m.QUEUE_DEPTH_LAST_SUCCESS,
            m.QUEUE_DEPTH_LAST_SUCCESS_HELP,
            m.QUEUE_DEPTH_LABELS,
            unit=m.SECONDS,
            registry=None,
        )
        self._depth_duration = depth_duration.labels(queue_name)
        self._depth_errors = depth_errors.labels(queue_name)
        self._depth_last_success = depth_last_success.labels(queue_name)
        if depth_source is not None:
            own += [depth_duration, depth_errors, depth_last_success]
        # A follower's last-success times would age and fire the stale alerts: leader only.
        registry.register(_LeaderOnly(is_leader, own))
        Gauge(m.STATE_LEADER, m.STATE_LEADER_HELP, registry=registry).set_function(lambda: float(self.is_leader()))
        registry.register(self)

    async def run(self) -> None:
        """Read the store, and the queue depth, each on the interval while leader, at once when woken.

        Two loops, so a store read that hangs until its timeout never delays a depth read, nor
        the other way round. Cancel to stop.
        """
        async with asyncio.TaskGroup() as loops:
            loops.create_task(self._every_interval(self.refresh, self._wake_store, self._forget_store))
            if self.depth_source is not None:
                loops.create_task(self._every_interval(self.refresh_depth, self._wake_depth, self._forget_depth))

    async def _every_interval(
        self, refresh: Callable[[], Awaitable[bool]], wake: asyncio.Event, forget: Callable[[], None]
    ) -> None:
        while True:
            wake.clear()
            if self.is_leader():
                await refresh()
            else:
                # Regaining leadership must not serve what was read before the last term.
                forget()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await wake.wait()

    def _forget_store(self) -> None:
        self.snapshot = Snapshot()
        self.refreshed.clear()

    def _forget_depth(self) -> None:
        self.depth = None
        self.depth_refreshed.clear()

    def wake(self) -> None:
        """Refresh now instead of at the end of the interval (on winning leadership)."""
        self._wake_store.set()
        self._wake_depth.set()

    async def refresh(self) -> bool:
        """Read a new store snapshot within the timeout; on failure keep the old one and count the error."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                snapshot = await self._read()
        except Exception as exc:  # a failed read must never stop the refresher
            self._errors.inc()
            log.warning("state refresh from the job store failed: %s", str(exc) or "timed out")
            return False
        finally:
            self._duration.observe(time.perf_counter() - started)
        # Tenants the store knows take their label places ahead of names seen only in spans.
        self.limiter.admit_known(snapshot.jobs)
        self.snapshot = snapshot
        self._last_success.set(time.time())
        self.refreshed.set()
        return True

    async def refresh_depth(self) -> bool:
        """Read the queue depth within its timeout; on failure keep serving the last reading and count the error.

        A depth that cannot be read for long stays at its last value, as the store gauges do:
        its age shows in the last-success timestamp, which the stale-depth alert watches.
        """
        if self.depth_source is None:
            return False
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.depth_timeout):
                depth = dict(await self.depth_source())
        except Exception as exc:  # a failed read must never stop the refresher
            self._depth_errors.inc()
            log.warning("queue depth read of %s failed: %s", self.queue_name, str(exc) or "timed out")
            return False
        finally:
            self._depth_duration.observe(time.perf_counter() - started)
        self.depth = depth
        self._depth_last_success.set(time.time())
        self.depth_refreshed.set()
        return True

    async def _read(self) -> Snapshot:
        jobs = await self.store.stats_all()
        now = datetime.now(UTC)
        stuck = {
            (s.tenant_id, s.status.value): (s.count, (now - s.oldest_updated_at).total_seconds())
            for s in await self.store.stuck(timedelta(seconds=self.stuck_after))
        }
        return Snapshot(jobs=jobs, stuck=stuck)

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
        return _StateFamilies(jobs, dict(sorted(stuck.items())))

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
        ex.header(out, m.JOBS_STUCK_OLDEST, m.JOBS_STUCK_OLDEST_HELP, "gauge", openmetrics, m.SECONDS)
        for (tenant, status_name), (_, age) in ex.paced(families.stuck.items()):
            fragment = ex.label_pairs(tenant=tenant, status=status_name)
            out.append(f"{m.JOBS_STUCK_OLDEST}{{{fragment}}} {ex.number(age)}\n")
        depth = self.depth
        if depth is not None:
            ex.header(out, m.QUEUE_MESSAGES, m.QUEUE_MESSAGES_HELP, "gauge", openmetrics)
            for state in m.QUEUE_STATES:
                fragment = ex.label_pairs(queue=self.queue_name, state=state)
                out.append(f"{m.QUEUE_MESSAGES}{{{fragment}}} {ex.number(depth.get(state, 0))}\n")

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """Every family this collector can serve, leader or not, so the registry can refuse duplicate names."""
        jobs, stuck, oldest, messages = _new_families()
        yield from (jobs, stuck, oldest)
        if self.depth_source is not None:
            yield messages

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The same gauges as standard metric families (for registry readers; slower than render)."""
        if not self.is_leader():
            return
        families = self._families()
        jobs, stuck, oldest, messages = _new_families()
        for (tenant, status_name), value in families.jobs.items():
            jobs.add_metric([tenant, status_name], value)
        yield jobs
        for (tenant, status_name), (stuck_count, age) in families.stuck.items():
            stuck.add_metric([tenant, status_name], stuck_count)
            oldest.add_metric([tenant, status_name], age)
        yield stuck
        yield oldest
        depth = self.depth
        if depth is not None:
            for state in m.QUEUE_STATES:
                messages.add_metric([self.queue_name, state], depth.get(state, 0))
            yield messages


def _new_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    """Empty families for jobs, stuck jobs, the oldest stuck job's age, and queue messages."""
    return (
        GaugeMetricFamily(m.JOBS, m.JOBS_HELP, labels=m.JOBS_LABELS),
        GaugeMetricFamily(m.JOBS_STUCK, m.JOBS_STUCK_HELP, labels=m.JOBS_LABELS),
        GaugeMetricFamily(m.JOBS_STUCK_OLDEST, m.JOBS_STUCK_OLDEST_HELP, labels=m.JOBS_LABELS, unit=m.SECONDS),
        GaugeMetricFamily(m.QUEUE_MESSAGES, m.QUEUE_MESSAGES_HELP, labels=m.QUEUE_MESSAGES_LABELS),
    )


@dataclass(frozen=True, slots=True)
class _StateFamilies:
    jobs: Mapping[tuple[str, str], float]
    stuck: Mapping[tuple[str, str], tuple[float, float]]


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
