"""The peer's management REST endpoint: HTTPS, serving queue runtime properties to the SDK.

``ServiceBusAdministrationClient`` reads a queue's runtime properties with
``GET /{queue}?api-version=...``. A stdlib HTTP server on its own thread answers from the
peer's live queue state, read through a callable that hops onto the reactor thread. One
request per connection (HTTP/1.0): no idle keep-alive connection outlives its response,
so stopping never waits on a client.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast
from urllib.parse import unquote, urlsplit

from tests.servicebus_peer import atom
from tests.servicebus_peer.store import QueueRuntime
from tests.servicebus_peer.tls import Certificate

_LOG = logging.getLogger(__name__)

Lookup = Callable[[str], QueueRuntime | None]

# Bounds how long one silent client can hold its handler thread (and so stop()).
CONNECTION_TIMEOUT = 10.0
# How often serve_forever checks for shutdown: stop() waits up to this long.
POLL_INTERVAL = 0.05


class _Server(ThreadingHTTPServer):
    # Handler threads are joined by server_close(), so a stopped server leaves none behind.
    daemon_threads = False
    block_on_close = True

    def __init__(
        self, address: tuple[str, int], context: ssl.SSLContext, lookup: Lookup, errors: list[BaseException]
    ) -> None:
        self.context = context
        self.lookup = lookup
        self.errors = errors
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS lookup that can stall; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        raw, address = super().get_request()
        # The handshake happens on the handler's thread, so a stalled client holds up only itself.
        return self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False), address

    def handle_error(self, request: socket.socket | tuple[bytes, socket.socket], client_address: object) -> None:
        # Lands here: clients that refuse the certificate, or hang up mid-request. Neither is a peer fault.
        _LOG.debug("management connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """Answers GET of a queue; anything else is outside what the peer serves."""

    server: _Server
    server_version = "servicebus-test-peer"
    timeout = CONNECTION_TIMEOUT

    def setup(self) -> None:
        tls = cast(ssl.SSLSocket, self.request)
        tls.settimeout(self.timeout)
        tls.do_handshake()
        super().setup()

    def do_GET(self) -> None:
        """Runtime properties of one queue, an empty feed if it does not exist."""
        try:
            self._get()
        except Exception as exc:  # a peer bug: answer now and surface it through the peer's errors
            _LOG.exception("test peer management request %s failed", self.path)
            self.server.errors.append(exc)
            self._reply(500, atom.ERROR_CONTENT_TYPE, atom.error(500, repr(exc)))

    def _get(self) -> None:
        # Any token will do, as on the AMQP side; a missing one means the client's credential
        # policy was not wired in, which the service would refuse too.
        if not self.headers.get("Authorization"):
            self._reply(401, atom.ERROR_CONTENT_TYPE, atom.error(401, "No authorization header was provided."))
            return
        path = urlsplit(self.path).path
        name = unquote(path).strip("/")
        if not name or "/" in name or name.startswith("$"):
            detail = f"The test peer serves GET /{{queue}} only, not GET {path}."
            self._reply(404, atom.ERROR_CONTENT_TYPE, atom.error(404, detail))
            return
        runtime = self.server.lookup(name)
        if runtime is None:
            self._reply(200, atom.FEED_CONTENT_TYPE, atom.empty_feed(time.time()))
            return
        host = self.headers.get("Host") or f"{self.server.server_name}:{self.server.server_port}"
        entry = atom.queue_entry(runtime, f"https://{host}{self.path}", namespace=host)
        self._reply(200, atom.ENTRY_CONTENT_TYPE, entry)

    def _unsupported(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        detail = f"The test peer does not serve {self.command} on the management API."
        self._reply(501, atom.ERROR_CONTENT_TYPE, atom.error(501, detail))

    do_PUT = do_POST = do_DELETE = _unsupported

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        _LOG.debug("management %s - %s", self.address_string(), format % args)


class ManagementServer:
    """The HTTPS management endpoint on a thread of its own."""

    def __init__(self, host: str, certificate: Certificate, lookup: Lookup, errors: list[BaseException]) -> None:
        self._server = _Server((host, 0), certificate.server_context(), lookup, errors)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port it listens on."""
        return self._server.server_port

    def start(self) -> None:
        """Serve on a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL_INTERVAL},
            name=f"servicebus-peer-management-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, finish requests in progress, close the socket."""
        if self._thread is not None:
            # shutdown() waits for serve_forever to notice, so only call it once that runs.
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
