"""JobStore on a SQLite file (WAL): the embedded default backend."""

from __future__ import annotations

import builtins
import itertools
import json
import sqlite3
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Self

from jobs.errors import (
    JobNotFoundError,
    StoreUnavailableError,
    TransitionConflictError,
)
from jobs.model import (
    TERMINAL,
    Job,
    JobMetadata,
    JobStatus,
    check_transition,
    format_time,
    parse_time,
    utcnow,
    validate_tenant_id,
)
from jobs.sqlite_db import SQLiteDatabase, transaction
from jobs.store import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    UNSET,
    Page,
    Position,
    StuckJobs,
    _Unset,
    decode_continuation,
    empty_stats,
    encode_continuation,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    tenant_id     TEXT NOT NULL,
    id            TEXT NOT NULL,
    shard_id      TEXT NOT NULL,
    shard_type_id TEXT NOT NULL,
    status        TEXT NOT NULL,
    retry_count   INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    completed_at  TEXT,
    trace_id      TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_tenant_status_created
    ON jobs (tenant_id, status, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_tenant_created ON jobs (tenant_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_tenant_shard_updated ON jobs (tenant_id, shard_id, updated_at DESC);
CREATE INDEX IF NOT EXISTS jobs_status_updated ON jobs (status, updated_at);
CREATE TABLE IF NOT EXISTS job_counters (
    tenant_id TEXT NOT NULL,
    status    TEXT NOT NULL,
    count     INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, status)
) WITHOUT ROWID;
"""

# The column order of every INSERT (benchmarks fill files with it in bulk).
COLUMNS = (
    "tenant_id, id, shard_id, shard_type_id, status, retry_count, error, "
    "created_at, updated_at, completed_at, trace_id, metadata"
)
_STATS_PAGE_ROWS = 1000


# Each row read for a Job comes back as its JSON record, built by SQLite in C: the API serves
# that text as it is and nothing decodes a timestamp unless a caller reads that field.
# Every value is TEXT or INTEGER (metadata is stored JSON text), so no float is re-rendered.
_REQUIRED_FIELDS = (
    "'id', id, 'tenantId', tenant_id, 'shardId', shard_id, 'shardTypeId', shard_type_id, "
    "'status', status, 'retryCount', retry_count, 'createdAt', created_at, 'updatedAt', updated_at, "
    "'metadata', json(metadata)"
)
_OPTIONAL_FIELDS = (("error", "error"), ("completedAt", "completed_at"), ("traceId", "trace_id"))


def _record_sql() -> str:
    """One json_object per combination of present optional fields, so unset ones are absent, not null.

    A CASE over the eight combinations costs a third less than patching the nulls away with json_patch.
    """
    branches = []
    for present in itertools.product((True, False), repeat=len(_OPTIONAL_FIELDS)):
        fields = list(zip(_OPTIONAL_FIELDS, present, strict=True))
        test = " AND ".join(f"{column} IS {'NOT ' if p else ''}NULL" for (_, column), p in fields)
        extra = "".join(f", '{key}', {column}" for (key, column), p in fields if p)
        branches.append(f"WHEN {test} THEN json_object({_REQUIRED_FIELDS}{extra})")
    return f"CASE {' '.join(branches)} END"


_RECORD = _record_sql()


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job.from_stored_json(row["record"])


def _bump(conn: sqlite3.Connection, tenant_id: str, status: str, delta: int) -> None:
    conn.execute(
        "INSERT INTO job_counters (tenant_id, status, count) VALUES (?, ?, ?) "
        "ON CONFLICT (tenant_id, status) DO UPDATE SET count = count + excluded.count",
        (tenant_id, status, delta),
    )


def _move(conn: sqlite3.Connection, tenant_id: str, from_status: str, to_status: str) -> None:
    """One job from one status's count to another's, in one statement."""
    conn.execute(
        "INSERT INTO job_counters (tenant_id, status, count) VALUES (?1, ?2, -1), (?1, ?3, 1) "
        "ON CONFLICT (tenant_id, status) DO UPDATE SET count = count + excluded.count",
        (tenant_id, from_status, to_status),
    )


class SQLiteJobStore:
    """JobStore backed by one SQLite file; safe for several processes sharing it."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self._run = db.run

    @property
    def database(self) -> SQLiteDatabase:
        """The connection this store runs on (shared by everything that opened the same file)."""
        return self._db

    @classmethod
    async def open(cls, path: str | Path) -> Self:
        """Open (creating if needed) the store at path."""
        try:
            return cls(await SQLiteDatabase.open(path, SCHEMA))
        except StoreUnavailableError as exc:
            raise StoreUnavailableError(f"cannot open job store: {exc}") from exc

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection and stop the store's thread."""
        await self._db.close()

    async def ping(self) -> None:
        """Raise StoreUnavailableError unless a trivial query succeeds."""
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- writes -----------------------------------------------------------------

    async def create(self, job: Job) -> Job:
        """Insert job; if the tenant already has a job with that id, return the stored one."""
        return await self._run(self.create_in, job)

    @staticmethod
    def create_in(conn: sqlite3.Connection, job: Job) -> Job:
        """create() on the caller's connection thread, joining the caller's transaction if one is open."""
        with transaction(conn):
            record = job.to_json()
            cursor = conn.execute(
                f"INSERT INTO jobs ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
                "ON CONFLICT (tenant_id, id) DO NOTHING",
                (
                    record["tenantId"],
                    record["id"],
                    record["shardId"],
                    record["shardTypeId"],
                    record["status"],
                    record["retryCount"],
                    record.get("error"),
                    record["createdAt"],
                    record["updatedAt"],
                    record.get("completedAt"),
                    record.get("traceId"),
                    json.dumps(record["metadata"]),
                ),
            )
            if cursor.rowcount == 1:
                _bump(conn, job.tenant_id, job.status.value, 1)
                return job
            return _get(conn, job.tenant_id, job.id)

    async def transition(
        self,
        tenant_id: str,
        job_id: str,
        from_status: JobStatus,
        to_status: JobStatus,
        *,
        error: str | _Unset | None = UNSET,
        retry_count: int | None = None,
        metadata: JobMetadata | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Conditionally move a job between statuses, updating its tenant's counters in one transaction."""
        validate_tenant_id(tenant_id)
        check_transition(from_status, to_status)
        await self._run(
            self.transition_in,
            tenant_id,
            job_id,
            from_status,
            to_status,
            error,
            retry_count,
            metadata,
            trace_id,
        )

    @staticmethod
    def transition_in(
        conn: sqlite3.Connection,
        tenant_id: str,
        job_id: str,
        from_status: JobStatus,
        to_status: JobStatus,
        error: str | _Unset | None = UNSET,
        retry_count: int | None = None,
        metadata: JobMetadata | None = None,
        trace_id: str | None = None,
    ) -> None:
        """transition() on the caller's connection thread, joining the caller's transaction if one is open.

        For units of work that write a job together with other tables of the same file.
        """
        check_transition(from_status, to_status)
        now = format_time(utcnow())
        sets = ["status = ?", "updated_at = ?"]
        params: list[Any] = [to_status.value, now]
        if to_status in TERMINAL:
            sets.append("completed_at = ?")
            params.append(now)
        elif to_status is JobStatus.PENDING:
            sets.append("completed_at = NULL")
        if not isinstance(error, _Unset):
            sets.append("error = ?")
            params.append(error)
        if retry_count is not None:
            sets.append("retry_count = ?")
            params.append(retry_count)
        if metadata is not None:
            sets.append("metadata = ?")
            params.append(json.dumps(metadata.to_json()))
        if trace_id is not None:
            sets.append("trace_id = ?")
            params.append(trace_id)
        # Only the fixed column names above are formatted in; every value is a parameter.
        sql = (
            f"UPDATE jobs SET {', '.join(sets)} WHERE tenant_id = ? AND id = ? AND status = ? "  # noqa: S608
            "RETURNING 1"
        )
        params += [tenant_id, job_id, from_status.value]
        with transaction(conn):
            if conn.execute(sql, params).fetchone() is None:
                current = conn.execute(
                    "SELECT status FROM jobs WHERE tenant_id = ? AND id = ?", (tenant_id, job_id)
                ).fetchone()
                if current is None:
                    raise JobNotFoundError(tenant_id, job_id)
                raise TransitionConflictError(job_id, from_status.value, current["status"])
            if from_status is not to_status:
                _move(conn, tenant_id, from_status.value, to_status.value)

    async def purge(self, older_than: timedelta, tenant_id: str | None = None) -> int:
        """Delete finished jobs whose completion is older than older_than; counters follow."""
        cutoff = format_time(utcnow() - older_than)
        terminal = [s.value for s in TERMINAL]
        where = "status IN (?, ?) AND completed_at < ?"
        params: list[Any] = [*terminal, cutoff]
        if tenant_id is not None:
            validate_tenant_id(tenant_id)
            where += " AND tenant_id = ?"
            params.append(tenant_id)

        def apply(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                groups = conn.execute(
                    f"SELECT tenant_id, status, COUNT(*) AS n FROM jobs WHERE {where} "  # noqa: S608
                    "GROUP BY tenant_id, status",
                    params,
                ).fetchall()
                conn.execute(f"DELETE FROM jobs WHERE {where}", params)  # noqa: S608
                for row in groups:
                    _bump(conn, row["tenant_id"], row["status"], -row["n"])
                return sum(row["n"] for row in groups)

        return await self._run(apply)

    async def recount(self, tenant_id: str | None = None) -> dict[str, dict[JobStatus, int]]:
        """Rebuild the counters of one tenant, or all, from the job records."""
        if tenant_id is not None:
            validate_tenant_id(tenant_id)

        def apply(conn: sqlite3.Connection) -> dict[str, dict[JobStatus, int]]:
            with transaction(conn):
                if tenant_id is None:
                    conn.execute("DELETE FROM job_counters")
                    rows = conn.execute(
                        "SELECT tenant_id, status, COUNT(*) AS n FROM jobs GROUP BY tenant_id, status"
                    ).fetchall()
                else:
                    conn.execute("DELETE FROM job_counters WHERE tenant_id = ?", (tenant_id,))
                    rows = conn.execute(
                        "SELECT tenant_id, status, COUNT(*) AS n FROM jobs WHERE tenant_id = ? "
                        "GROUP BY tenant_id, status",
                        (tenant_id,),
                    ).fetchall()
                result: dict[str, dict[JobStatus, int]] = {}
                if tenant_id is not None:
                    result[tenant_id] = empty_stats()
                for row in rows:
                    _bump(conn, row["tenant_id"], row["status"], row["n"])
                    result.setdefault(row["tenant_id"], empty_stats())[JobStatus(row["status"])] = row["n"]
                return result

        return await self._run(apply)

    # -- reads ------------------------------------------------------------------

    async def get(self, tenant_id: str, job_id: str) -> Job:
        """The tenant's job with that id; JobNotFoundError if none."""
        validate_tenant_id(tenant_id)
        return await self._run(_get, tenant_id, job_id)

    async def list(
        self,
        tenant_id: str,
        status: JobStatus | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        continuation: str | None = None,
    ) -> Page:
        """Newest first by (createdAt, id), resumed by a keyset token so inserts never shift pages."""
        validate_tenant_id(tenant_id)
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        query = {"t": tenant_id, "s": status.value if status else None}
        where = ["tenant_id = ?"]
        params: list[Any] = [tenant_id]
        if status is not None:
            where.append("status = ?")
            params.append(status.value)
        if continuation is not None:
            position = decode_continuation(continuation, query)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params += [position.created_at, position.created_at, position.job_id]
        sql = (
            f"SELECT {_RECORD} AS record, created_at, id FROM jobs WHERE {' AND '.join(where)} "  # noqa: S608
            "ORDER BY created_at DESC, id DESC LIMIT ?"
        )
        params.append(limit + 1)

        def read(conn: sqlite3.Connection) -> Page:
            rows = conn.execute(sql, params).fetchall()
            items = [_row_to_job(row) for row in rows[:limit]]
            token = None
            if len(rows) > limit:
                last = rows[limit - 1]
                token = encode_continuation(query, Position(last["created_at"], last["id"]))
            return Page(items=items, continuation=token)

        return await self._run(read)

    async def stats(self, tenant_id: str) -> dict[JobStatus, int]:
        """The tenant's counts per status, from its counter rows."""
        validate_tenant_id(tenant_id)

        def read(conn: sqlite3.Connection) -> dict[JobStatus, int]:
            out = empty_stats()
            rows = conn.execute("SELECT status, count FROM job_counters WHERE tenant_id = ?", (tenant_id,)).fetchall()
            for row in rows:
                out[JobStatus(row["status"])] = row["count"]
            return out

        return await self._run(read)

    async def stats_all(self) -> dict[str, dict[JobStatus, int]]:
        """Every tenant's counts, read in keyset pages of the counter rows."""
        result: dict[str, dict[JobStatus, int]] = {}
        after = ("", "")
        while True:
            rows = await self._run(
                lambda conn, a: conn.execute(
                    "SELECT tenant_id, status, count FROM job_counters "
                    "WHERE (tenant_id, status) > (?, ?) ORDER BY tenant_id, status LIMIT ?",
                    (*a, _STATS_PAGE_ROWS),
                ).fetchall(),
                after,
            )
            for row in rows:
                result.setdefault(row["tenant_id"], empty_stats())[JobStatus(row["status"])] = row["count"]
            if len(rows) < _STATS_PAGE_ROWS:
                return result
            after = (rows[-1]["tenant_id"], rows[-1]["status"])

    async def stuck(
        self,
        older_than: timedelta,
        statuses: Sequence[JobStatus] = (JobStatus.PENDING, JobStatus.PROCESSING),
    ) -> builtins.list[StuckJobs]:
        """Counts of jobs per tenant and status not updated since now - older_than."""
        if not statuses:
            return []
        sql, params = stuck_query(statuses, format_time(utcnow() - older_than))
        rows = await self._run(lambda conn: conn.execute(sql, params).fetchall())
        return [
            StuckJobs(
                tenant_id=row["tenant_id"],
                status=JobStatus(row["status"]),
                count=row["n"],
                oldest_updated_at=parse_time(row["oldest"]),
            )
            for row in rows
        ]


def stuck_query(statuses: Sequence[JobStatus], cutoff: str) -> tuple[str, builtins.list[str]]:
    """The SQL and parameters of stuck(): jobs in statuses not updated since cutoff, per tenant and status."""
    marks = ", ".join("?" for _ in statuses)
    # INDEXED BY pins the plan to (status, updated_at), which reads only the rows updated before the
    # cutoff (and covers tenant_id: the table's key is in every index). Given ANALYZE
    # statistics, which say a status matches a quarter of all jobs, the planner prefers
    # scanning jobs_tenant_status_created in GROUP BY order instead: every job, every refresh.
    sql = (
        "SELECT tenant_id, status, COUNT(*) AS n, MIN(updated_at) AS oldest "  # noqa: S608
        f"FROM jobs INDEXED BY jobs_status_updated WHERE status IN ({marks}) AND updated_at < ? "
        "GROUP BY tenant_id, status ORDER BY tenant_id, status"
    )
    return sql, [*(JobStatus(s).value for s in statuses), cutoff]


def _get(conn: sqlite3.Connection, tenant_id: str, job_id: str) -> Job:
    row = conn.execute(
        f"SELECT {_RECORD} AS record FROM jobs WHERE tenant_id = ? AND id = ?",  # noqa: S608
        (tenant_id, job_id),
    ).fetchone()
    if row is None:
        raise JobNotFoundError(tenant_id, job_id)
    return _row_to_job(row)
