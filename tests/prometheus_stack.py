"""Real Prometheus and Alertmanager processes on loopback, and a webhook receiver for their alerts.

Each starts on a free 127.0.0.1 port with its storage in a temporary folder, is waited on
through `/-/ready` with a deadline, and is stopped (SIGTERM, then SIGKILL) when its context
exits. Evaluation, scrape and grouping intervals are one second so alerts travel from a
metric to the webhook in seconds. A missing binary skips the test locally and fails it under
CI=true (see tests/components.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from alerts.yamltext import dump
from tests.components import free_port, require_binary, wait_for

INSTALL_HINT = "run scripts/install-test-deps, or apt-get install --no-install-recommends prometheus"
ALERTMANAGER_HINT = "run scripts/install-test-deps, or apt-get install --no-install-recommends prometheus-alertmanager"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 5.0


def get_json(url: str, params: Mapping[str, str] | None = None) -> Any:
    """GET url (with query params) and decode its JSON body."""
    if params:
        url = f"{url}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        # Prometheus explains a bad query in the body of its 400/422 answer.
        with exc:
            detail = exc.read().decode(errors="replace")
        raise AssertionError(f"GET {url}: HTTP {exc.code}: {detail}") from None


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Process:
    """A started binary, its log file, and how to stop it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process' log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        """True while running; raises with the log's tail once the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with code {code}:\n{self.log_tail()}")
        return True

    def wait_ready(self, url: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until url answers 200, failing early (with the log) if the process dies."""
        try:
            wait_for(lambda: self.alive() and _answers(url), timeout, f"{self.name} at {url}", interval=0.05)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def started(
    name: str, argv: Sequence[str], log_path: Path, *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> Iterator[Process]:
    """Run argv with output to log_path; stop it on exit."""
    with log_path.open("wb") as log:
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    process = Process(name, popen, log_path)
    try:
        yield process
    finally:
        process.stop()


@dataclass
class Prometheus:
    """A running Prometheus and its HTTP API."""

    url: str
    process: Process

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query at the current time (a list of series)."""
        body = get_json(f"{self.url}/api/v1/query", {"query": expr})
        if body.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def exemplars(self, expr: str, since: float) -> list[dict[str, Any]]:
        """Exemplars of the series selected by expr, from since until now."""
        body = get_json(
            f"{self.url}/api/v1/query_exemplars", {"query": expr, "start": f"{since:.3f}", "end": f"{time.time():.3f}"}
        )
        result: list[dict[str, Any]] = body["data"]
        return result


@contextlib.contextmanager
def running_prometheus(
    workdir: Path,
    *,
    job: str,
    targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    alertmanager: str | None = None,
) -> Iterator[Prometheus]:
    """Prometheus scraping targets (host:port) as job every second and evaluating rule_files every second."""
    binary = require_binary("prometheus", INSTALL_HINT)
    workdir.mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {
        # scrape_timeout defaults to 10 s and must not exceed the interval.
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }
    if alertmanager is not None:
        host = urllib.parse.urlsplit(alertmanager).netloc
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [host]}]}]}
    config_path = workdir / "prometheus.yml"
    config_path.write_text(dump(config), encoding="utf-8")
    address = f"127.0.0.1:{free_port()}"
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={address}",
        # Without it Prometheus drops the exemplars (trace ids) the exporter writes.
        "--enable-feature=exemplar-storage",
    ]
    with started("prometheus", argv, workdir / "prometheus.log", cwd=workdir) as process:
        url = f"http://{address}"
        process.wait_ready(f"{url}/-/ready")
        yield Prometheus(url, process)


@dataclass
class Alertmanager:
    """A running Alertmanager."""

    url: str
    process: Process


@contextlib.contextmanager
def running_alertmanager(
    workdir: Path, *, webhook_url: str, group_by: Sequence[str] = ("alertname", "tenant")
) -> Iterator[Alertmanager]:
    """Alertmanager sending every alert group to webhook_url within about a second, resolved ones too."""
    binary = require_binary("prometheus-alertmanager", ALERTMANAGER_HINT)
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "route": {
            "receiver": "webhook",
            "group_by": list(group_by),
            "group_wait": "1s",
            "group_interval": "1s",
            # One notification per state change is all a test wants.
            "repeat_interval": "24h",
        },
        "receivers": [{"name": "webhook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }
    config_path = workdir / "alertmanager.yml"
    config_path.write_text(dump(config), encoding="utf-8")
    address = f"127.0.0.1:{free_port()}"
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address={address}",
        # An empty address turns clustering (gossip on 0.0.0.0:9094) off.
        "--cluster.listen-address=",
    ]
    with started("alertmanager", argv, workdir / "alertmanager.log", cwd=workdir) as process:
        url = f"http://{address}"
        process.wait_ready(f"{url}/-/ready")
        yield Alertmanager(url, process)


@contextlib.contextmanager
def serve_in_thread(app: web.Application) -> Iterator[str]:
    """Serve app on a free loopback port from a background thread; yield its base URL.

    Tests that wait synchronously (wait_for) would block an event loop they share with the
    server, so the server gets a loop of its own.
    """
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    ready = threading.Event()
    address: list[str] = []
    failure: list[BaseException] = []

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        address.append(f"http://{host}:{port}")

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.run_until_complete(loop.shutdown_asyncgens())

    thread = threading.Thread(target=run, name="test-http-server", daemon=True)
    thread.start()
    try:
        if not ready.wait(READY_TIMEOUT) or failure:
            raise RuntimeError(f"test HTTP server did not start: {failure}")
        yield address[0]
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
        loop.close()


@dataclass
class WebhookReceiver:
    """Collects Alertmanager's webhook notifications (the JSON payloads, in arrival order)."""

    notifications: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> web.Application:
        """An aiohttp app taking POST /alerts."""
        app = web.Application()
        app.router.add_post("/alerts", self._receive)
        return app

    async def _receive(self, request: web.Request) -> web.Response:
        payload = await request.json()
        with self._lock:
            self.notifications.append(payload)
        return web.json_response({"status": "ok"})

    def find(self, status: str, **labels: str) -> dict[str, Any] | None:
        """The first alert with status ("firing" or "resolved") and labels, in a notification of that status."""
        with self._lock:
            notifications = list(self.notifications)
        for payload in notifications:
            if payload.get("status") != status:
                continue
            for alert in payload.get("alerts", []):
                if alert.get("status") == status and all(alert["labels"].get(k) == v for k, v in labels.items()):
                    found: dict[str, Any] = alert
                    return found
        return None

    def wait(self, status: str, timeout: float, **labels: str) -> dict[str, Any]:
        """Wait for find(status, **labels) to return an alert, or raise TimeoutError listing what did arrive."""
        try:
            wait_for(lambda: self.find(status, **labels) is not None, timeout, f"{status} alert {labels}", 0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; received: {self.summary()}") from None
        alert = self.find(status, **labels)
        assert alert is not None
        return alert

    def summary(self) -> list[str]:
        """One line per alert received so far, for failure messages."""
        with self._lock:
            return [
                f"{payload.get('status')}: {alert['labels']}"
                for payload in self.notifications
                for alert in payload.get("alerts", [])
            ]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_for with a coarser interval, for conditions that query Prometheus."""
    wait_for(condition, timeout, what, interval=0.25)
