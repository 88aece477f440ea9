"""The status page at `/`: one static HTML page, its script and its stylesheet, under a strict CSP.

The page has no build step and no server-side rendering; its script polls `/api/v1/overview`
with the caller's own token. So this module only serves three fixed files, read once.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from exporter.errors import error_response

PAGE = "status.html"
# Files under /static/ by name; nothing else in the folder is reachable, whatever the path.
STATIC_FILES: Mapping[str, str] = {
    "status.js": "text/javascript",
    "status.css": "text/css",
}

# Only this origin's script, stylesheet and API: no inline code, nothing from elsewhere, so
# markup that slipped into the page could neither run nor send data out.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        # The script handles the token form; a real submission would put the token in a URL.
        "form-action 'none'",
    )
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # Counts change every few seconds and a cached copy of the page could outlive a redeploy.
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One file of the page: its bytes and the media type it is served as."""

    body: bytes
    content_type: str


@functools.cache
def load_assets() -> Mapping[str, Asset]:
    """The page's files by name, read from the package once per process."""
    folder = resources.files("exporter") / "static"
    files = {PAGE: "text/html", **STATIC_FILES}
    return {name: Asset((folder / name).read_bytes(), content_type) for name, content_type in files.items()}


def _respond(asset: Asset) -> web.Response:
    return web.Response(
        body=asset.body,
        content_type=asset.content_type,
        charset="utf-8",
        headers=SECURITY_HEADERS,
    )


async def status_page(request: web.Request) -> web.Response:
    """The HTML page; the data arrives later, from the overview API."""
    return _respond(load_assets()[PAGE])


async def static_file(request: web.Request) -> web.Response:
    """The page's script or stylesheet; 404 for any other name."""
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        return error_response(404, "not_found", f"no static file {name!r}")
    return _respond(load_assets()[name])


def setup(app: web.Application) -> None:
    """Add `GET /` and `GET /static/{name}` to app (files are read here, so a broken install fails at start)."""
    load_assets()
    app.router.add_get("/", status_page)
    app.router.add_get("/static/{name}", static_file)
