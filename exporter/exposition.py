"""Writing the exposition: the text format (0.0.4) and OpenMetrics 1.0, fast for the per-tenant families.

The per-tenant families (span metrics, state gauges) write their lines straight from their arrays
through the helpers here, which is several times cheaper than building standard metric families
and formatting them sample by sample. The exporter's few self-metrics stay ordinary
prometheus-client metrics and are formatted by the client library. `ExporterRegistry` knows
which collectors can write themselves; any other registry is rendered by the client library.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from exporter.spanmetrics import _Exemplar, _Histogram

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
EOF = "# EOF\n"
# The client library's OpenMetrics writer, which it leaves untyped.
generate_openmetrics: Callable[[Any], bytes] = openmetrics_exposition.generate_latest


@runtime_checkable
class Renderable(Protocol):
    """A collector that appends its own exposition lines."""

    def render(self, out: list[str], openmetrics: bool) -> None:
        """Append this collector's families to out."""
        ...


class ExporterRegistry(CollectorRegistry):
    """A registry that remembers its collectors in order, so renderable ones can write themselves."""

    def __init__(self) -> None:
        super().__init__()
        self._ordered: list[Collector] = []

    def register(self, collector: Collector) -> None:
        """Register collector (as CollectorRegistry does) and remember it."""
        super().register(collector)
        self._ordered.append(collector)

    def unregister(self, collector: Collector) -> None:
        """Unregister collector."""
        super().unregister(collector)
        self._ordered.remove(collector)

    def collectors(self) -> list[Collector]:
        """The registered collectors, in registration order."""
        return list(self._ordered)


class Families:
    """Some collectors seen as one registry, for the client library's formatters."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def render(registry: CollectorRegistry, openmetrics: bool) -> bytes:
    """The whole exposition of registry in the text format or OpenMetrics."""
    if not isinstance(registry, ExporterRegistry):
        return generate_openmetrics(registry) if openmetrics else generate_latest(registry)
    out: list[str] = []
    others: list[Collector] = []
    for collector in registry.collectors():
        if isinstance(collector, Renderable):
            collector.render(out, openmetrics)
        else:
            others.append(collector)
    families = Families(others)
    if openmetrics:
        rest = generate_openmetrics(families).decode()
        out.append(rest.removesuffix(EOF))
        out.append(EOF)
    else:
        out.append(generate_latest(families).decode())
    # Joined a slice at a time: one join of a large exposition would hold the GIL for tens of ms.
    chunks = []
    for start in range(0, len(out), PACE_ROWS * 32):
        chunks.append("".join(out[start : start + PACE_ROWS * 32]).encode())
        time.sleep(0)
    return b"".join(chunks)


T = TypeVar("T")
# Rows written between two releases of the GIL (see paced()).
PACE_ROWS = 128


def paced(items: Iterable[T]) -> Iterator[T]:
    """items, releasing the GIL every PACE_ROWS of them.

    A render runs on a worker thread while the event loop serves health probes and span
    ingest. CPython hands the GIL over only every 5 ms of pure Python work, and a probe
    needs it several times; giving it up every few hundred microseconds keeps probes
    answering in milliseconds while a large exposition is written.
    """
    for index, item in enumerate(items):
        if index % PACE_ROWS == PACE_ROWS - 1:
            time.sleep(0)
        yield item


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_pairs(**labels: str) -> str:
    """'a="x",b="y"' with values escaped: a fragment to put inside braces."""
    return ",".join(f'{name}="{_escape_label(value)}"' for name, value in labels.items())


def header(out: list[str], name: str, help_text: str, kind: str, openmetrics: bool, unit: str = "") -> None:
    """The HELP and TYPE lines of a family (counters are named with _total in the text format), and its
    UNIT line in OpenMetrics."""
    if openmetrics:
        escaped = help_text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
        out.append(f"# HELP {name} {escaped}\n# TYPE {name} {kind}\n")
        if unit:
            out.append(f"# UNIT {name} {unit}\n")
        return
    shown = name + "_total" if kind == "counter" else name
    escaped = help_text.replace("\\", r"\\").replace("\n", r"\n")
    out.append(f"# HELP {shown} {escaped}\n# TYPE {shown} {kind}\n")


def float_text(value: float) -> str:
    """A float as Prometheus' Go code writes it ('0.5', '+Inf', '1e+06'), as prometheus-client does."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(float(value))
    dot = text.find(".")
    # Go switches to an exponent sooner than Python.
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def number(value: float) -> str:
    """A sample value: integers as integers, finite floats as repr writes them."""
    if type(value) is int:
        return str(value)
    if math.isfinite(value):
        return repr(value)
    return float_text(value)


def exemplar_text(exemplar: _Exemplar) -> str:
    """' # {trace_id="…"} value timestamp' for an OpenMetrics sample line."""
    trace_id, value, at = exemplar
    return f' # {{trace_id="{trace_id:032x}"}} {number(value)} {at:.3f}'


def sample(
    out: list[str], name: str, fragment: str, value: float, exemplar: _Exemplar | None, openmetrics: bool
) -> None:
    """One sample line; the exemplar is written only in OpenMetrics."""
    tail = exemplar_text(exemplar) if openmetrics and exemplar is not None else ""
    out.append(f"{name}{{{fragment}}} {number(value)}{tail}\n")


@functools.cache
def bucket_bounds(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The le label values of bounds, +Inf last."""
    return (*(float_text(b) for b in bounds), "+Inf")


def histogram(
    out: list[str], name: str, fragment: str, les: tuple[str, ...], data: _Histogram, openmetrics: bool
) -> None:
    """The _bucket, _count and _sum lines of one histogram series from per-bucket counts."""
    prefix = f"{name}_bucket{{{fragment},le="
    cumulative = 0
    if openmetrics:
        for le, count, exemplar in zip(les, data.counts, data.exemplars, strict=True):
            cumulative += count
            tail = exemplar_text(exemplar) if exemplar is not None else ""
            out.append(f'{prefix}"{le}"}} {cumulative}{tail}\n')
    else:
        for le, count in zip(les, data.counts, strict=True):
            cumulative += count
            out.append(f'{prefix}"{le}"}} {cumulative}\n')
    out.append(f"{name}_count{{{fragment}}} {cumulative}\n{name}_sum{{{fragment}}} {number(data.total)}\n")
