"""What the exporter benchmarks share: processes on free ports, HTTP, a populated store, OTLP batches, /proc.

Everything here reaches the exporter through interfaces that outlive its internals: the
`embedding-jobs exporter` command and its EMBEDDING_JOBS_* variables, HTTP, the SQLite store's
schema, the OTLP wire format and /proc. Settings the running code does not know yet are
ignored by it, so a benchmark can name them before they exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from jobs import telemetry as attr
from jobs.model import TERMINAL, JobStatus, format_time, utcnow
from jobs.sqlite_store import SQLiteJobStore

REPO = Path(__file__).resolve().parent.parent
OUTCOMES = ("completed", "failed", "dead_lettered")
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PROTOBUF = "application/x-protobuf"
START_WITHIN = 60.0
STOP_WITHIN = 20.0
MB = 1024 * 1024


def tenant_name(index: int) -> str:
    """The name of the index-th benchmark tenant."""
    return f"tenant-{index}"


def free_port() -> int:
    """A loopback port the OS handed out a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], what: str, within: float) -> None:
    """Poll condition until it holds; TimeoutError naming what once the deadline passes."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within:.0f}s waiting for {what}")
        time.sleep(0.05)


# -- HTTP ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP response, read in full, with the wall time from sending to the last byte."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    seconds: float


class Http:
    """A keep-alive HTTP/1.1 client for one server; reconnects when the server closed the connection."""

    def __init__(self, base: str, timeout: float = 120.0) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] = {}) -> Reply:
        """Send one request and read the whole response."""
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            started = time.perf_counter()
            try:
                self._conn.request(method, path, body=body, headers=dict(headers))
                response = self._conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
                continue
            elapsed = time.perf_counter() - started
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data, elapsed)
        raise AssertionError("unreachable")

    def get(self, path: str, headers: Mapping[str, str] = {}) -> Reply:
        """GET path."""
        return self.request("GET", path, headers=headers)

    def close(self) -> None:
        """Drop the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def probe(base: str, path: str = "/healthz", timeout: float = 60.0) -> Reply:
    """GET on a fresh connection, as a kubelet probe does."""
    client = Http(base, timeout)
    try:
        return client.get(path)
    finally:
        client.close()


def scrape(client: Http, accept: str = "", encoding: str = "") -> Reply:
    """GET /metrics with the given Accept and Accept-Encoding; raises unless it answers 200."""
    headers = {"Accept": accept} if accept else {}
    headers["Accept-Encoding"] = encoding or "identity"
    reply = client.get("/metrics", headers)
    if reply.status != 200:
        raise RuntimeError(f"/metrics answered {reply.status}: {reply.body[:200]!r}")
    return reply


# -- processes ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """How to start one server process that answers GET /healthz on port, and takes spans on otlp_port."""

    argv: Sequence[str]
    env: Mapping[str, str]
    port: int
    otlp_port: int


@dataclass
class Server:
    """A running server process: its URL, its pid, and what /proc says about it."""

    popen: subprocess.Popen[bytes]
    port: int
    otlp_port: int
    log: IO[bytes]

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    @property
    def base(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def otlp_base(self) -> str:
        """The base URL of the server's OTLP receiver."""
        return f"http://127.0.0.1:{self.otlp_port}"

    def log_tail(self, size: int = 2000) -> str:
        """The end of what the process wrote to stderr."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-size:]

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used, from /proc/PID/stat."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes from /proc/PID/status: resident now, and the peak."""
        values: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]


def exporter_command(data_dir: Path, **settings: object) -> Command:
    """`embedding-jobs exporter` on free ports over data_dir, with EMBEDDING_JOBS_<NAME> set from settings."""
    port, otlp_port = free_port(), free_port()
    env = _clean_env()
    env.update({f"EMBEDDING_JOBS_{name.upper()}": str(value) for name, value in settings.items()})
    env.update(
        EMBEDDING_JOBS_DATA_DIR=str(data_dir),
        EMBEDDING_JOBS_EXPORTER_PORT=str(port),
        EMBEDDING_JOBS_EXPORTER_HOST="127.0.0.1",
        EMBEDDING_JOBS_OTLP_PORT=str(otlp_port),
        EMBEDDING_JOBS_LOG_LEVEL="WARNING",
    )
    return Command([sys.executable, "-m", "embedding_jobs", "exporter"], env, port, otlp_port)


def baseline_command(exposition: Path | None = None) -> Command:
    """The bare aiohttp baseline server on a free port, serving exposition's series if given."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.baseline_server", "--port", str(port)]
    if exposition is not None:
        argv += ["--exposition", str(exposition)]
    # One port for everything, /v1/traces included: the baseline has a single listener.
    return Command(argv, _clean_env(), port, port)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_JOBS_", "OTEL_"))}
    # The code under test is this checkout's, whatever the environment has installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


@contextlib.contextmanager
def running(*commands: Command, within: float = START_WITHIN) -> Iterator[list[Server]]:
    """Start every command at once, wait until each answers /healthz, stop them all on the way out."""
    with contextlib.ExitStack() as stack:
        servers: list[Server] = []
        for command in commands:
            log = stack.enter_context(tempfile.TemporaryFile())
            popen = subprocess.Popen(command.argv, env=dict(command.env), stdout=log, stderr=log, cwd=REPO)
            servers.append(Server(popen, command.port, command.otlp_port, log))
            stack.callback(_stop, servers[-1])
        deadline = time.monotonic() + within
        for server in servers:
            _wait_healthy(server, deadline)
        yield servers


def _wait_healthy(server: Server, deadline: float) -> None:
    while True:
        if server.popen.poll() is not None:
            raise RuntimeError(f"server on port {server.port} exited:\n{server.log_tail()}")
        try:
            if probe(server.base, timeout=5).status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server on port {server.port} did not answer /healthz:\n{server.log_tail()}")
        time.sleep(0.05)


def _stop(server: Server) -> None:
    popen = server.popen
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(STOP_WITHIN)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(STOP_WITHIN)
    if popen.returncode not in (0, -signal.SIGTERM):
        print(f"warning: server on port {server.port} exited {popen.returncode}:\n{server.log_tail()}")


# -- the store ---------------------------------------------------------------------

_ROW_COLUMNS = (
    "tenant_id, id, shard_id, shard_type_id, status, retry_count, error, created_at, updated_at, completed_at"
)
_COUNT_JOBS = (
    "INSERT INTO job_counters (tenant_id, status, count) "
    "SELECT tenant_id, status, COUNT(*) FROM jobs GROUP BY tenant_id, status"
)
_COUNTER_MISMATCHES = (
    "SELECT COUNT(*) FROM (SELECT tenant_id, status, COUNT(*) AS n FROM jobs GROUP BY tenant_id, status) AS j "
    "FULL OUTER JOIN job_counters AS c USING (tenant_id, status) WHERE j.n IS NOT c.count"
)


def insert_jobs(conn: sqlite3.Connection, columns: str, rows: Iterable[Sequence[object]]) -> None:
    """Bulk-insert job rows (values for columns) in one transaction, with counters computed from them."""
    marks = ", ".join("?" * len(columns.split(",")))
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(f"INSERT INTO jobs ({columns}) VALUES ({marks})", rows)
    conn.execute(_COUNT_JOBS)
    conn.execute("COMMIT")


def populate_store(data_dir: Path, tenants: int) -> Path:
    """A fresh store under data_dir where each of tenants has a job in every status.

    Rows go in as one bulk transaction into the store's own schema, and the counters are
    computed from those rows, so they equal a recount. Pending and processing jobs are two
    hours old: stuck, so the stuck-job gauges carry values. Returns the database path.
    """
    path = data_dir / "embedding-jobs.db"
    if path.exists():
        raise FileExistsError(f"{path} exists; populate_store wants a fresh data dir")

    async def create_schema() -> None:
        store = await SQLiteJobStore.open(path)
        await store.close()

    asyncio.run(create_schema())
    now = format_time(utcnow())
    old = format_time(utcnow() - timedelta(hours=2))
    rows = []
    for index in range(tenants):
        tenant = tenant_name(index)
        for status in JobStatus:
            failed = status in (JobStatus.FAILED, JobStatus.DEAD_LETTERED)
            stamp = old if status in (JobStatus.PENDING, JobStatus.PROCESSING) else now
            closed = now if status in TERMINAL else None
            error = "embedder unavailable" if failed else None
            job = f"job-{status.value}"
            rows.append(
                (tenant, job, f"shard-{status.value}", "document", status.value, int(failed), error, old, stamp, closed)
            )
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        insert_jobs(conn, _ROW_COLUMNS, rows)
        (mismatches,) = conn.execute(_COUNTER_MISMATCHES).fetchone()
    finally:
        conn.close()
    if mismatches:
        raise AssertionError(f"{mismatches} counter rows differ from a recount")
    return path


# -- spans -------------------------------------------------------------------------


def job_spans(count: int, tenants: int, seed: int = 7) -> list[ReadableSpan]:
    """count finished `embedding.job` spans as the worker writes them, over tenants and every outcome.

    Span i belongs to tenant i % tenants with outcome (i // tenants) % 3, so 3 * tenants spans
    give every tenant every outcome. Durations and queue waits sweep the histogram range.
    """
    rng = random.Random(seed)
    resource = Resource.create({"service.name": "embedding-jobs-worker"})
    scope = InstrumentationScope(attr.INSTRUMENTATION_NAME)
    base_ns = time.time_ns() - 3600 * 10**9
    flags = TraceFlags(TraceFlags.SAMPLED)
    spans = []
    for i in range(count):
        tenant = tenant_name(i % tenants)
        outcome = OUTCOMES[(i // tenants) % len(OUTCOMES)]
        trace_id = rng.getrandbits(128) or 1
        attributes: dict[str, str | int | float] = {
            attr.MESSAGING_SYSTEM: "servicebus",
            attr.MESSAGING_DESTINATION: "embedding-jobs",
            attr.MESSAGING_OPERATION_TYPE: "process",
            attr.MESSAGING_OPERATION_NAME: "process",
            attr.MESSAGING_MESSAGE_ID: f"{tenant}.job-{i}",
            attr.MESSAGING_DELIVERY_COUNT: 1,
            attr.QUEUE_WAIT: 0.01 * 1.8 ** (i % 14),
            attr.TENANT: tenant,
            attr.JOB_ID: f"job-{i}",
            attr.SHARD_ID: f"shard-{i}",
            attr.SHARD_TYPE_ID: "document",
            attr.RETRY_COUNT: 0 if outcome == "completed" else 1,
            attr.GEN_AI_OPERATION: "embeddings",
            attr.GEN_AI_MODEL: "text-embedding-3-small",
            attr.OUTCOME: outcome,
        }
        if outcome == "completed":
            attributes.update({attr.VECTOR_COUNT: 1 + i % 40, attr.CHUNK_COUNT: 1 + i % 40})
        else:
            attributes[attr.ERROR_TYPE] = "EmbedderUnavailableError"
        start = base_ns + i * 1_000_000
        spans.append(
            ReadableSpan(
                name=attr.JOB_SPAN,
                context=SpanContext(trace_id, rng.getrandbits(64) or 1, is_remote=False, trace_flags=flags),
                parent=SpanContext(trace_id, rng.getrandbits(64) or 1, is_remote=True, trace_flags=flags),
                resource=resource,
                attributes=attributes,
                kind=SpanKind.CONSUMER,
                status=Status(StatusCode.OK if outcome == "completed" else StatusCode.ERROR),
                start_time=start,
                end_time=start + int(0.03e9 * 1.7 ** (i % 16)),
                instrumentation_scope=scope,
            )
        )
    return spans


def otlp_batches(spans: Sequence[ReadableSpan], size: int = 512) -> list[bytes]:
    """Serialized ExportTraceServiceRequests of up to size spans each, as the SDK's OTLP exporter sends."""
    return [encode_spans(spans[i : i + size]).SerializeToString() for i in range(0, len(spans), size)]


@functools.cache
def _batches(count: int, tenants: int) -> list[bytes]:
    return otlp_batches(job_spans(count, tenants))


def post_spans(client: Http, batches: Sequence[bytes], headers: Mapping[str, str] | None = None) -> None:
    """POST each batch to /v1/traces (protobuf unless headers say otherwise); raises unless each answers 200.

    client is one of the server's OTLP receiver (Server.otlp_base).
    """
    for body in batches:
        reply = client.request("POST", "/v1/traces", body, headers or {"Content-Type": PROTOBUF})
        if reply.status != 200:
            raise RuntimeError(f"/v1/traces answered {reply.status}: {reply.body[:200]!r}")


# -- the exposition ----------------------------------------------------------------


def sample_total(text: str, name: str) -> float:
    """The sum of every sample called name in an exposition (0 when there is none); a scan, not a parse."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{.*?\}})? (\S+)", re.MULTILINE)
    return sum(float(m.group(1)) for m in pattern.finditer(text))


def sample_count(text: str) -> int:
    """Samples in an exposition: its lines that are neither comments nor blank."""
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def tenant_sample_count(text: str, tenant: str) -> int:
    """Samples carrying tenant="<tenant>": what one tenant costs in the exposition."""
    return text.count(f'tenant="{tenant}"')


def load_tenants(server: Server, tenants: int) -> str:
    """Send a job span of every outcome for every tenant; wait until they and a state refresh show.

    Returns the exposition that showed them.
    """
    count = 3 * tenants
    client = Http(server.base)
    receiver = Http(server.otlp_base)
    try:
        post_spans(receiver, _batches(count, tenants))
        text = ""

        def ready() -> bool:
            nonlocal text
            text = scrape(client).body.decode()
            return (
                sample_total(text, "embedding_exporter_spans_received_total") >= count
                and sample_total(text, "embedding_exporter_store_refresh_duration_seconds_count") >= 1
            )

        wait_for(ready, "the spans and a state refresh to show in /metrics", within=120)
        return text
    finally:
        client.close()
        receiver.close()
