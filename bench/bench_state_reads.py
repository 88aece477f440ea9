"""Store reads per refresh interval with 1, 3 and 10 exporter processes on one SQLite store.

A few hundred tenants; refresh interval 0.5 s; the state reader role left to election. Reads
are state refreshes: the sum over the exporters of
`embedding_exporter_store_refresh_duration_seconds_count`, its growth over a window divided by
the elapsed refresh intervals. Once refreshing is steady (the sum has grown twice since every
exporter answered), a window of about 10 intervals is measured, from one refresh to another.
The target is one deployment-wide reader: 3 and 10 exporters read as often as 1 does. Each
round starts fresh processes, in turn, 1 then 3 then 10. Run: python -m bench state_reads
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.exporter_rig import Http, exporter_command, populate_store, running, sample_total, scrape, wait_for
from bench.harness import Figure, interleaved, ratios, report

TENANTS = 300
INTERVAL = 0.5
WINDOW = 10 * INTERVAL
ROUNDS = 3
EXPORTERS = (1, 3, 10)
TARGET_LOW, TARGET_HIGH = 0.8, 1.25
REFRESHES = "embedding_exporter_store_refresh_duration_seconds_count"


def refreshes(clients: Sequence[Http]) -> float:
    """Refreshes so far, summed over the exporters' /metrics."""
    return sum(sample_total(scrape(client).body.decode(), REFRESHES) for client in clients)


def next_refresh(clients: Sequence[Http]) -> tuple[float, float]:
    """Poll until the summed refresh count grows; (when that was seen, the new sum).

    Taking both ends of a window at a refresh keeps a whole number of refresh periods in it,
    so a single reader's rate carries no rounding from where the window happened to fall.
    """
    before = refreshes(clients)
    seen: list[tuple[float, float]] = []

    def grown() -> bool:
        now = refreshes(clients)
        seen.append((time.monotonic(), now))
        return now > before

    wait_for(grown, "a state refresh", within=30 * INTERVAL)
    return seen[-1]


def reads_per_interval(data_dir: Path, exporters: int) -> Callable[[], float]:
    """A subject: start exporters on the store; their summed refreshes per elapsed refresh interval."""

    def subject() -> float:
        commands = [
            exporter_command(data_dir, refresh_interval=INTERVAL, state_role="elect", tenant_label_limit=TENANTS)
            for _ in range(exporters)
        ]
        with running(*commands) as servers:
            clients = [Http(server.base) for server in servers]
            # Two refreshes after every exporter answers: start-up and any election are over.
            next_refresh(clients)
            next_refresh(clients)
            started, first = next_refresh(clients)
            time.sleep(WINDOW)  # the measurement window, not a wait for a condition
            ended, last = next_refresh(clients)
            for client in clients:
                client.close()
        return (last - first) / ((ended - started) / INTERVAL)

    return subject


def main() -> None:
    """Print store reads per refresh interval with 3 and 10 exporters, as ratios to 1 exporter."""
    with tempfile.TemporaryDirectory(prefix="bench-state-reads-") as tmp:
        data = Path(tmp)
        populate_store(data, TENANTS)
        one, *more = interleaved(ROUNDS, *(reads_per_interval(data, n) for n in EXPORTERS))

    for count, reads in zip(EXPORTERS[1:], more, strict=True):
        ratio = ratios(reads, one)
        report(
            f"store reads per refresh interval, {count} exporters on one store",
            f"{Figure.of(reads).show('reads')}, {ratio.show('x')} one exporter ({Figure.of(one).show('reads')})",
            f"{TARGET_LOW}-{TARGET_HIGH}x one exporter",
            TARGET_LOW <= ratio.median <= TARGET_HIGH,
        )


if __name__ == "__main__":
    main()
