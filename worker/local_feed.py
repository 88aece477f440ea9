"""The local shard feed: a change log that SQLite triggers keep for the shards table.

Every insert or update of a shard, by any connection or process, appends
(seq, tenant, shard) to `shard_changes`, so writers need no feeder-specific code.
The feeder's position (the last seq it finished) and the last hash it enqueued
per shard live in the same file. Log entries every feeder has passed are pruned.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Self

from jobs.sqlite_db import SQLiteDatabase, transaction
from worker.feed import DEFAULT_FEEDER_NAME, ChangePage
from worker.shards import SCHEMA as SHARDS_SCHEMA
from worker.shards import Shard, shard_from_row

FEED_SCHEMA = """
CREATE TABLE IF NOT EXISTS shard_changes (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id TEXT NOT NULL,
    shard_id  TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS shards_logged_on_insert AFTER INSERT ON shards BEGIN
    INSERT INTO shard_changes (tenant_id, shard_id) VALUES (NEW.tenant_id, NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS shards_logged_on_update AFTER UPDATE ON shards BEGIN
    INSERT INTO shard_changes (tenant_id, shard_id) VALUES (NEW.tenant_id, NEW.id);
END;
CREATE TABLE IF NOT EXISTS feeder_positions (
    name TEXT PRIMARY KEY,
    seq  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS feeder_hashes (
    name         TEXT NOT NULL,
    tenant_id    TEXT NOT NULL,
    shard_id     TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    PRIMARY KEY (name, tenant_id, shard_id)
) WITHOUT ROWID;
"""


def _start(conn: sqlite3.Connection, name: str) -> int:
    """The feeder's position; on its first start, log every existing shard so none is missed."""
    with transaction(conn):
        row = conn.execute("SELECT seq FROM feeder_positions WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return int(row["seq"])
        # Shards written before the triggers existed were never logged. Everything logged so
        # far is reflected in the shards' current state, so start after it and log that state.
        start = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM shard_changes").fetchone()[0])
        conn.execute("INSERT INTO shard_changes (tenant_id, shard_id) SELECT tenant_id, id FROM shards")
        conn.execute("INSERT INTO feeder_positions (name, seq) VALUES (?, ?)", (name, start))
        return start


class LocalShardFeed:
    """ShardFeed over the local SQLite file's shard change log."""

    def __init__(self, db: SQLiteDatabase, name: str, position: int) -> None:
        self._db = db
        self.name = name
        self.position = position

    @classmethod
    async def open(cls, path: str | Path, *, name: str = DEFAULT_FEEDER_NAME) -> Self:
        """Open the file at path, installing the change log if needed."""
        db = await SQLiteDatabase.open(path, SHARDS_SCHEMA + FEED_SCHEMA)
        try:
            position = await db.run(_start, name)
        except BaseException:
            await db.close()
            raise
        return cls(db, name, position)

    async def close(self) -> None:
        """Close the connection."""
        await self._db.close()

    async def read(self, max_items: int) -> ChangePage:
        """Up to max_items logged changes after the position, joined with the shards' current state."""
        rows = await self._db.run(
            lambda conn: conn.execute(
                "SELECT c.seq, s.tenant_id, s.id, s.shard_type_id, s.text, s.content_hash, s.updated_at "
                "FROM shard_changes c LEFT JOIN shards s ON s.tenant_id = c.tenant_id AND s.id = c.shard_id "
                "WHERE c.seq > ? ORDER BY c.seq LIMIT ?",
                (self.position, max_items),
            ).fetchall()
        )
        if not rows:
            return ChangePage((), None)
        shards = [
            shard_from_row(row)
            for row in rows
            if row["id"] is not None  # deleted since: nothing to embed
        ]
        return ChangePage(shards, str(rows[-1]["seq"]))

    async def enqueued_hash(self, tenant_id: str, shard_id: str) -> str | None:
        """The hash last enqueued for the shard."""
        row = await self._db.run(
            lambda conn: conn.execute(
                "SELECT content_hash FROM feeder_hashes WHERE name = ? AND tenant_id = ? AND shard_id = ?",
                (self.name, tenant_id, shard_id),
            ).fetchone()
        )
        return None if row is None else str(row["content_hash"])

    async def record(self, shard: Shard) -> None:
        """Remember the shard's hash as enqueued."""

        def apply(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(
                    "INSERT INTO feeder_hashes (name, tenant_id, shard_id, content_hash) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (name, tenant_id, shard_id) DO UPDATE SET content_hash = excluded.content_hash",
                    (self.name, shard.tenant_id, shard.id, shard.content_hash),
                )

        await self._db.run(apply)

    async def advance(self, position: str) -> None:
        """Persist the position and prune the log entries every feeder has passed."""
        seq = int(position)

        def apply(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("UPDATE feeder_positions SET seq = ? WHERE name = ?", (seq, self.name))
                conn.execute("DELETE FROM shard_changes WHERE seq <= (SELECT MIN(seq) FROM feeder_positions)")

        await self._db.run(apply)
        self.position = seq
