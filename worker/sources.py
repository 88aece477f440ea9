"""Reading shards to ingest: JSON Lines (a file or stdin) or a folder of text files."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs import strict_json
from jobs.errors import JobError
from worker.producer import shard_id_from_path
from worker.shards import Shard

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".text"})
# A record is one flat object; some room is left for nested fields a producer adds.
MAX_DEPTH = 16


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input record that is not a valid shard, and why."""

    where: str
    reason: str


def read_shards(source: str, default_tenant: str = "default") -> Iterator[Shard | Rejected]:
    """Shards from a .jsonl file, '-' (JSON Lines on stdin), or a folder of text files.

    JSON Lines records: {"tenantId", "shardId", "shardTypeId" (default "document"), "text"},
    each a string. A line that is not such a record is Rejected with its position (file:line)
    and the lines after it are read on: one bad line never costs the rest of the file.
    In a folder, each sub-folder is a tenant; files at the top level belong to default_tenant.
    """
    if source == "-":
        yield from _read_jsonl(sys.stdin.buffer, "<stdin>")
        return
    path = Path(source)
    if path.is_dir():
        yield from _read_folder(path, default_tenant)
        return
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    # Bytes, decoded a line at a time: invalid UTF-8 rejects its line, not the file.
    with path.open("rb") as lines:
        yield from _read_jsonl(lines, str(path))


def _read_jsonl(lines: Iterable[bytes], name: str) -> Iterator[Shard | Rejected]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            yield _record(line)
        except _RejectedLine as exc:
            yield Rejected(where, str(exc))


class _RejectedLine(Exception):
    """Why one line is not a shard."""


def _record(line: bytes) -> Shard:
    try:
        data = strict_json.loads(line, max_depth=MAX_DEPTH)
    except strict_json.JSONInputError as exc:
        raise _RejectedLine(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _RejectedLine("a record must be a JSON object")
    data.setdefault("shardTypeId", "document")
    # Strings only: str() would turn a tenantId of 123 or true into the tenants "123" and "True".
    for key in ("tenantId", "shardId", "shardTypeId", "text"):
        if not isinstance(data.get(key), str):
            got = "missing" if key not in data else strict_json.type_name(data[key])
            raise _RejectedLine(f"field {key!r} must be a string; it is {got}")
    try:
        return Shard(
            tenant_id=data["tenantId"], id=data["shardId"], shard_type_id=data["shardTypeId"], text=data["text"]
        )
    except (JobError, ValueError) as exc:
        raise _RejectedLine(str(exc)) from exc


def _read_folder(root: Path, default_tenant: str) -> Iterator[Shard | Rejected]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        relative = path.relative_to(root)
        tenant = relative.parts[0] if len(relative.parts) > 1 else default_tenant
        try:
            text = path.read_text(encoding="utf-8")
            yield Shard(tenant_id=tenant, id=shard_id_from_path(path), shard_type_id="document", text=text)
        except (OSError, UnicodeDecodeError, JobError) as exc:
            yield Rejected(str(path), str(exc))
