"""Cost of the REST API's job reads, as ratios to a bare aiohttp handler returning the same bytes.

The exporter app (create_app over a SQLite store of 10k jobs, bearer token on) runs in its own
process, with two extra routes that answer the captured body of a list page and of one job
from memory: the baseline, on the same server, app and event loop. The load comes from this
process (aiohttp client), so the server's CPU time, read from /proc/PID/stat, is its own.

Figures, subject and baseline interleaved round by round:
- server CPU per request of GET /api/v1/embedding-jobs?tenantId=...&limit=50 and of GET one job;
- p99 latency of the list page with 50 concurrent clients for 20 s.
Run: python -m bench api
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from aiohttp import ClientSession, TCPConnector, web

from bench.exporter_rig import insert_jobs
from bench.harness import Figure, interleaved, ratios, report
from exporter.app import create_app
from jobs.model import format_time, utcnow
from jobs.settings import Settings
from jobs.sqlite_store import COLUMNS, SCHEMA, SQLiteJobStore

JOBS = 10_000
TENANTS = 10
TOKEN = "bench-operator-token-123456"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
LIST_PATH = "/api/v1/embedding-jobs?tenantId=tenant-03&limit=50"
GET_PATH = "/api/v1/embedding-jobs/job-005003?tenantId=tenant-03"
BARE_LIST_PATH = "/bare/list"
BARE_GET_PATH = "/bare/job"
ROUNDS = 3
CPU_SECONDS = 1.5
CPU_CLIENTS = 4
LOAD_SECONDS = 20.0
LOAD_CLIENTS = 50
CPU_TARGET = 2.0
P99_TARGET = 2.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def build_store(path: Path) -> None:
    """JOBS jobs over TENANTS tenants with bulk SQL: mostly completed, some failed, a few pending."""
    start = utcnow() - timedelta(days=1)
    metadata = json.dumps({"embeddingModel": "hashing-256", "vectorCount": 12, "processingTimeMs": 84.25})

    def rows() -> Iterator[tuple[object, ...]]:
        for i in range(JOBS):
            at = format_time(start + timedelta(seconds=i * 5))
            status, error, done = "completed", None, at  # type: str, str | None, str | None
            if i % 50 == 7:
                status, error, done = "failed", "embedder returned 503: upstream overloaded", None
            elif i >= JOBS - 40:
                status, done = "pending", None
            yield (
                f"tenant-{i % TENANTS:02d}",
                f"job-{i:06d}",
                f"shard-{i}",
                "document",
                status,
                1 if error else 0,
                error,
                at,
                at,
                done,
                f"{i:032x}",
                metadata if status == "completed" else "{}",
            )

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(SCHEMA)
        insert_jobs(conn, COLUMNS, rows())
    finally:
        conn.close()


# -- the server process -------------------------------------------------------------


async def serve(path: Path) -> None:
    """The exporter app over the store at path, plus the bare routes; prints its port, stops at EOF on stdin."""
    store = await SQLiteJobStore.open(path)
    app = create_app(Settings(api_tokens=f"{TOKEN}=*"), store)
    bodies: dict[str, bytes] = {}

    async def capture(request: web.Request) -> web.Response:
        bodies.update({name: body.encode() for name, body in (await request.json()).items()})
        return web.Response(status=204)

    def bare(name: str) -> web.Response:
        return web.Response(body=bodies[name], content_type="application/json", charset="utf-8")

    async def bare_list(request: web.Request) -> web.Response:
        return bare("list")

    async def bare_job(request: web.Request) -> web.Response:
        return bare("job")

    app.router.add_post("/bare/bodies", capture)
    app.router.add_get(BARE_LIST_PATH, bare_list)
    app.router.add_get(BARE_GET_PATH, bare_job)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()
    await store.close()


@contextmanager
def server(path: Path) -> Iterator[tuple[str, int]]:
    """Start the server process; yield its base URL and pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_api", "--serve", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


# -- the load -----------------------------------------------------------------------


async def drive(base: str, path: str, clients: int, seconds: float) -> list[float]:
    """clients closed-loop callers of path for seconds; the latency of every request, in seconds."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with ClientSession(base, connector=TCPConnector(limit=clients), headers=HEADERS) as session:

        async def caller() -> None:
            while (started := time.perf_counter()) < deadline:
                async with session.get(path) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"{path}: HTTP {response.status}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(clients)))
    return latencies


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Phase:
    """One measured run of a path on the server: CPU per request, throughput and p99."""

    def __init__(self, base: str, pid: int, path: str, clients: int, seconds: float) -> None:
        self.base, self.pid, self.path, self.clients, self.seconds = base, pid, path, clients, seconds
        self.rates: list[float] = []
        self.p99s: list[float] = []
        self.cpus: list[float] = []

    def cpu_per_request(self) -> float:
        """Run once; record the figures and return the server CPU seconds per request."""
        cpu_before, started = cpu_seconds(self.pid), time.perf_counter()
        latencies = asyncio.run(drive(self.base, self.path, self.clients, self.seconds))
        cpu, elapsed = cpu_seconds(self.pid) - cpu_before, time.perf_counter() - started
        self.rates.append(len(latencies) / elapsed)
        self.p99s.append(p99(latencies))
        self.cpus.append(cpu / len(latencies))
        return self.cpus[-1]

    def latency_p99(self) -> float:
        """Run once; return the p99 latency in seconds."""
        self.cpu_per_request()
        return self.p99s[-1]


async def capture_bodies(base: str) -> None:
    """Fetch the subject's answers and hand them to the bare routes."""
    async with ClientSession(base, headers=HEADERS) as session:
        bodies = {}
        for name, path in (("list", LIST_PATH), ("job", GET_PATH)):
            async with session.get(path) as response:
                assert response.status == 200, await response.text()
                bodies[name] = await response.text()
        assert len(json.loads(bodies["list"])["items"]) == 50
        async with session.post("/bare/bodies", json=bodies) as response:
            assert response.status == 204


def main() -> None:
    """Print CPU per request and p99 under load, each as a ratio to the bare handler."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "jobs.db"
        build_store(path)
        with server(path) as (base, pid):
            asyncio.run(capture_bodies(base))
            phases = {
                name: Phase(base, pid, url, CPU_CLIENTS, CPU_SECONDS)
                for name, url in (
                    ("list", LIST_PATH),
                    ("bare list", BARE_LIST_PATH),
                    ("get", GET_PATH),
                    ("bare get", BARE_GET_PATH),
                )
            }
            phases["list"].cpu_per_request()  # warm-up: page cache, code paths
            cpu = interleaved(ROUNDS, *(phase.cpu_per_request for phase in phases.values()))
            load = {
                name: Phase(base, pid, url, LOAD_CLIENTS, LOAD_SECONDS)
                for name, url in (("list", LIST_PATH), ("bare", BARE_LIST_PATH))
            }
            p99s = interleaved(ROUNDS, *(phase.latency_p99 for phase in load.values()))
    for index, name in enumerate(("list", "get")):
        subject, baseline = cpu[2 * index], cpu[2 * index + 1]
        ratio = ratios(subject, baseline)
        report(
            f"api {name} CPU per request",
            f"{Figure.of(subject).show('us', 1e6, 0)} vs bare {Figure.of(baseline).show('us', 1e6, 0)}, "
            f"ratio {ratio.show('x')}",
            f"<= {CPU_TARGET}x bare",
            ratio.median <= CPU_TARGET,
        )
    ratio = ratios(p99s[0], p99s[1])
    report(
        f"api list p99, {LOAD_CLIENTS} clients x {LOAD_SECONDS:.0f} s",
        f"{Figure.of(p99s[0]).show('ms', 1e3, 1)} at {Figure.of(load['list'].rates).show('req/s', 1, 0)} "
        f"({Figure.of(load['list'].cpus).show('us', 1e6, 0)} CPU/req) vs bare "
        f"{Figure.of(p99s[1]).show('ms', 1e3, 1)} at {Figure.of(load['bare'].rates).show('req/s', 1, 0)}, "
        f"ratio {ratio.show('x')}",
        f"<= {P99_TARGET}x bare",
        ratio.median <= P99_TARGET,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(serve(Path(sys.argv[2])))
    else:
        main()
