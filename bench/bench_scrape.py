"""GET /metrics at 1k tenants, against a bare prometheus_client server holding the same series.

Every tenant has jobs in every status (some stuck) and a span of every outcome, so every
per-tenant series exists; the label limit is 1000 and the render cache is off, so each scrape
is a real render. Baseline: `bench.baseline_server`, an aiohttp process serving
`generate_latest` over plain Gauge/Counter/Histogram objects rebuilt from the exporter's own
OpenMetrics exposition (checked: the same samples and label sets). Both are scraped over HTTP
from this process, interleaved, in the text format and in OpenMetrics; the exporter also with
gzip. Run: python -m bench scrape
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.exporter_rig import (
    OPENMETRICS,
    Http,
    baseline_command,
    exporter_command,
    load_tenants,
    populate_store,
    running,
    sample_count,
    scrape,
    tenant_name,
    tenant_sample_count,
)
from bench.harness import Figure, interleaved, ratios, report

TENANTS = 1000
ROUNDS = 5
SCRAPES_PER_ROUND = 3
TARGET_SECONDS = 0.25
TARGET_RATIO = 1.3
TARGET_GZIP = 10.0
SAMPLES_PER_TENANT_BUDGET = 40


def series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """The (sample name, label set) pairs of a text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def timed(client: Http, accept: str = "", encoding: str = "") -> Callable[[], float]:
    """A subject: the median wall time of a few scrapes."""
    return lambda: statistics.median(scrape(client, accept, encoding).seconds for _ in range(SCRAPES_PER_ROUND))


def main() -> None:
    """Print scrape wall time (text, OpenMetrics) as ratios to the baseline, the gzip ratio and the size."""
    with tempfile.TemporaryDirectory(prefix="bench-scrape-") as tmp:
        data = Path(tmp)
        populate_store(data, TENANTS)
        command = exporter_command(data, tenant_label_limit=TENANTS, metrics_cache_ttl=0, state_role="always")
        with running(command) as [exporter]:
            load_tenants(exporter, TENANTS)
            client = Http(exporter.base)
            exposition = data / "exposition.txt"
            exposition.write_bytes(scrape(client, OPENMETRICS).body)
            with running(baseline_command(exposition)) as [baseline]:
                base_client = Http(baseline.base)
                text = scrape(client).body
                if series(text.decode()) != series(scrape(base_client).body.decode()):
                    raise AssertionError("the baseline does not hold the exporter's series")
                text_s, base_text_s, om_s, base_om_s, gzip_s = interleaved(
                    ROUNDS,
                    timed(client),
                    timed(base_client),
                    timed(client, OPENMETRICS),
                    timed(base_client, OPENMETRICS),
                    timed(client, encoding="gzip"),
                )
                zipped = scrape(client, encoding="gzip")
            client.close()

    for label, subject, base in (("text", text_s, base_text_s), ("OpenMetrics", om_s, base_om_s)):
        figure, ratio = Figure.of(subject), ratios(subject, base)
        report(
            f"scrape at {TENANTS} tenants, {label}",
            f"{figure.show('ms', 1e3, 1)}, {ratio.show('x')} baseline ({Figure.of(base).show('ms', 1e3, 1)})",
            f"< {TARGET_SECONDS * 1e3:.0f} ms and <= {TARGET_RATIO}x",
            figure.median < TARGET_SECONDS and ratio.median <= TARGET_RATIO,
        )
    gzipped = zipped.headers.get("content-encoding") == "gzip"
    factor = len(text) / len(zipped.body)
    report(
        f"gzip'd scrape at {TENANTS} tenants",
        f"{len(text) / 1e6:.2f} MB plain, {len(zipped.body) / 1e6:.2f} MB with Accept-Encoding: gzip "
        f"({'gzip' if gzipped else 'not compressed'}): {factor:.1f}x smaller; "
        f"scrape {Figure.of(gzip_s).show('ms', 1e3, 1)}",
        f">= {TARGET_GZIP:.0f}x smaller",
        factor >= TARGET_GZIP,
    )
    per_tenant = tenant_sample_count(text.decode(), tenant_name(0))
    report(
        f"exposition at {TENANTS} tenants",
        f"{len(text) / 1e6:.2f} MB, {sample_count(text.decode())} samples, {per_tenant} samples per tenant",
        f"<= {SAMPLES_PER_TENANT_BUDGET} samples per tenant (series budget)",
        per_tenant <= SAMPLES_PER_TENANT_BUDGET,
    )


if __name__ == "__main__":
    main()
