"""Run the Cosmos DB test server (launcher.js) as a subprocess and connect the async SDK to it.

The server is `@vercel/cosmosdb-server` pinned in package.json next to this file, started by
launcher.js, which fixes the stock gaps the job store depends on (see its header comment).
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

from azure.cosmos.aio import CosmosClient

SERVER_DIR: Final = Path(__file__).resolve().parent
LAUNCHER: Final = SERVER_DIR / "launcher.js"
SERVER_PACKAGE_JSON: Final = SERVER_DIR / "node_modules" / "@vercel" / "cosmosdb-server" / "package.json"
PINNED_VERSION: Final = "1.0.1"
READY_PREFIX: Final = "cosmos-server ready "

# The Cosmos DB emulator's published account key; the server accepts any key, but the SDK
# base64-decodes it, so it has to be a well-formed one.
EMULATOR_KEY: Final = "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="

NPM_CI_TIMEOUT: Final = 300.0


class CosmosServerUnavailable(RuntimeError):
    """Node.js, npm or the server's npm packages cannot be had: a missing component, not a bug."""


@dataclass(frozen=True, slots=True)
class RequestCounts:
    """Requests received for one database: in all, and by kind ("batch", "read", "query", ...)."""

    total: int
    kinds: dict[str, int]

    def __sub__(self, earlier: RequestCounts) -> RequestCounts:
        kinds = {kind: n - earlier.kinds.get(kind, 0) for kind, n in self.kinds.items()}
        return RequestCounts(self.total - earlier.total, {kind: n for kind, n in kinds.items() if n})


class CosmosServer:
    """A running launcher.js process; stop() it, or use it as a context manager."""

    def __init__(self, process: subprocess.Popen[str], endpoint: str, log: IO[str], startup_seconds: float):
        self.process = process
        self.endpoint = endpoint
        self.key = EMULATOR_KEY
        self.startup_seconds = startup_seconds
        self._log = log

    def set_fault(self, collection: str, mode: str | None) -> None:
        """Make requests to one container hang ("hang") or answer 503 ("fail"); None clears it.

        Requests held by a hang are served once it is cleared, as after a network stall.
        """
        body = json.dumps({"collection": collection, "mode": mode}).encode()
        request = urllib.request.Request(self.endpoint.rstrip("/") + "/_faults", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()

    def requests(self, database: str) -> RequestCounts:
        """How many requests the server has received for database so far (faulted ones included)."""
        url = f"{self.endpoint.rstrip('/')}/_requests?{urllib.parse.urlencode({'db': database})}"
        with urllib.request.urlopen(url, timeout=5) as response:
            data = json.loads(response.read())
        return RequestCounts(total=int(data["total"]), kinds={str(k): int(v) for k, v in data["kinds"].items()})

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers) and drop its log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _installed_version() -> str | None:
    try:
        text = SERVER_PACKAGE_JSON.read_text()
    except FileNotFoundError:
        return None
    version = json.loads(text).get("version")
    return version if isinstance(version, str) else None


def ensure_installed() -> None:
    """Run `npm ci` in the server folder unless the pinned server version is already installed."""
    if _installed_version() == PINNED_VERSION:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise CosmosServerUnavailable(
            f"npm not found on PATH, needed to install the Cosmos DB test server in {SERVER_DIR}"
        )
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=SERVER_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CosmosServerUnavailable(f"npm ci in {SERVER_DIR} took longer than {NPM_CI_TIMEOUT}s") from exc
    if done.returncode != 0:
        raise CosmosServerUnavailable(f"npm ci in {SERVER_DIR} failed:\n{done.stderr[-2000:]}")


def start_cosmos_server(*, port: int = 0, timeout: float = 30.0) -> CosmosServer:
    """Start launcher.js on 127.0.0.1 and return once it accepts requests.

    port=0 lets the server pick a free port itself, which avoids racing another process
    for one picked in advance. Raises CosmosServerUnavailable when node/npm are missing.
    """
    node = shutil.which("node")
    if node is None:
        raise CosmosServerUnavailable("node (Node.js 20+) not found on PATH, needed for the Cosmos DB test server")
    ensure_installed()
    # A file, not a pipe, so a chatty server can never block on a full pipe nobody reads.
    log = tempfile.TemporaryFile(mode="w+", prefix="cosmos-server-", suffix=".log")  # noqa: SIM115
    started = time.monotonic()
    # stdin stays an open pipe: the launcher exits when it closes, i.e. when this process dies.
    process = subprocess.Popen(
        [node, str(LAUNCHER), "--port", str(port), "--exit-on-stdin-close"],
        cwd=SERVER_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        line = _first_line(process, timeout)
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"Cosmos DB test server did not start: {line!r}\n{_tail(log)}")
    except BaseException:
        process.kill()
        process.wait()
        log.close()
        raise
    return CosmosServer(process, line.removeprefix(READY_PREFIX).strip(), log, time.monotonic() - started)


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first stdout line of process, waiting at most timeout seconds for it."""
    assert process.stdout is not None
    stdout = process.stdout
    lines: queue.Queue[str] = queue.Queue()
    # A thread, because a blocking readline has no timeout of its own.
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"Cosmos DB test server printed no ready line within {timeout}s") from None


def _tail(log: IO[str], chars: int = 2000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-chars:]


def cosmos_client(server: CosmosServer, **kwargs: Any) -> CosmosClient:
    """An async CosmosClient for server with the SDK's default options; kwargs go to CosmosClient.

    Plain http needs no TLS options, and the server advertises its http endpoint, so endpoint
    discovery can stay on: a client built the way production code builds one works as is.
    """
    return CosmosClient(server.endpoint, credential=server.key, **kwargs)


@dataclass(frozen=True, slots=True)
class CosmosDatabase:
    """A client and the name of a database that only the current test uses."""

    server: CosmosServer
    client: CosmosClient
    name: str


@contextlib.asynccontextmanager
async def cosmos_database(server: CosmosServer) -> AsyncIterator[CosmosDatabase]:
    """A client and a fresh database name (created by whoever needs it); the database is dropped on exit.

    A plain context manager rather than a fixture, so that fixtures which choose a backend at run
    time can open one: an async fixture cannot look up another async fixture from inside its loop.
    """
    async with cosmos_client(server) as client:
        name = f"test-{uuid.uuid4().hex}"
        try:
            yield CosmosDatabase(server, client, name)
        finally:
            if name in [db["id"] async for db in client.list_databases()]:
                await client.delete_database(name)
