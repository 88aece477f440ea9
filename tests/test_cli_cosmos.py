"""The command line on Cosmos DB: init-db, up and the feeder, as an operator runs them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from embedding_jobs.backends import open_backends
from embedding_jobs.cosmos import run_init_db
from jobs.cosmos_store import CosmosJobStore
from jobs.settings import Settings
from tests.components import wait_until
from tests.conftest import CosmosDatabase
from tests.helpers.cli import cli_env, cosmos_env, run_cli
from worker.cosmos_feed import CosmosShardFeed
from worker.cosmos_shards import CosmosShardStore
from worker.shards import Shard, SQLiteShardStore


def test_init_db_creates_then_finds_the_containers(tmp_path: Path, cosmos_db: CosmosDatabase) -> None:
    first = run_cli(tmp_path, "init-db", **cosmos_env(cosmos_db))
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    assert "embedding-jobs" in first.stdout
    second = run_cli(tmp_path, "init-db", **cosmos_env(cosmos_db))
    assert second.returncode == 0, second.stderr
    assert "created" not in second.stdout
    assert cosmos_db.server.key not in first.stdout + first.stderr + second.stdout + second.stderr


def test_up_runs_the_sample_corpus_on_cosmos(tmp_path: Path, cosmos_db: CosmosDatabase) -> None:
    assert run_cli(tmp_path, "init-db", **cosmos_env(cosmos_db)).returncode == 0
    result = run_cli(tmp_path, "up", "--exit-when-idle", "--exporter-port", "0", **cosmos_env(cosmos_db))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.strip().splitlines()[1:]}
    assert rows == {tenant: ["0", "0", "15", "0", "0"] for tenant in ("acme", "globex", "initech")}
    stats = run_cli(tmp_path, "jobs", "stats", "--tenant", "acme", "--output", "json", **cosmos_env(cosmos_db))
    assert json.loads(stats.stdout) == {
        "acme": {"pending": 0, "processing": 0, "completed": 15, "failed": 0, "dead_lettered": 0}
    }


async def test_feeder_enqueues_shards_written_to_the_local_store(tmp_path: Path) -> None:
    shards = await SQLiteShardStore.open(tmp_path / "embedding-jobs.db")
    for n in range(3):
        await shards.put(Shard(tenant_id="acme", id=f"s{n}", shard_type_id="document", text=f"text {n}"))
    await shards.close()
    feeder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedding_jobs",
        "feeder",
        "--poll-interval",
        "0.05",
        env=cli_env(tmp_path),
        stderr=subprocess.PIPE,
    )
    try:
        stderr = ""

        def all_listed() -> bool:
            nonlocal stderr
            listed = run_cli(tmp_path, "jobs", "list", "--tenant", "acme", "--output", "json")
            stderr = listed.stderr
            return len(listed.stdout.splitlines()) == 3

        await wait_until(all_listed, "the feeder to create 3 jobs", within=30, interval=0.05, detail=lambda: stderr)
    finally:
        feeder.terminate()
        _, err = await asyncio.wait_for(feeder.communicate(), 20)
    assert feeder.returncode == 0, err.decode()
    work = run_cli(tmp_path, "worker", "--exit-when-idle")
    assert work.returncode == 0, work.stderr
    final = run_cli(tmp_path, "jobs", "stats", "--tenant", "acme", "--output", "json")
    assert json.loads(final.stdout)["acme"]["completed"] == 3


async def test_the_feeder_keeps_its_state_in_the_configured_leases_container(
    tmp_path: Path, cosmos_db: CosmosDatabase
) -> None:
    env = {**cosmos_env(cosmos_db), "EMBEDDING_JOBS_COSMOS_LEASES_CONTAINER": "feeder-state"}
    init = run_cli(tmp_path, "init-db", **env)
    assert init.returncode == 0, init.stderr
    shards = await CosmosShardStore.open(client=cosmos_db.client, database=cosmos_db.name)
    for n in range(2):
        await shards.put(Shard(tenant_id="acme", id=f"s{n}", shard_type_id="document", text=f"text {n}"))
    database = cosmos_db.client.get_database_client(cosmos_db.name)
    state = database.get_container_client("feeder-state")

    async def state_ids() -> list[str]:
        return sorted([doc["id"] async for doc in state.query_items("SELECT c.id FROM c")])

    feeder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedding_jobs",
        "feeder",
        "--poll-interval",
        "0.05",
        env=cli_env(tmp_path, **env),
        stderr=subprocess.PIPE,
    )
    try:

        async def fed() -> bool:
            # A feeder that exits on its own is reported below, with its error.
            return feeder.returncode is not None or "feeder:position" in await state_ids()

        await wait_until(fed, "the feeder to record its position", within=30)
    finally:
        if feeder.returncode is None:
            feeder.terminate()
        _, err = await asyncio.wait_for(feeder.communicate(), 20)
    assert feeder.returncode == 0, err.decode()
    assert await state_ids() == ["feeder:acme:s0", "feeder:acme:s1", "feeder:position"]
    assert "leases" not in [container["id"] async for container in database.list_containers()]
    listed = run_cli(tmp_path, "jobs", "list", "--tenant", "acme", "--output", "json", **env)
    assert sorted(json.loads(line)["shardId"] for line in listed.stdout.splitlines()) == ["s0", "s1"]


async def test_the_feed_shares_the_client_the_stores_opened(tmp_path: Path, cosmos_db: CosmosDatabase) -> None:
    settings = Settings(
        store="cosmos",
        cosmos_endpoint=cosmos_db.server.endpoint,
        cosmos_key=cosmos_db.server.key,
        cosmos_database=cosmos_db.name,
        cosmos_leases_container="feeder-state",
        data_dir=tmp_path,
    )
    await run_init_db(settings)
    async with open_backends(settings, feed=True) as backends:
        assert isinstance(backends.feed, CosmosShardFeed)
        assert isinstance(backends.store, CosmosJobStore)
        assert backends.feed.leases.id == "feeder-state"
        assert backends.feed.shards.client_connection is backends.store.container.client_connection
