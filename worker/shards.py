"""Shards: the text the worker embeds, and where it writes the vectors back."""

from __future__ import annotations

import hashlib
import sqlite3
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, Self

from jobs.model import format_time, parse_time, utcnow, validate_id, validate_tenant_id
from jobs.sqlite_db import SQLiteDatabase, transaction


class ShardNotFoundError(LookupError):
    """The shard a job names does not exist (a permanent failure for that job)."""


def content_hash(text: str) -> str:
    """Stable digest of a shard's text, used to skip re-embedding unchanged content."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Shard:
    """A piece of a tenant's content to embed."""

    tenant_id: str
    id: str
    shard_type_id: str
    text: str
    content_hash: str = ""
    updated_at: datetime = field(default_factory=utcnow)

    def __post_init__(self) -> None:
        validate_tenant_id(self.tenant_id)
        validate_id(self.id, "shard id")
        validate_id(self.shard_type_id, "shard type id")
        if not self.content_hash:
            object.__setattr__(self, "content_hash", content_hash(self.text))


@dataclass(frozen=True, slots=True)
class ShardVectors:
    """The vectors saved for a shard, one per chunk, and what produced them."""

    model: str
    content_hash: str
    chunks: Sequence[str]
    vectors: Sequence[Sequence[float]]


class ShardStore(Protocol):
    """Text in, vectors out."""

    async def put(self, shard: Shard) -> bool:
        """Insert or update a shard; True when its content is new or changed."""
        ...

    async def get(self, tenant_id: str, shard_id: str) -> Shard:
        """The shard; ShardNotFoundError if missing."""
        ...

    async def save_vectors(self, tenant_id: str, shard_id: str, vectors: ShardVectors) -> None:
        """Replace the shard's vectors (idempotent: a redelivered job writes the same result)."""
        ...

    async def get_vectors(self, tenant_id: str, shard_id: str) -> ShardVectors | None:
        """The shard's saved vectors, or None before its first embedding."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS shards (
    tenant_id     TEXT NOT NULL,
    id            TEXT NOT NULL,
    shard_type_id TEXT NOT NULL,
    text          TEXT NOT NULL,
    content_hash  TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (tenant_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shard_vectors (
    tenant_id    TEXT NOT NULL,
    shard_id     TEXT NOT NULL,
    chunk_index  INTEGER NOT NULL,
    chunk        TEXT NOT NULL,
    vector       BLOB NOT NULL,
    model        TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    PRIMARY KEY (tenant_id, shard_id, chunk_index)
) WITHOUT ROWID;
"""


def shard_from_row(row: sqlite3.Row) -> Shard:
    """A Shard from a row with the shards table's columns."""
    return Shard(
        tenant_id=row["tenant_id"],
        id=row["id"],
        shard_type_id=row["shard_type_id"],
        text=row["text"],
        content_hash=row["content_hash"],
        updated_at=parse_time(row["updated_at"]),
    )


class SQLiteShardStore:
    """Shards and their vectors (float32) in the local SQLite file."""

    def __init__(self, db: SQLiteDatabase) -> None:
        self._db = db

    @property
    def database(self) -> SQLiteDatabase:
        """The connection this store runs on (shared by everything that opened the same file)."""
        return self._db

    @classmethod
    async def open(cls, path: str | Path) -> Self:
        """Open (creating if needed) the shard tables in the file at path."""
        return cls(await SQLiteDatabase.open(path, SCHEMA))

    async def close(self) -> None:
        """Close the connection."""
        await self._db.close()

    async def put(self, shard: Shard) -> bool:
        """Upsert the shard; True when the text is new or changed."""

        def apply(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                row = conn.execute(
                    "SELECT content_hash FROM shards WHERE tenant_id = ? AND id = ?",
                    (shard.tenant_id, shard.id),
                ).fetchone()
                if row is not None and row["content_hash"] == shard.content_hash:
                    return False
                conn.execute(
                    "INSERT INTO shards (tenant_id, id, shard_type_id, text, content_hash, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, id) DO UPDATE SET "
                    "shard_type_id = excluded.shard_type_id, text = excluded.text, "
                    "content_hash = excluded.content_hash, updated_at = excluded.updated_at",
                    (
                        shard.tenant_id,
                        shard.id,
                        shard.shard_type_id,
                        shard.text,
                        shard.content_hash,
                        format_time(shard.updated_at),
                    ),
                )
                return True

        return await self._db.run(apply)

    async def get(self, tenant_id: str, shard_id: str) -> Shard:
        """The tenant's shard; ShardNotFoundError if missing."""
        shard = await self._db.run(self.find_in, tenant_id, shard_id)
        if shard is None:
            raise ShardNotFoundError(f"shard {shard_id!r} not found in tenant {tenant_id!r}")
        return shard

    @staticmethod
    def find_in(conn: sqlite3.Connection, tenant_id: str, shard_id: str) -> Shard | None:
        """The tenant's shard or None, read on the caller's connection thread (inside its transaction, if any)."""
        row = conn.execute(
            "SELECT tenant_id, id, shard_type_id, text, content_hash, updated_at FROM shards "
            "WHERE tenant_id = ? AND id = ?",
            (tenant_id, shard_id),
        ).fetchone()
        return None if row is None else shard_from_row(row)

    async def save_vectors(self, tenant_id: str, shard_id: str, vectors: ShardVectors) -> None:
        """Replace the shard's chunk vectors in one transaction."""
        await self._db.run(self.save_vectors_in, tenant_id, shard_id, vectors)

    @staticmethod
    def save_vectors_in(conn: sqlite3.Connection, tenant_id: str, shard_id: str, vectors: ShardVectors) -> None:
        """save_vectors() on the caller's connection thread, joining the caller's transaction if one is open."""
        rows = [
            (tenant_id, shard_id, i, chunk, array("f", vector).tobytes(), vectors.model, vectors.content_hash)
            for i, (chunk, vector) in enumerate(zip(vectors.chunks, vectors.vectors, strict=True))
        ]
        with transaction(conn):
            conn.execute("DELETE FROM shard_vectors WHERE tenant_id = ? AND shard_id = ?", (tenant_id, shard_id))
            conn.executemany(
                "INSERT INTO shard_vectors (tenant_id, shard_id, chunk_index, chunk, vector, model, "
                "content_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )

    async def get_vectors(self, tenant_id: str, shard_id: str) -> ShardVectors | None:
        """The saved vectors in chunk order, or None."""
        rows = await self._db.run(
            lambda conn: conn.execute(
                "SELECT chunk, vector, model, content_hash FROM shard_vectors "
                "WHERE tenant_id = ? AND shard_id = ? ORDER BY chunk_index",
                (tenant_id, shard_id),
            ).fetchall()
        )
        if not rows:
            return None
        return ShardVectors(
            model=rows[0]["model"],
            content_hash=rows[0]["content_hash"],
            chunks=[row["chunk"] for row in rows],
            vectors=[array("f", row["vector"]).tolist() for row in rows],
        )
