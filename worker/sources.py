"""Reading shards to ingest: JSON Lines (a file or stdin) or a folder of text files."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs.errors import JobError
from worker.producer import shard_id_from_path
from worker.shards import Shard

TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".text"})


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input record that is not a valid shard, and why."""

    where: str
    reason: str


def read_shards(source: str, default_tenant: str = "default") -> Iterator[Shard | Rejected]:
    """Shards from a .jsonl file, '-' (JSON Lines on stdin), or a folder of text files.

    JSON Lines records: {"tenantId", "shardId", "shardTypeId" (default "document"), "text"}.
    In a folder, each sub-folder is a tenant; files at the top level belong to default_tenant.
    """
    if source == "-":
        yield from _read_jsonl(sys.stdin, "<stdin>")
        return
    path = Path(source)
    if path.is_dir():
        yield from _read_folder(path, default_tenant)
        return
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or folder")
    with path.open(encoding="utf-8") as lines:
        yield from _read_jsonl(lines, str(path))


def _read_jsonl(lines: Iterable[str], name: str) -> Iterator[Shard | Rejected]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Rejected(where, f"not JSON: {exc.msg}")
            continue
        if not isinstance(data, dict):
            yield Rejected(where, "a record must be a JSON object")
            continue
        text = data.get("text")
        if not isinstance(text, str):
            yield Rejected(where, "field 'text' must be a string")
            continue
        try:
            yield Shard(
                tenant_id=str(data.get("tenantId") or ""),
                id=str(data.get("shardId") or ""),
                shard_type_id=data.get("shardTypeId", "document"),
                text=text,
            )
        except (JobError, TypeError) as exc:
            yield Rejected(where, str(exc))


def _read_folder(root: Path, default_tenant: str) -> Iterator[Shard | Rejected]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        relative = path.relative_to(root)
        tenant = relative.parts[0] if len(relative.parts) > 1 else default_tenant
        try:
            text = path.read_text(encoding="utf-8")
            yield Shard(tenant_id=tenant, id=shard_id_from_path(path), shard_type_id="document", text=text)
        except (OSError, UnicodeDecodeError, JobError) as exc:
            yield Rejected(str(path), str(exc))
