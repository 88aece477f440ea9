"""Exporter memory at 10k tenants: resident set after a few scrapes and its peak, against an empty store.

Every tenant has jobs in every status and a span of every outcome. Two settings: the default
tenant label limit (tenants past it fold into __other__) and the limit raised to 10000 (every
tenant its own series). The figures are VmRSS after a few scrapes (steady) and VmHWM (peak)
from /proc/PID/status. Baseline: the same exporter over an empty store, scraped the same way.
Each round starts fresh processes, in turn. Run: python -m bench rss
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.exporter_rig import MB, Http, exporter_command, load_tenants, populate_store, running, scrape
from bench.harness import Figure, interleaved, ratios, report

TENANTS = 10_000
ROUNDS = 3
SCRAPES = 2
TARGET_DEFAULT_MB = 150
TARGET_ALL_TENANTS_MB = 400


def resident(data_dir: Path, tenants: int, peaks: list[float], **settings: object) -> Callable[[], float]:
    """A subject: start an exporter, load tenants, scrape it a few times; its VmRSS (VmHWM goes to peaks).

    Waiting for the tenants to show is one scrape; SCRAPES more follow.
    """

    def subject() -> float:
        # The state reader role is forced so a single exporter reads the store whatever the default.
        with running(exporter_command(data_dir, state_role="always", **settings)) as [server]:
            load_tenants(server, tenants)
            client = Http(server.base)
            for _ in range(SCRAPES):
                scrape(client)
            client.close()
            rss, hwm = server.memory()
        peaks.append(hwm)
        return rss

    return subject


def main() -> None:
    """Print steady and peak RSS at 10k tenants, default limit and raised, as ratios to an empty exporter."""
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        empty, full = Path(tmp) / "empty", Path(tmp) / "full"
        populate_store(full, TENANTS)
        empty_peaks: list[float] = []
        default_peaks: list[float] = []
        all_peaks: list[float] = []
        empty_rss, default_rss, all_rss = interleaved(
            ROUNDS,
            resident(empty, 0, empty_peaks),
            resident(full, TENANTS, default_peaks),
            resident(full, TENANTS, all_peaks, tenant_label_limit=TENANTS),
        )

    for label, rss, peaks, target in (
        ("default label limit", default_rss, default_peaks, TARGET_DEFAULT_MB),
        (f"label limit {TENANTS}", all_rss, all_peaks, TARGET_ALL_TENANTS_MB),
    ):
        for kind, values, base in (("steady RSS", rss, empty_rss), ("peak RSS", peaks, empty_peaks)):
            figure = Figure.of(values)
            report(
                f"exporter {kind} at {TENANTS} tenants, {label}",
                f"{figure.show('MB', 1 / MB, 1)}, {ratios(values, base).show('x')} empty store "
                f"({Figure.of(base).show('MB', 1 / MB, 1)})",
                f"< {target} MB",
                figure.median < target * MB,
            )


if __name__ == "__main__":
    main()
