"""Finding the real components tests need: skip locally when one is missing, fail in CI."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True when running under CI, where a missing component is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(reason: str) -> NoReturn:
    """Skip the test with the reason, or fail it under CI=true."""
    if in_ci():
        pytest.fail(f"required component missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str, hint: str) -> str:
    """Path of an executable on PATH, or skip/fail with a hint on how to get it."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} not found on PATH ({hint})")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _timed_out(what: str, within: float, detail: Callable[[], str] | None) -> TimeoutError:
    message = f"timed out after {within}s waiting for {what}"
    return TimeoutError(f"{message}: {detail()}" if detail is not None else message)


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.02,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll condition until it is true or the deadline passes (then raise TimeoutError).

    detail, when given, is called at the deadline and its text added to the error: the last value
    seen, a log tail, what has arrived so far.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout, detail)
        time.sleep(interval)


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool],
    what: str,
    within: float = 15.0,
    interval: float = 0.02,
    detail: Callable[[], str] | None = None,
) -> None:
    """Check condition (plain or awaitable) until it is true or the deadline passes (then raise TimeoutError).

    detail, when given, is called at the deadline and its text added to the error.
    """
    deadline = time.monotonic() + within
    while True:
        met = condition()
        if met if isinstance(met, bool) else await met:
            return
        if time.monotonic() > deadline:
            raise _timed_out(what, within, detail)
        await asyncio.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
