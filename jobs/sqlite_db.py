"""SQLite driven from asyncio: one connection and one thread per file and process, whole units of work.

Each unit of work is a plain function run on the connection's own thread, so a
transaction never interleaves with another coroutine's statements and the event
loop never blocks on disk. Writes take the write lock up front (BEGIN IMMEDIATE)
so several processes sharing a file queue up instead of failing to upgrade.

Everything in a process that opens the same file (the job store, the local queue,
the shard store, the lease) shares that one connection and thread. Units from all
of them then run one after another instead of contending for the file's write
lock from several connections, where SQLite's busy handler sleeps between tries.
The thread takes every unit queued when it wakes and hands their results back to
the event loop in one call, so concurrent jobs share one wakeup each way. When
another process holds the write lock past the busy timeout, the units queued behind
fail fast until a write gets through, rather than each waiting the timeout in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Self, TypeVar

from jobs.errors import InvalidJobError, JobError, StoreUnavailableError

T = TypeVar("T")
BUSY_TIMEOUT_MS = 10_000
# How long a unit waits for the write lock while another process is known to hold it.
HELD_BUSY_TIMEOUT_MS = 200


# A unit's future, its result, and the exception it raised instead.
_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


@dataclass(slots=True)
class _Unit:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


@dataclass(eq=False)
class _Connection:
    """One file's connection, the thread that owns it, and how many handles use it."""

    path: Path
    units: SimpleQueue[_Unit | None] = field(default_factory=SimpleQueue)
    conn: sqlite3.Connection | None = None
    handles: int = 0
    # True after a unit waited out the busy timeout, until a write succeeds (see _run_unit).
    held: bool = False

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._serve, name=f"sqlite-{self.path.stem}", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.units.put(_Unit(fn, args, loop, future))
        return future

    def stop(self) -> None:
        self.units.put(None)

    def _run_unit(self, unit: _Unit) -> _Outcome:
        conn = self.conn
        changes = conn.total_changes if conn is not None else 0
        try:
            result = unit.fn(*unit.args)
        except BaseException as exc:  # handed to the awaiting coroutine, whatever it is
            if conn is not None and not self.held and _is_busy(exc):
                # Another process has held the write lock for the whole busy timeout. The units
                # queued behind this one would each wait that long again, one after another on
                # this thread; until a write gets through, they wait briefly instead and fail
                # fast, as the callers' own bounded waits expect.
                self.held = True
                conn.execute(f"PRAGMA busy_timeout = {HELD_BUSY_TIMEOUT_MS}")
            return (unit.future, None, exc)
        if self.held and conn is not None and conn.total_changes != changes:
            self.held = False
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return (unit.future, result, None)

    def _serve(self) -> None:
        while True:
            batch = [self.units.get()]
            with contextlib.suppress(Empty):
                while True:
                    batch.append(self.units.get_nowait())
            done: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
            stopping = False
            for unit in batch:
                if unit is None:
                    stopping = True
                    continue
                done.setdefault(unit.loop, []).append(self._run_unit(unit))
            for loop, outcomes in done.items():
                with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody waits
                    loop.call_soon_threadsafe(_resolve, outcomes)
            if stopping:  # the last handle is gone: nothing can queue after the stop
                if self.conn is not None:
                    self.conn.close()
                    self.conn = None
                return


def _is_busy(exc: BaseException) -> bool:
    """Whether exc (or the SQLite error it wraps) is the write lock staying busy past the busy timeout."""
    cause = exc if isinstance(exc, sqlite3.Error) else exc.__cause__
    return isinstance(cause, sqlite3.OperationalError) and (cause.sqlite_errorname or "").startswith("SQLITE_BUSY")


def _resolve(outcomes: list[_Outcome]) -> None:
    for future, result, exc in outcomes:
        if future.done():  # the caller was cancelled; its unit ran all the same
            continue
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)


# The open connections of this process, by resolved file path.
_OPEN: dict[Path, _Connection] = {}
_OPEN_LOCK = threading.Lock()


class SQLiteDatabase:
    """A handle on the process's one WAL-mode connection (and thread) to a SQLite file."""

    def __init__(self, path: Path, shared: _Connection) -> None:
        self.path = path
        self._shared: _Connection | None = shared

    @classmethod
    async def open(cls, path: str | Path, schema: str) -> Self:
        """Open (creating if needed) the file at path and apply schema (idempotent DDL).

        The first handle on a file in this process connects; later ones share its connection
        and thread, adding their schema. The connection closes with its last handle.
        """
        path = Path(path)
        key = path.resolve()
        with _OPEN_LOCK:
            shared = _OPEN.get(key)
            fresh = shared is None
            if shared is None:
                shared = _OPEN[key] = _Connection(key)
            shared.handles += 1
        handle = cls(path, shared)
        try:
            if fresh:
                await shared.submit(_connect_shared, shared)
            await handle.run(lambda conn: conn.executescript(schema))
        except (sqlite3.Error, OSError, JobError) as exc:
            await handle.close()
            raise StoreUnavailableError(f"cannot open {path}: {exc}") from exc
        return handle

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(connection, *args) on the connection's thread; SQLite's errors become typed job errors.

        StoreUnavailableError when the database cannot serve now, InvalidJobError when a value
        can never be stored (see _typed_error); the transaction is rolled back either way.
        """
        shared = self._shared
        if shared is None:
            raise StoreUnavailableError(f"{self.path} is closed")

        def call() -> T:
            conn = shared.conn
            if conn is None:
                raise StoreUnavailableError(f"{self.path} is not open")
            try:
                return fn(conn, *args)
            except (sqlite3.Error, OverflowError, UnicodeEncodeError) as exc:
                raise _typed_error(exc) from exc

        return await shared.submit(call)

    def shares_connection_with(self, other: SQLiteDatabase) -> bool:
        """Whether both handles are open on the same connection (so one unit of work can span them)."""
        return self._shared is not None and self._shared is other._shared

    async def close(self) -> None:
        """Let go of the connection; the last handle closes it and stops its thread."""
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _OPEN_LOCK:
            shared.handles -= 1
            last = shared.handles == 0
            if last and _OPEN.get(shared.path) is shared:
                del _OPEN[shared.path]
        if last:
            # Units queued before this one run first; then the thread closes the connection.
            shared.stop()
            await asyncio.get_running_loop().run_in_executor(None, shared.thread.join)


def _connect_shared(shared: _Connection) -> None:
    shared.conn = _connect(shared.path)


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


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _enable_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
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
