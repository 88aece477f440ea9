"""OTLP span ingest: job spans per exporter CPU-second, against a server that only parses them.

The client in this process POSTs 512-span ExportTraceServiceRequests (protobuf, plain and
gzip) to /v1/traces on the exporter's OTLP listener; spans spread over 1k tenants and every
outcome, with the attributes the worker writes. The figure is spans over the server process's
CPU time (utime + stime from /proc/PID/stat) across the run. Baseline: `bench.baseline_server`,
an aiohttp process whose handler reads the body, ParseFromString's the request and answers 200;
the ratio is the share of parsing alone in what the exporter spends. Run: python -m bench otlp
"""

from __future__ import annotations

import gzip
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.exporter_rig import (
    PROTOBUF,
    Http,
    Server,
    baseline_command,
    exporter_command,
    job_spans,
    otlp_batches,
    post_spans,
    running,
)
from bench.harness import Figure, interleaved, ratios, report

TENANTS = 1000
BATCH = 512
BATCHES = 120
ROUNDS = 5
TARGET = 50_000
# CPU time comes in clock ticks (10 ms): a run must use enough of it for a tick to be noise.
MIN_CPU_SECONDS = 0.5


def ingest(server: Server, bodies: list[bytes], headers: dict[str, str]) -> Callable[[], float]:
    """A subject: spans per CPU-second of server while it takes every body, repeated until MIN_CPU is used."""
    client = Http(server.otlp_base)

    def subject() -> float:
        before = server.cpu_seconds()
        spans = 0
        while True:
            post_spans(client, bodies, headers)
            spans += BATCH * len(bodies)
            used = server.cpu_seconds() - before
            if used >= MIN_CPU_SECONDS:
                return spans / used

    return subject


def main() -> None:
    """Print spans per exporter CPU-second, plain and gzip, as ratios to parsing alone."""
    plain = otlp_batches(job_spans(BATCH * BATCHES, TENANTS), BATCH)
    zipped = [gzip.compress(body) for body in plain]
    plain_headers = {"Content-Type": PROTOBUF}
    gzip_headers = {"Content-Type": PROTOBUF, "Content-Encoding": "gzip"}
    with tempfile.TemporaryDirectory(prefix="bench-otlp-") as tmp:
        command = exporter_command(Path(tmp), tenant_label_limit=TENANTS, state_role="always")
        with running(command, baseline_command()) as [exporter, baseline]:
            subjects = [
                ingest(exporter, plain, plain_headers),
                ingest(baseline, plain, plain_headers),
                ingest(exporter, zipped, gzip_headers),
                ingest(baseline, zipped, gzip_headers),
            ]
            # A first pass creates every tenant's series; the figure is the steady state after it.
            for subject in subjects:
                subject()
            ours, parse_only, ours_gzip, parse_only_gzip = interleaved(ROUNDS, *subjects)

    size = sum(map(len, plain)) / len(plain) / 1e3
    zipped_size = sum(map(len, zipped)) / len(zipped) / 1e3
    for label, measured, base in (
        (f"protobuf, {size:.0f} kB per batch", ours, parse_only),
        (f"protobuf + gzip, {zipped_size:.0f} kB per batch", ours_gzip, parse_only_gzip),
    ):
        figure = Figure.of(measured)
        report(
            f"OTLP ingest, {BATCH}-span batches, {label}",
            f"{figure.show('k spans/CPU-s', 1e-3, 1)}, {ratios(measured, base).show('x')} parse-only "
            f"({Figure.of(base).show('k spans/CPU-s', 1e-3, 1)})",
            f">= {TARGET // 1000}k spans per CPU-second",
            figure.median >= TARGET,
        )


if __name__ == "__main__":
    main()
