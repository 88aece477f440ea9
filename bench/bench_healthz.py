"""/healthz latency while /metrics is scraped back to back at 10k tenants, against no scrapes at all.

Every tenant has jobs in every status and a span of every outcome; the label limit is 10000
and the render cache is off, so each scrape is a full render. A separate client process
scrapes /metrics in a loop (accepting gzip, as Prometheus does) while this process probes
/healthz every 20 ms on a fresh connection (as a kubelet does) for 15 s. Baseline: the same
exporter probed the same way with no scrapes running. Phases alternate, round after round.
Run: python -m bench healthz
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path

from bench.exporter_rig import (
    Http,
    exporter_command,
    load_tenants,
    populate_store,
    probe,
    running,
    scrape,
    wait_for,
)
from bench.harness import Figure, interleaved, ratios, report

TENANTS = 10_000
ROUNDS = 3
LOADED_SECONDS = 15.0
IDLE_SECONDS = 10.0
PROBE_EVERY = 0.02
TARGET_SECONDS = 0.05


def scrape_loop(base: str, started: Event, stop: Event, scrapes: Synchronized[int], spent: Synchronized[float]) -> None:
    """Scrape base/metrics back to back until stop is set; count scrapes and their wall time."""
    client = Http(base)
    started.set()
    while not stop.is_set():
        reply = scrape(client, encoding="gzip")  # as Prometheus asks
        with scrapes.get_lock():
            scrapes.value += 1
        with spent.get_lock():
            spent.value += reply.seconds
    client.close()


def probe_p99(base: str, seconds: float) -> float:
    """Probe base/healthz every PROBE_EVERY for seconds; the 99th percentile of the latencies."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    next_at = time.monotonic()
    while next_at < deadline:
        time.sleep(max(0.0, next_at - time.monotonic()))
        reply = probe(base)
        if reply.status != 200:
            raise RuntimeError(f"/healthz answered {reply.status}")
        latencies.append(reply.seconds)
        # A slow answer delays the next probe rather than queueing a burst behind it.
        next_at = max(next_at + PROBE_EVERY, time.monotonic())
    return statistics.quantiles(latencies, n=100)[98]


def main() -> None:
    """Print /healthz p99 under back-to-back scrapes at 10k tenants, as a ratio to no scrapes."""
    context = multiprocessing.get_context("spawn")
    scrape_seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-healthz-") as tmp:
        data = Path(tmp)
        populate_store(data, TENANTS)
        command = exporter_command(data, tenant_label_limit=TENANTS, metrics_cache_ttl=0, state_role="always")
        with running(command) as [exporter]:
            load_tenants(exporter, TENANTS)

            def under_scrapes() -> float:
                started, stop = context.Event(), context.Event()
                scrapes, spent = context.Value("i", 0), context.Value("d", 0.0)
                scraper = context.Process(
                    target=scrape_loop, args=(exporter.base, started, stop, scrapes, spent), daemon=True
                )
                scraper.start()
                try:
                    wait_for(started.is_set, "the scraper to start", within=60)
                    p99 = probe_p99(exporter.base, LOADED_SECONDS)
                finally:
                    stop.set()
                    scraper.join(120)
                    if scraper.is_alive():
                        scraper.terminate()
                        scraper.join(10)
                if scrapes.value:
                    scrape_seconds.append(spent.value / scrapes.value)
                return p99

            def idle() -> float:
                return probe_p99(exporter.base, IDLE_SECONDS)

            loaded, baseline = interleaved(ROUNDS, under_scrapes, idle)

    figure = Figure.of(loaded)
    took = Figure.of(scrape_seconds).show("s") if scrape_seconds else "no scrape finished"
    report(
        f"/healthz p99 during back-to-back scrapes at {TENANTS} tenants",
        f"{figure.show('ms', 1e3, 1)}, {ratios(loaded, baseline).show('x')} no scrapes "
        f"({Figure.of(baseline).show('ms', 1e3, 1)}); a scrape took {took}",
        f"< {TARGET_SECONDS * 1e3:.0f} ms",
        figure.median < TARGET_SECONDS,
    )


if __name__ == "__main__":
    main()
