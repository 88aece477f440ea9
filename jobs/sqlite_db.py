"""A SQLite connection driven from asyncio: one thread, one connection, whole units of work.

Each unit of work is a plain function run on the connection's own thread, so a
transaction never interleaves with another coroutine's statements and the event
loop never blocks on disk. Writes take the write lock up front (BEGIN IMMEDIATE)
so several processes sharing a file queue up instead of failing to upgrade.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self, TypeVar

from jobs.errors import InvalidJobError, JobError, StoreUnavailableError

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000


class SQLiteDatabase:
    """One WAL-mode SQLite connection with its own thread."""

    def __init__(self, path: Path, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._executor = executor

    @classmethod
    async def open(cls, path: str | Path, schema: str) -> Self:
        """Open (creating if needed) the file at path and apply schema (idempotent DDL)."""
        path = Path(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.stem}")
        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, _connect, path, schema)
        except (sqlite3.Error, OSError) as exc:
            executor.shutdown(wait=False)
            raise StoreUnavailableError(f"cannot open {path}: {exc}") from exc
        return cls(path, conn, executor)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(connection, *args) on its thread; SQLite's errors become typed job errors.

        StoreUnavailableError when the database cannot serve now, InvalidJobError when a value
        can never be stored (see _typed_error); the transaction is rolled back either way.
        """
        conn = self._conn
        if conn is None:
            raise StoreUnavailableError(f"{self.path} is closed")

        def call() -> T:
            try:
                return fn(conn, *args)
            except (sqlite3.Error, OverflowError, UnicodeEncodeError) as exc:
                raise _typed_error(exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        """Close the connection and stop its thread."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
            self._executor.shutdown(wait=True)


def _typed_error(exc: Exception) -> JobError:
    """Which side of a failed call is at fault: the store (unavailable) or the value (invalid).

    The difference decides what callers do. An unavailable store is retried: the API answers 503
    and the worker's tracker buffers the write and replays it. A value the store can never hold
    must not be retried, or a buffered write would block every later write of its job and the
    replay forever; it is refused at once as InvalidJobError (the API answers 400).

    - unavailable: OperationalError (locked or busy past the busy timeout, disk full or I/O
      error, read-only or missing file), InternalError, and plain DatabaseError ("file is not
      a database", corruption): conditions of the file or the machine, which an operator or
      time can fix while the same call stays valid.
    - invalid: OverflowError (an integer beyond SQLite's 64 bits), UnicodeEncodeError (a string
      with an unpaired surrogate, which UTF-8 cannot carry), InterfaceError and
      ProgrammingError (a value of a type SQLite cannot bind), DataError, and IntegrityError (a
      constraint the value breaks): the same call would fail the same way every time.
    """
    if isinstance(exc, OverflowError | UnicodeEncodeError):
        return InvalidJobError(f"a value cannot be stored: {exc}")
    if isinstance(exc, sqlite3.InterfaceError | sqlite3.ProgrammingError | sqlite3.DataError | sqlite3.IntegrityError):
        return InvalidJobError(f"sqlite refused a value: {exc}")
    return StoreUnavailableError(f"sqlite: {exc}")


def _connect(path: Path, schema: str) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    _enable_wal(conn)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(schema)
    return conn


def _enable_wal(conn: sqlite3.Connection) -> None:
    # Switching a fresh file to WAL fails at once with SQLITE_BUSY when another process is
    # doing the same; the busy timeout does not cover it, so retry with a short backoff.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception; nested use joins the outer one."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
