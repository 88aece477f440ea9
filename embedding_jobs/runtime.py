"""What the long-running commands share: a stop event set by SIGTERM/SIGINT, and the process's providers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator, Sequence

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from jobs.settings import Settings
from worker.health import create_meter_provider
from worker.tracing import create_tracer_provider
from worker.tracker import JobTracker

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[asyncio.Event]:
    """An event that SIGTERM or SIGINT sets while the block runs; the handlers are removed on exit.

    Call it from a coroutine: the handlers belong to the running loop.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


@contextlib.contextmanager
def tracer_provider(
    settings: Settings, service: str, processors: Sequence[SpanProcessor] = ()
) -> Iterator[TracerProvider]:
    """The process's tracer provider, exporting to the OTLP endpoint of settings (or OTEL_*) when one is set.

    Every span a command makes goes through it; on exit it is shut down, which sends what is left.
    """
    provider = create_tracer_provider(service, settings.otlp_endpoint, processors, settings.otlp_token)
    try:
        yield provider
    finally:
        provider.shutdown()


@contextlib.contextmanager
def meter_provider(settings: Settings, tracker: JobTracker, service: str) -> Iterator[MeterProvider | None]:
    """The provider pushing the tracker's health over OTLP (None without an endpoint); shut down on exit.

    Leave the block after the tracker has stopped: the final export then carries the final counts.
    """
    provider = create_meter_provider(tracker, service, settings.otlp_endpoint, settings.otlp_token)
    try:
        yield provider
    finally:
        if provider is not None:
            provider.shutdown()
