"""Leases in a table of the SQLite file the job store uses, for exporters sharing one local store."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Self

from jobs.errors import StoreUnavailableError
from jobs.lease import LeaseRecord
from jobs.model import format_time, parse_time, utcnow
from jobs.sqlite_db import SQLiteDatabase, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    version    INTEGER NOT NULL,
    duration   REAL NOT NULL,
    renewed_at TEXT NOT NULL
) WITHOUT ROWID;
"""

# Creates the row at version 1, or moves it to the next version only while it is still at the
# expected one: a missing row and a matching version both succeed in this one statement, and
# anything else changes nothing and returns no row. Rows are never deleted (a release clears
# the holder), so a version number is never reused.
_WRITE = """
INSERT INTO leases (name, holder, version, duration, renewed_at) VALUES (:name, :holder, 1, :duration, :now)
ON CONFLICT (name) DO UPDATE SET
    holder = excluded.holder,
    version = leases.version + 1,
    duration = excluded.duration,
    renewed_at = excluded.renewed_at
WHERE leases.version = :expected
RETURNING version
"""


def _record(name: str, row: sqlite3.Row) -> LeaseRecord:
    return LeaseRecord(
        name=name,
        holder=row["holder"],
        version=str(row["version"]),
        duration=row["duration"],
        renewed_at=parse_time(row["renewed_at"]),
    )


class SQLiteLeaseBackend:
    """LeaseBackend on the `leases` table of a SQLite file; safe for several processes sharing it."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db
        self.calls = 0  # lease reads and writes made, for tests that count store traffic

    @classmethod
    async def open(cls, path: str | Path) -> Self:
        """Open (creating if needed) the lease table in the file at path."""
        try:
            return cls(await SQLiteDatabase.open(path, SCHEMA))
        except StoreUnavailableError as exc:
            raise StoreUnavailableError(f"cannot open lease table: {exc}") from exc

    async def read(self, name: str) -> LeaseRecord | None:
        """The record, or None when it was never written."""
        self.calls += 1

        def read(conn: sqlite3.Connection) -> LeaseRecord | None:
            row = conn.execute("SELECT * FROM leases WHERE name = ?", (name,)).fetchone()
            return None if row is None else _record(name, row)

        return await self._db.run(read)

    async def write(self, name: str, expected: str | None, holder: str, duration: float) -> LeaseRecord | None:
        """Write holder if the record is still at version expected (None: not there yet); None if not."""
        self.calls += 1
        now = utcnow()
        params = {
            "name": name,
            "holder": holder,
            "duration": duration,
            "now": format_time(now),
            "expected": None if expected is None else int(expected),
        }

        def write(conn: sqlite3.Connection) -> LeaseRecord | None:
            with transaction(conn):
                # fetchall: a RETURNING statement must run to its end before the COMMIT.
                rows = conn.execute(_WRITE, params).fetchall()
            if not rows:
                return None
            return LeaseRecord(name=name, holder=holder, version=str(rows[0][0]), duration=duration, renewed_at=now)

        return await self._db.run(write)

    async def close(self) -> None:
        """Close the connection."""
        await self._db.close()
