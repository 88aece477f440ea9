"""The status page: served under a strict CSP, and rendered by real headless Chromium against the real app.

The browser tests start the whole exporter on a port, point Chromium at `/`, let the page's script
call the overview API, and read the DOM Chromium dumps after it ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientWebSocketResponse, web
from aiohttp.typedefs import Handler
from pytest_aiohttp import AiohttpClient, AiohttpServer

from exporter.app import create_app
from exporter.errors import error_response
from exporter.status_page import CONTENT_SECURITY_POLICY, STATIC_FILES, load_assets
from jobs.model import Job, JobStatus
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from tests.components import require_binary

S = JobStatus
TOKEN = "status-page-test-token-0001"
# Markup in an error must reach the page as text: the assertions look for the literal characters
# and for the absence of a <b> element.
HOSTILE_ERROR = "<b>shard text</b> not found & gave up"
RATE_LIMITED = "embedding endpoint answered 429: rate limited"

# Jobs per tenant and final status; failed and dead-lettered ones are seeded separately with errors.
SEED: dict[str, dict[JobStatus, int]] = {
    "acme": {S.PENDING: 2, S.PROCESSING: 1, S.COMPLETED: 12},
    "globex": {S.COMPLETED: 6},
    "initech": {S.PENDING: 1, S.COMPLETED: 18},
}
FAILURES: list[tuple[str, str, JobStatus, int, str]] = [
    # tenant, job id, status, retry count, error
    ("globex", "globex-fail-1", S.FAILED, 1, RATE_LIMITED),
    ("globex", "globex-dead-1", S.DEAD_LETTERED, 3, HOSTILE_ERROR),
    ("initech", "initech-fail-1", S.FAILED, 2, RATE_LIMITED),
]
# Cells of each tenant row as the page shows them: pending, processing, completed, failed,
# dead-lettered, total, failure ratio ((failed + dead-lettered) / finished).
EXPECTED_ROWS = {
    "acme": ["2", "1", "12", "0", "0", "15", "0%"],
    "globex": ["0", "0", "6", "1", "1", "8", "25.0%"],
    "initech": ["1", "0", "18", "1", "0", "20", "5.3%"],
}
EXPECTED_TOTALS = ["3", "1", "36", "2", "1", "43", "7.7%"]

# Headless, offline and quiet: no first-run UI, no background fetches to Google, no QUIC.
# --disable-dev-shm-usage because containers often give /dev/shm only 64 MB.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--hide-scrollbars",
)
CHROMIUM_TIMEOUT = 40.0


# ---- fixtures ---------------------------------------------------------------------------------


async def _add_job(
    store: SQLiteJobStore,
    tenant: str,
    job_id: str,
    status: JobStatus,
    *,
    error: str | None = None,
    retry_count: int | None = None,
) -> None:
    """Create a job and walk it through legal transitions to status."""
    job = Job.new(job_id=job_id, tenant_id=tenant, shard_id=f"shard-{job_id}", shard_type_id="document")
    await store.create(job)
    if status is S.PENDING:
        return
    await store.transition(tenant, job_id, S.PENDING, S.PROCESSING)
    if status is not S.PROCESSING:
        await store.transition(tenant, job_id, S.PROCESSING, status, error=error, retry_count=retry_count)


@pytest.fixture
async def seeded_store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    """A SQLite job store holding SEED and FAILURES."""
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        for tenant, counts in SEED.items():
            for status, n in counts.items():
                for i in range(n):
                    await _add_job(store, tenant, f"{tenant}-{status.value}-{i}", status)
        for tenant, job_id, status, retries, error in FAILURES:
            await _add_job(store, tenant, job_id, status, error=error, retry_count=retries)
        yield store
    finally:
        await store.close()


@pytest.fixture
def chromium() -> str:
    """Path of the Chromium binary (skips locally, fails under CI=true when missing)."""
    return require_binary("chromium", "apt-get install chromium")


def _settings(tmp_path: Path, **changes: object) -> Settings:
    return Settings(data_dir=tmp_path).with_changes(**changes)


# ---- a small DOM for assertions ---------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    """An element of the dumped DOM: tag, attributes and children (text as plain strings)."""

    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        """textContent, whitespace collapsed."""
        parts = [c if isinstance(c, str) else c.text() for c in self.children]
        return " ".join("".join(parts).split())

    def iter(self) -> Iterator[Node]:
        """This node and every element below it, in document order."""
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find_all(self, tag: str) -> list[Node]:
        """Every element below with that tag."""
        return [n for n in self.iter() if n.tag == tag]

    def by_id(self, element_id: str) -> Node:
        """The element with that id (AssertionError when absent)."""
        for n in self.iter():
            if n.attrs.get("id") == element_id:
                return n
        raise AssertionError(f"no element with id {element_id!r}")


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self._stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self._stack[-1].children.append(node)
        if tag not in _VOID:
            self._stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._stack) - 1, 0, -1):
            if self._stack[depth].tag == tag:
                del self._stack[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._stack[-1].children.append(data)


def parse_dom(html: str) -> Node:
    """The element tree of an HTML document."""
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def table_rows(dom: Node, tbody_id: str) -> list[list[str]]:
    """The cell texts of each row under the element with that id."""
    return [
        [cell.text() for cell in row.children if isinstance(cell, Node)] for row in dom.by_id(tbody_id).find_all("tr")
    ]


# ---- driving Chromium -------------------------------------------------------------------------


async def run_chromium(chromium: str, profile: Path, *args: str) -> str:
    """Run headless Chromium to completion with args; its stdout (the dumped DOM, if asked for)."""
    # A session of its own, so a hung browser can be stopped with every helper process it started.
    process = await asyncio.create_subprocess_exec(
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(CHROMIUM_TIMEOUT):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.communicate()
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout.decode()


async def render_page(chromium: str, tmp_path: Path, url: str) -> Node:
    """The DOM of url after its script had five seconds of (virtual) time."""
    html = await run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", url)
    return parse_dom(html)


class DevTools:
    """A minimal Chrome DevTools Protocol client over one browser websocket (flattened sessions)."""

    def __init__(self, ws: ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    async def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        """Run one command and return its result; events read meanwhile are kept for wait_event."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_json(message)
        while True:
            answer = await self._ws.receive_json()
            if answer.get("id") == self._next_id:
                assert "error" not in answer, answer["error"]
                return answer["result"]
            self._events.append(answer)

    async def wait_event(self, method: str) -> dict[str, Any]:
        """The first event named method, read or already received."""
        while True:
            for event in self._events:
                if event.get("method") == method:
                    self._events.remove(event)
                    return event
            self._events.append(await self._ws.receive_json())


async def devtools_url(stderr: asyncio.StreamReader) -> str:
    """The browser websocket Chromium announces on stderr once it listens."""
    while line := await stderr.readline():
        if found := re.search(rb"DevTools listening on (ws://\S+)", line):
            return found.group(1).decode()
    raise AssertionError("Chromium exited before it opened DevTools")


# Runs in the page: wait for the token prompt, enter the token as a user would, then wait for
# the data. MutationObserver rather than polling, so nothing waits longer than the page does.
SIGN_IN_SCRIPT = """
(async () => {
  const until = (check) => new Promise((resolve) => {
    if (check()) { resolve(); return; }
    const observer = new MutationObserver(() => { if (check()) { observer.disconnect(); resolve(); } });
    observer.observe(document.body, { subtree: true, childList: true, attributes: true });
  });
  const form = document.getElementById("token-form");
  await until(() => !form.hidden);
  document.getElementById("token").value = TOKEN;
  form.requestSubmit();
  await until(() => document.querySelector("#tenant-rows tr[data-tenant]"));
  return {
    tenants: [...document.querySelectorAll("#tenant-rows tr[data-tenant]")].map((row) => row.dataset.tenant),
    stored: sessionStorage.getItem("embedding-jobs.api-token"),
    formHidden: form.hidden,
    bannerHidden: document.getElementById("banner").hidden,
  };
})()
"""


# ---- served files -----------------------------------------------------------------------------


async def test_root_serves_the_page_with_strict_security_headers(
    aiohttp_client: AiohttpClient, seeded_store: SQLiteJobStore, tmp_path: Path
) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path), seeded_store))
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert response.charset == "utf-8"
    csp = response.headers["Content-Security-Policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert csp.startswith("default-src 'self'")
    assert "unsafe" not in csp
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    body = await response.text()
    assert '<script src="static/status.js" defer></script>' in body
    assert '<link rel="stylesheet" href="static/status.css">' in body


@pytest.mark.parametrize(("name", "content_type"), sorted(STATIC_FILES.items()))
async def test_static_files_are_served_with_their_content_type(
    aiohttp_client: AiohttpClient, seeded_store: SQLiteJobStore, tmp_path: Path, name: str, content_type: str
) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path), seeded_store))
    response = await client.get(f"/static/{name}")
    assert response.status == 200
    assert response.content_type == content_type
    assert response.charset == "utf-8"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert await response.read() == load_assets()[name].body


@pytest.mark.parametrize("path", ["/static/missing.js", "/static/status.html", "/static/", "/static/%2E%2E%2Fapp.py"])
async def test_unknown_static_path_is_not_found(
    aiohttp_client: AiohttpClient, seeded_store: SQLiteJobStore, tmp_path: Path, path: str
) -> None:
    client = await aiohttp_client(create_app(_settings(tmp_path), seeded_store))
    response = await client.get(path)
    assert response.status == 404


def test_page_files_need_nothing_the_csp_forbids() -> None:
    assets = load_assets()
    page = parse_dom(assets["status.html"].body.decode())
    assert all(script.attrs.get("src") for script in page.find_all("script")), "inline script"
    assert not page.find_all("style"), "inline stylesheet"
    assert not [n.tag for n in page.iter() if "style" in n.attrs or any(a.startswith("on") for a in n.attrs)]
    for name, asset in assets.items():
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", asset.body), f"{name} refers to another origin"
    assert b"innerHTML" not in assets["status.js"].body


# ---- in the browser ---------------------------------------------------------------------------


async def test_browser_shows_each_tenants_counts_ratio_and_recent_failures(
    aiohttp_server: AiohttpServer, seeded_store: SQLiteJobStore, chromium: str, tmp_path: Path
) -> None:
    server = await aiohttp_server(create_app(_settings(tmp_path), seeded_store))
    dom = await render_page(chromium, tmp_path, str(server.make_url("/")))

    assert dom.by_id("banner").attrs.get("hidden") is not None, dom.by_id("banner").text()
    rows = {row[0]: row[1:] for row in table_rows(dom, "tenant-rows")}
    assert rows == EXPECTED_ROWS
    assert table_rows(dom, "tenant-totals") == [["All tenants", *EXPECTED_TOTALS]]
    levels = {
        tr.attrs["data-tenant"]: tr.find_all("td")[-1].attrs["class"] for tr in dom.by_id("tenant-rows").find_all("tr")
    }
    assert levels == {
        "acme": "ratio-col ratio-ok",
        "globex": "ratio-col ratio-critical",
        "initech": "ratio-col ratio-warn",
    }

    failures = {row[1]: row for row in table_rows(dom, "failure-rows")}
    assert set(failures) == {job_id for _, job_id, *_ in FAILURES}
    tenant, job_id, _, status, retries, error, updated = failures["globex-dead-1"]
    assert (tenant, job_id, status, retries) == ("globex", "globex-dead-1", "dead-lettered", "3")
    dead_row = next(tr for tr in dom.by_id("failure-rows").find_all("tr") if tr.attrs["data-job"] == "globex-dead-1")
    shard_cell = dead_row.find_all("td")[2]
    assert shard_cell.children[0] == "shard-globex-dead-1"
    assert shard_cell.find_all("span")[0].text() == "document"  # the shard type, under the shard id
    assert error == HOSTILE_ERROR
    assert not dom.find_all("b"), "error text was rendered as markup"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", updated)
    assert failures["initech-fail-1"][5] == RATE_LIMITED

    assert re.fullmatch(r"Last updated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", dom.by_id("last-updated").text())
    assert dom.by_id("refresh-note").text() == "Refreshes every 5 s"
    assert dom.by_id("token-form").attrs.get("hidden") is not None


async def test_browser_asks_for_a_token_when_the_api_requires_one(
    aiohttp_server: AiohttpServer, seeded_store: SQLiteJobStore, chromium: str, tmp_path: Path
) -> None:
    server = await aiohttp_server(create_app(_settings(tmp_path, api_tokens=f"{TOKEN}=*"), seeded_store))
    dom = await render_page(chromium, tmp_path, str(server.make_url("/")))

    form = dom.by_id("token-form")
    assert form.attrs.get("hidden") is None
    token_input = dom.by_id("token")
    assert token_input.tag == "input"
    assert token_input.attrs["type"] == "password"
    assert dom.by_id("banner").attrs.get("hidden") is None
    assert "API token" in dom.by_id("banner").text()
    assert dom.by_id("banner").attrs["class"] == "banner banner-info"  # a prompt, not a failure
    assert not dom.by_id("tenant-rows").find_all("th"), "tenant data shown without a token"


async def test_browser_keeps_the_entered_token_for_the_tab_and_sends_it_as_bearer(
    aiohttp_server: AiohttpServer, seeded_store: SQLiteJobStore, chromium: str, tmp_path: Path
) -> None:
    seen: list[str | None] = []

    @web.middleware
    async def record_authorization(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/api/v1/overview":
            seen.append(request.headers.get("Authorization"))
        return await handler(request)

    app = create_app(_settings(tmp_path, api_tokens=f"{TOKEN}=globex,initech"), seeded_store)
    app.middlewares.append(record_authorization)
    server = await aiohttp_server(app)
    process = await asyncio.create_subprocess_exec(
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stderr is not None
    drain: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(CHROMIUM_TIMEOUT):
            url = await devtools_url(process.stderr)
            # Chromium blocks once a full stderr pipe is left unread.
            drain = asyncio.create_task(process.stderr.read())
            async with ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
                cdp = DevTools(ws)
                targets = await cdp.send("Target.getTargets")
                page = next(t["targetId"] for t in targets["targetInfos"] if t["type"] == "page")
                session = (await cdp.send("Target.attachToTarget", {"targetId": page, "flatten": True}))["sessionId"]
                await cdp.send("Page.enable", session=session)
                await cdp.send("Page.navigate", {"url": str(server.make_url("/"))}, session=session)
                await cdp.wait_event("Page.loadEventFired")
                script = SIGN_IN_SCRIPT.replace("TOKEN", json.dumps(TOKEN))
                evaluated = await cdp.send(
                    "Runtime.evaluate",
                    {"expression": script, "awaitPromise": True, "returnByValue": True},
                    session=session,
                )
                await cdp.send("Browser.close")
            await process.wait()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        if drain is not None:
            await drain

    assert evaluated["result"]["value"] == {
        "tenants": ["globex", "initech"],  # only the tenants this token may read
        "stored": TOKEN,
        "formHidden": True,
        "bannerHidden": True,
    }
    assert seen[0] is None
    assert f"Bearer {TOKEN}" in seen


async def test_browser_keeps_the_last_data_and_shows_a_banner_when_the_api_fails(
    aiohttp_server: AiohttpServer, seeded_store: SQLiteJobStore, chromium: str, tmp_path: Path
) -> None:
    served: list[int] = []

    @web.middleware
    async def fail_after_first_overview(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The first overview goes through; every later one meets a store outage.
        if request.path == "/api/v1/overview":
            served.append(1)
            if len(served) > 1:
                return error_response(503, "store_unavailable", "job store not reachable")
        return await handler(request)

    app = create_app(_settings(tmp_path), seeded_store)
    app.middlewares.append(fail_after_first_overview)
    server = await aiohttp_server(app)
    dom = await render_page(chromium, tmp_path, str(server.make_url("/?refresh=1")))

    assert len(served) >= 2, "the page did not refresh"
    assert dom.by_id("refresh-note").text() == "Refreshes every 1 s"
    banner = dom.by_id("banner")
    assert banner.attrs.get("hidden") is None
    assert banner.attrs["aria-live"] == "assertive"
    assert banner.text() == (
        "Could not load the job overview: HTTP 503: job store not reachable. Showing the last data received."
    )
    assert {row[0]: row[1:] for row in table_rows(dom, "tenant-rows")} == EXPECTED_ROWS
    assert "stale" in (dom.by_id("last-updated").attrs.get("class") or "").split()


async def test_browser_screenshot_of_the_page_is_rendered(
    aiohttp_server: AiohttpServer, seeded_store: SQLiteJobStore, chromium: str, tmp_path: Path
) -> None:
    server = await aiohttp_server(create_app(_settings(tmp_path), seeded_store))
    screenshot = tmp_path / "status-page.png"
    await run_chromium(
        chromium,
        tmp_path / "profile",
        "--virtual-time-budget=5000",
        f"--screenshot={screenshot}",
        "--window-size=1200,800",
        str(server.make_url("/")),
    )
    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert int.from_bytes(png[16:20], "big") == 1200  # IHDR width
    # A blank or unstyled page compresses to a few kilobytes; tables, bars and text need more.
    assert len(png) > 20_000, f"{len(png)} bytes"
