"""The worker's liveness signal: a file the consume loop touches, and the check a probe runs on it.

The worker serves no port, so a Kubernetes liveness probe cannot ask it anything. Instead the consume
loop touches a file on every turn (at least once per receive wait, busy or idle, and while it drains)
and `python -m worker.heartbeat --max-age SECONDS FILE` exits 1 once the file is older than that: a
hung receive call or a blocked event loop stops the beat. Only the standard library is imported here,
so the probe starts in milliseconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)
# One touch a second is plenty for an age measured in tens of seconds, and keeps a busy loop's syscalls few.
MIN_INTERVAL = 1.0


class Heartbeat:
    """Touches a file at most once per MIN_INTERVAL; a disabled heartbeat (no path) does nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._last = float("-inf")
        self._warned = False

    def beat(self) -> None:
        """Mark the loop alive now; a file that cannot be written is logged once, never raised."""
        if self.path is None or time.monotonic() - self._last < MIN_INTERVAL:
            return
        self._last = time.monotonic()
        try:
            self.path.touch()
        except OSError as exc:
            # The liveness probe fails and restarts the container; this line says why.
            if not self._warned:
                log.error("cannot touch the heartbeat file %s: %s", self.path, exc)
                self._warned = True
        else:
            self._warned = False


def age(path: Path, now: float | None = None) -> float | None:
    """Seconds since the file was last touched, or None when it does not exist."""
    try:
        modified = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - modified


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when the heartbeat file is fresher than --max-age, else print why and exit 1."""
    parser = argparse.ArgumentParser(prog="python -m worker.heartbeat", description=main.__doc__)
    parser.add_argument("--max-age", type=float, required=True, help="seconds the file may go untouched")
    parser.add_argument("file", type=Path, help="the worker's heartbeat file (EMBEDDING_JOBS_HEARTBEAT_FILE)")
    args = parser.parse_args(argv)
    seconds = age(args.file)
    if seconds is None:
        print(f"no heartbeat: {args.file} does not exist (has the consume loop started?)", file=sys.stderr)
        return 1
    if seconds > args.max_age:
        print(f"stale heartbeat: {args.file} untouched for {seconds:.1f}s (limit {args.max_age:g}s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
