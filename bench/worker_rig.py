"""What the worker benchmarks share: the sample corpus grown to N shards, and the CLI's environment.

The bundled sample (embedding_jobs/sample/shards.jsonl: 45 documents of about 1.9k characters)
is cycled to the size a benchmark needs, each copy with its own shard id and spread over
TENANTS tenants, so every job is a distinct shard with realistic text.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from worker.shards import Shard
from worker.sources import Rejected, read_shards

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "embedding_jobs" / "sample" / "shards.jsonl"
TENANTS = 10


def sample_shards(count: int, tenants: int = TENANTS) -> list[Shard]:
    """count shards cycling through the sample's texts, with distinct ids over `tenants` tenants."""
    texts: list[Shard] = []
    for item in read_shards(str(SAMPLE)):
        if isinstance(item, Rejected):
            raise ValueError(f"the bundled sample has a bad record: {item.where}: {item.reason}")
        texts.append(item)
    return [
        Shard(
            tenant_id=f"tenant-{i % tenants}",
            id=f"{texts[i % len(texts)].id}-{i:05d}",
            shard_type_id=texts[i % len(texts)].shard_type_id,
            text=texts[i % len(texts)].text,
        )
        for i in range(count)
    ]


def write_jsonl(path: Path, shards: Sequence[Shard]) -> Path:
    """Write shards as the JSON Lines `embedding-jobs ingest` reads; return path."""
    with path.open("w", encoding="utf-8") as out:
        for shard in shards:
            record = {"tenantId": shard.tenant_id, "shardId": shard.id, "shardTypeId": shard.shard_type_id}
            out.write(json.dumps(record | {"text": shard.text}) + "\n")
    return path


def cli_env() -> dict[str, str]:
    """The environment for `python -m embedding_jobs`: this checkout's code, no inherited settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDDING_JOBS_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def run_cli(*args: str, log: Path) -> float:
    """Run `embedding-jobs ARGS` to the end, output to log; the CPU seconds it used (all its threads).

    RuntimeError with the log's tail if it fails. The CPU figure is the growth of this process's
    children's usage, so it holds only while no other child of this process ends meanwhile.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "embedding_jobs", *args], env=cli_env(), cwd=REPO, stdout=out, stderr=out
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"embedding-jobs {' '.join(args)} exited with {done.returncode}:\n{tail}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
