"""A crash-safe FIFO of the job-status writes the worker could not make yet.

While the job store is unavailable the tracker (worker/tracker.py) holds its writes
here. Each write is appended to a file this process owns before it counts as
buffered, so a worker killed mid-outage loses none: the next worker started on the
same data directory adopts the file and replays it first.

Ownership: each process creates `spool-*.jsonl` under `<data_dir>/tracking-spool/`
and holds an exclusive flock on it for its whole life. A file whose lock can be taken
has no live owner; several workers may share the folder.

Durability: one write(2) per entry and no fsync. SIGKILL and OOM kills end the process,
not the kernel: bytes a write(2) has accepted are in the page cache and reach the file.
fsync guards only against a kernel crash or power loss, which in a pod takes the node,
and with it the emptyDir the spool lives on; everywhere it would cost a disk flush per
buffered write, exactly while writes pile up.

Format: JSON Lines. `{"seq": N, "at": T, "write": {...}}` per buffered write and
`{"ack": N}` once the write with that seq, and so every earlier one (the FIFO is replayed
in order), has reached the store. The file is truncated whenever the FIFO empties and
rewritten when acknowledged lines outnumber live ones, so it stays bounded by the buffer
size. A crash between a store write and its ack replays that write again, which the
tracker's replays tolerate. A line cut short by a kill mid-write is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

from jobs.model import JobMetadata, JobStatus
from worker.messages import JobMessage

log = logging.getLogger(__name__)

SPOOL_DIR: Final = "tracking-spool"
_PREFIX: Final = "spool-"
_SUFFIX: Final = ".jsonl"
# A file being written before it is renamed into place; adoption only ever deletes these.
_TMP_SUFFIX: Final = ".tmp"
# Rewrite the file once this many lines are acknowledged and they outnumber the live ones.
COMPACT_MIN_LINES: Final = 1024
BEGIN: Final = "begin"
FINISH: Final = "finish"
_FINISHED: Final = frozenset({JobStatus.COMPLETED.value, JobStatus.FAILED.value, JobStatus.DEAD_LETTERED.value})


@dataclass(frozen=True, slots=True)
class TrackedWrite:
    """One job-status write the worker owes the store, as plain data so it can be spooled."""

    kind: str  # BEGIN (the attempt starts: -> processing) or FINISH (how it ended)
    tenant_id: str
    job_id: str
    shard_id: str
    shard_type_id: str
    attempt: int
    trace_id: str | None = None
    status: JobStatus | None = None  # FINISH: completed, failed or dead_lettered
    error: str | None = None
    retry_count: int | None = None
    metadata: JobMetadata | None = None

    @classmethod
    def begin(cls, msg: JobMessage, trace_id: str | None) -> Self:
        """Mark the job of msg processing."""
        return cls(BEGIN, msg.tenant_id, msg.job_id, msg.shard_id, msg.shard_type_id, msg.attempt, trace_id=trace_id)

    @classmethod
    def finish(
        cls,
        msg: JobMessage,
        status: JobStatus,
        *,
        error: str | None,
        retry_count: int | None,
        metadata: JobMetadata | None,
    ) -> Self:
        """Record how the attempt of msg ended."""
        return cls(
            FINISH,
            msg.tenant_id,
            msg.job_id,
            msg.shard_id,
            msg.shard_type_id,
            msg.attempt,
            status=status,
            error=error,
            retry_count=retry_count,
            metadata=metadata,
        )

    @property
    def key(self) -> tuple[str, str]:
        """(tenant, job): writes with one key are applied in the order they were made."""
        return (self.tenant_id, self.job_id)

    @property
    def describe(self) -> str:
        """'begin' or 'finish:<status>', for logs."""
        return self.kind if self.status is None else f"{self.kind}:{self.status.value}"

    def to_json(self) -> dict[str, Any]:
        """The camelCase record written to the spool."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "tenantId": self.tenant_id,
            "jobId": self.job_id,
            "shardId": self.shard_id,
            "shardTypeId": self.shard_type_id,
            "attempt": self.attempt,
        }
        optional = {
            "traceId": self.trace_id,
            "status": self.status.value if self.status is not None else None,
            "error": self.error,
            "retryCount": self.retry_count,
            "metadata": self.metadata.to_json() if self.metadata is not None else None,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """Parse a spooled record; ValueError if it is not one."""
        kind = data.get("kind")
        if kind not in (BEGIN, FINISH):
            raise ValueError(f"unknown write kind {kind!r}")
        tenant_id, job_id, shard_id, shard_type_id = (
            data.get(n) for n in ("tenantId", "jobId", "shardId", "shardTypeId")
        )
        if not all(isinstance(value, str) and value for value in (tenant_id, job_id, shard_id, shard_type_id)):
            raise ValueError("tenantId, jobId, shardId and shardTypeId must be non-empty strings")
        attempt = data.get("attempt")
        retry_count = data.get("retryCount")
        for name, value in (("attempt", attempt), ("retryCount", retry_count)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer")
        for name in ("traceId", "error"):
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"{name} must be a string")
        metadata = data.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError("metadata must be an object")
        status = None
        if kind == FINISH:
            if data.get("status") not in _FINISHED:
                raise ValueError(f"a finish must record one of {', '.join(sorted(_FINISHED))}")
            status = JobStatus(data["status"])
        return cls(
            kind,
            str(tenant_id),
            str(job_id),
            str(shard_id),
            str(shard_type_id),
            attempt=int(attempt or 0),
            trace_id=data.get("traceId"),
            status=status,
            error=data.get("error"),
            retry_count=retry_count,
            metadata=JobMetadata.from_json(metadata) if metadata is not None else None,
        )


@dataclass(frozen=True, slots=True)
class _Entry:
    seq: int
    at: float
    write: TrackedWrite

    def line(self) -> bytes:
        record = {"seq": self.seq, "at": self.at, "write": self.write.to_json()}
        return (json.dumps(record, separators=(",", ":")) + "\n").encode()


class Spool:
    """A FIFO of tracked writes, mirrored to a file this process owns when it has a directory.

    `Spool()` keeps writes in memory only; `Spool.open(directory)` makes them survive a crash
    and adopts the writes of workers that died with a spool in the same directory.
    """

    def __init__(self) -> None:
        self.directory: Path | None = None
        self.path: Path | None = None
        self._fd: int | None = None
        self._size = 0
        self._queue: deque[_Entry] = deque()
        self._seq = 0
        # Acknowledged entries and ack lines still in the file: what a compaction would drop.
        self._dead_lines = 0
        self.adopted = 0
        self.write_errors = 0

    @classmethod
    def open(cls, directory: Path) -> Self:
        """Create this process's spool file in directory and adopt the writes of stopped workers.

        Adopted writes come first in the FIFO, merged by when they were made, all of them even
        past the tracker's buffer size. OSError if the directory cannot be used.
        """
        spool = cls()
        directory.mkdir(parents=True, exist_ok=True)
        spool.directory = directory
        spool._fd, spool.path = _create_owned(directory, b"")
        try:
            spool._adopt()
        except BaseException:
            spool.close()
            raise
        return spool

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[TrackedWrite]:
        return (entry.write for entry in self._queue)

    def head(self, limit: int) -> list[TrackedWrite]:
        """Up to limit writes from the front, oldest first."""
        return [entry.write for entry in itertools.islice(self._queue, limit)]

    def append(self, write: TrackedWrite) -> None:
        """Add write at the back: on disk first (when spooling), then in memory."""
        self._seq += 1
        entry = _Entry(self._seq, time.time(), write)
        if self._fd is not None:
            try:
                self._write(entry.line())
            except OSError as exc:
                # Kept in memory all the same: a lost record only if this process dies too.
                self.write_errors += 1
                log.error(
                    "cannot write to tracking spool %s (%s); %s is held in memory only",
                    self.path,
                    exc,
                    write.describe,
                    extra={"tenant_id": write.tenant_id, "job_id": write.job_id},
                )
        self._queue.append(entry)

    def pop(self) -> TrackedWrite:
        """Remove the front write, which has reached the store, and acknowledge it on disk."""
        entry = self._queue.popleft()
        if self._fd is None:
            return entry.write
        try:
            if not self._queue:
                # Nothing live left: start the file over. A crash before this replays the
                # last write once more, which replays tolerate.
                os.ftruncate(self._fd, 0)
                self._size = self._dead_lines = 0
            else:
                self._write(json.dumps({"ack": entry.seq}).encode() + b"\n")
                self._dead_lines += 2
                if self._dead_lines >= COMPACT_MIN_LINES and self._dead_lines > len(self._queue):
                    self._compact()
        except OSError as exc:
            log.warning("cannot acknowledge a write in tracking spool %s (%s); it may replay again", self.path, exc)
        return entry.write

    def close(self) -> None:
        """Release the file: deleted when empty, else left for the next worker to adopt."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not self._queue and self.path is not None:
            self.path.unlink(missing_ok=True)
        os.close(fd)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError:
            # Cut a partial line off, so the next entry does not start in the middle of it.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += written

    def _compact(self) -> None:
        assert self.directory is not None
        assert self._fd is not None
        assert self.path is not None
        fd, path = _create_owned(self.directory, b"".join(entry.line() for entry in self._queue))
        old_fd, old_path = self._fd, self.path
        self._fd, self.path = fd, path
        self._size = os.fstat(fd).st_size
        self._dead_lines = 0
        # A crash before this unlink leaves two files with the same live writes: both are
        # adopted and those writes replayed twice, which replays tolerate.
        old_path.unlink(missing_ok=True)
        os.close(old_fd)

    def _adopt(self) -> None:
        assert self.directory is not None
        orphans: list[tuple[Path, int, list[_Entry]]] = []
        try:
            for path in sorted(self.directory.glob(_PREFIX + "*")):
                if path == self.path or not path.name.endswith((_SUFFIX, _TMP_SUFFIX)):
                    continue
                fd = _lock_if_orphan(path)
                if fd is None:
                    continue
                if path.name.endswith(_TMP_SUFFIX):
                    # A copy that was being written: the file it was copied from still exists.
                    path.unlink(missing_ok=True)
                    os.close(fd)
                    continue
                orphans.append((path, fd, read_spool(path)))
            # Each file keeps its own order; across files, the writes made earlier go first.
            for entry in heapq.merge(*(entries for _, _, entries in orphans), key=lambda e: e.at):
                self.append(entry.write)
            self.adopted = len(self._queue)
            if self.adopted:
                log.warning(
                    "adopted %d job-store write(s) from %d spool file(s) of stopped workers in %s",
                    self.adopted,
                    len(orphans),
                    self.directory,
                )
            # Only now, with the writes in this process's own file, may the orphans go.
            for path, _, _ in orphans:
                path.unlink(missing_ok=True)
        finally:
            for _, fd, _ in orphans:
                os.close(fd)


def read_spool(path: Path) -> list[_Entry]:
    """The writes in a spool file not yet acknowledged, in order; unreadable lines are skipped with a warning."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # after the last newline: empty unless a write was cut short
    if torn:
        log.warning("spool %s ends in a partial line (its writer was killed mid-write); skipped", path)
    entries: list[_Entry] = []
    acked = 0
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if "ack" in record:
                acked = max(acked, _integer(record["ack"]))
                continue
            write = TrackedWrite.from_json(record["write"])
            entries.append(_Entry(_integer(record["seq"]), float(record["at"]), write))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            log.warning("spool %s line %d is not a spooled write (%s); skipped", path, number, exc)
    return [entry for entry in entries if entry.seq > acked]


def spool_files(directory: Path) -> Sequence[Path]:
    """The spool files in directory, owned or not."""
    return sorted(directory.glob(f"{_PREFIX}*{_SUFFIX}"))


def _integer(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    return value


def _create_owned(directory: Path, content: bytes) -> tuple[int, Path]:
    """A new spool file holding content, locked by this process before anyone can see it."""
    for _ in range(3):
        try:
            return _try_create_owned(directory, content)
        except FileNotFoundError:
            # A starting worker took the new file for a dead one's leftover in the instant
            # between its creation and its lock, and deleted it: make another.
            continue
    return _try_create_owned(directory, content)


def _try_create_owned(directory: Path, content: bytes) -> tuple[int, Path]:
    name = f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp = directory / (name + _SUFFIX + _TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        final = directory / (name + _SUFFIX)
        # The lock belongs to the open file, not the name: it holds across the rename.
        os.rename(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        os.close(fd)
        raise
    return fd, final


def _lock_if_orphan(path: Path) -> int | None:
    """An fd holding the lock on path if no live process owns it, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Another adopter may have deleted (or a compaction replaced) the file between our
        # open and our lock: then the lock is on a file nobody can see any more.
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)
            return None
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd
