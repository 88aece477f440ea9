"""Run the test peer as its own process: ``python -m tests.servicebus_peer --port N``.

Prints one ready line with the AMQP port, the HTTPS management port, the management
certificate (PEM) and the connection string once it accepts connections, then serves
until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from tests.servicebus_peer.peer import ServiceBusPeer

READY = "servicebus-peer ready"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, serve until told to stop."""
    parser = argparse.ArgumentParser(prog="python -m tests.servicebus_peer", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed when ready)")
    parser.add_argument("--lock-duration", type=float, default=30.0, help="seconds")
    parser.add_argument("--max-delivery-count", type=int, default=10)
    args = parser.parse_args(argv)

    stopping = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    with ServiceBusPeer(args.host, args.port, args.lock_duration, args.max_delivery_count) as peer:
        # The connection string comes last: it contains "=" itself, so readers take the rest of the line.
        print(
            f"{READY} port={peer.port} management_port={peer.management_port} "
            f"certificate={peer.certificate_path} connection_string={peer.connection_string}",
            flush=True,
        )
        stopping.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
