"""The command line as a user runs it: real processes on a temporary data folder."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpServer

from jobs.model import JobStatus
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import empty_stats
from tests.components import wait_until
from tests.helpers.cli import cli_env, run_cli

S = JobStatus


async def stats(data_dir: Path) -> dict[str, dict[JobStatus, int]]:
    async with await SQLiteJobStore.open(data_dir / "embedding-jobs.db") as store:
        return await store.stats_all()


async def test_up_processes_the_sample_corpus_and_prints_a_summary(tmp_path: Path) -> None:
    first = run_cli(tmp_path, "up", "--exit-when-idle")
    assert first.returncode == 0, first.stderr
    assert "45 shards read, 45 jobs enqueued" in first.stderr
    assert "queue drained" in first.stderr
    rows = {line.split()[0]: line.split()[1:] for line in first.stdout.strip().splitlines()[1:]}
    assert rows == {tenant: ["0", "0", "15", "0", "0"] for tenant in ("acme", "globex", "initech")}
    # Running again finds nothing new to embed.
    second = run_cli(tmp_path, "up", "--exit-when-idle")
    assert second.returncode == 0, second.stderr
    assert "45 shards read, 0 jobs enqueued, 45 unchanged" in second.stderr
    assert (await stats(tmp_path))["acme"] == {**empty_stats(), S.COMPLETED: 15}


def test_ingest_reports_bad_lines_with_their_position_and_keeps_the_good_ones(tmp_path: Path) -> None:
    lines = [
        {"tenantId": "t1", "shardId": "a", "text": "alpha"},
        "not json",
        {"tenantId": "bad tenant", "shardId": "b", "text": "beta"},
        {"tenantId": "t1", "shardId": "c"},
        {"tenantId": "t1", "shardId": "d", "shardTypeId": "note", "text": "delta"},
    ]
    source = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    result = run_cli(tmp_path, "ingest", "-", stdin=source)
    assert result.returncode == 1
    assert "rejected <stdin>:2: not JSON" in result.stderr
    assert "rejected <stdin>:3: tenant id 'bad tenant' may contain only" in result.stderr
    assert "rejected <stdin>:4: field 'text' must be a string" in result.stderr
    assert "2 shards read, 2 jobs enqueued, 0 unchanged, 3 rejected" in result.stderr
    listed = run_cli(tmp_path, "jobs", "list", "--tenant", "t1", "--output", "json")
    assert listed.returncode == 0
    assert sorted(json.loads(line)["shardId"] for line in listed.stdout.splitlines()) == ["a", "d"]


def test_ingest_folder_uses_subfolders_as_tenants(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "tenant-x").mkdir(parents=True)
    (corpus / "tenant-x" / "First Doc.txt").write_text("one")
    (corpus / "loose.md").write_text("two")
    (corpus / "ignored.bin").write_bytes(b"\x00")
    result = run_cli(tmp_path / "data", "ingest", str(corpus), "--tenant", "fallback")
    assert result.returncode == 0, result.stderr
    stats_out = run_cli(tmp_path / "data", "jobs", "stats")
    rows = {line.split()[0]: line.split()[1] for line in stats_out.stdout.strip().splitlines()[1:]}
    assert rows == {"fallback": "1", "tenant-x": "1"}
    listed = run_cli(tmp_path / "data", "jobs", "list", "--tenant", "tenant-x", "--output", "json")
    assert json.loads(listed.stdout)["shardId"] == "First-Doc"


def test_command_help_is_short_and_config_help_describes_every_setting(tmp_path: Path) -> None:
    for command in ("worker", "exporter", "up", "jobs", "ingest"):
        result = run_cli(tmp_path, command, "--help")
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.splitlines()) <= 40, (command, result.stdout)
        assert "--data-dir" in result.stdout
        assert "embedding-jobs config --help" in result.stdout
    described = run_cli(tmp_path, "config", "--help")
    for flag, env in [("--max-attempts", "EMBEDDING_JOBS_MAX_ATTEMPTS"), ("--queue", "EMBEDDING_JOBS_QUEUE")]:
        assert flag in described.stdout
        assert env in described.stdout


def test_help_shows_a_secret_as_set_only_when_its_variable_is_set(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "config", "--help", EMBEDDING_JOBS_OTLP_TOKEN="s3cret")
    text = " ".join(result.stdout.split())
    assert "EMBEDDING_JOBS_OTLP_TOKEN; (set)" in text
    assert "EMBEDDING_JOBS_OPENAI_API_KEY; (unset)" in text
    assert "EMBEDDING_JOBS_METRICS_TOKEN; (unset)" in text
    assert "s3cret" not in result.stdout
    shown = run_cli(tmp_path, "config", "--output", "json", EMBEDDING_JOBS_OTLP_TOKEN="s3cret")
    values = json.loads(shown.stdout)
    assert (values["otlp_token"], values["metrics_token"]) == ("***", "")


def test_version_and_case_insensitive_choices(tmp_path: Path) -> None:
    version = run_cli(tmp_path, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == "embedding-jobs 0.1.0"
    for env, flags in [({"EMBEDDING_JOBS_LOG_LEVEL": "debug"}, ()), ({}, ("--log-level", "Error"))]:
        result = run_cli(tmp_path, "config", "--output", "json", *flags, **env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["log_level"] in ("DEBUG", "ERROR")
    refused = run_cli(tmp_path, "config", EMBEDDING_JOBS_LOG_LEVEL="loud")
    assert refused.returncode == 2
    assert "log_level must be one of DEBUG, INFO, WARNING, ERROR; got 'loud'" in refused.stderr


def test_invalid_settings_get_a_clear_error(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "worker", EMBEDDING_JOBS_CONCURRENCY="zero")
    assert result.returncode == 2
    assert "concurrency: 'zero' is not a valid int" in result.stderr
    result = run_cli(tmp_path, "worker", "--max-attempts", "0")
    assert result.returncode == 2
    assert "max_attempts must be at least 1" in result.stderr
    result = run_cli(tmp_path, "exporter", EMBEDDING_JOBS_EXPORTER_PORT="99999")
    assert result.returncode == 2
    assert "exporter_port must be between 0 and 65535" in result.stderr
    assert "Traceback" not in result.stderr


def test_exporter_that_cannot_bind_exits_2_with_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_cli(tmp_path, "exporter", EMBEDDING_JOBS_EXPORTER_PORT=str(port), EMBEDDING_JOBS_OTLP_PORT="0")
        assert busy.returncode == 2, busy.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr
        assert "Traceback" not in busy.stderr
    # An address the resolver cannot even encode (a label past 63 characters).
    bad_host = run_cli(
        tmp_path, "exporter", EMBEDDING_JOBS_EXPORTER_HOST="a" * 64 + ".example", EMBEDDING_JOBS_OTLP_PORT="0"
    )
    assert bad_host.returncode == 2, bad_host.stderr
    assert "cannot listen on aaaa" in bad_host.stderr
    assert "Traceback" not in bad_host.stderr


async def test_jobs_commands_print_a_table_or_json_with_output(tmp_path: Path) -> None:
    corpus = "\n".join(
        json.dumps({"tenantId": t, "shardId": f"s{n}", "text": f"doc {n}"}) for t in "ab" for n in range(2)
    )
    assert run_cli(tmp_path, "ingest", "-", stdin=corpus).returncode == 0
    for tenant_args in ((), ("--tenant", "a")):
        table = run_cli(tmp_path, "jobs", "stats", *tenant_args)
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.strip().splitlines()
        assert header.split() == ["tenant", "pending", "processing", "completed", "failed", "dead_lettered"]
        expected_rows = {"a": ["2", "0", "0", "0", "0"], "b": ["2", "0", "0", "0", "0"]}
        if tenant_args:
            del expected_rows["b"]
        assert {row.split()[0]: row.split()[1:] for row in rows} == expected_rows
        as_json = json.loads(run_cli(tmp_path, "jobs", "stats", *tenant_args, "--output", "json").stdout)
        assert set(as_json) == set(expected_rows)
        assert as_json["a"] == {"pending": 2, "processing": 0, "completed": 0, "failed": 0, "dead_lettered": 0}
    listed = run_cli(tmp_path, "jobs", "list", "--tenant", "b")
    header, *rows = listed.stdout.strip().splitlines()
    assert header.split() == ["id", "status", "retries", "updated", "shard"]
    assert sorted(row.split()[-1] for row in rows) == ["s0", "s1"]
    assert all(row.split()[1] == "pending" for row in rows)
    lines = run_cli(tmp_path, "jobs", "list", "--tenant", "b", "--output", "json").stdout.splitlines()
    assert sorted(json.loads(line)["shardId"] for line in lines) == ["s0", "s1"]
    wrong = run_cli(tmp_path, "jobs", "stats", "--output", "yaml")
    assert wrong.returncode == 2
    assert "invalid choice: 'yaml'" in wrong.stderr


@pytest.fixture
async def slow_embeddings(aiohttp_server: AiohttpServer) -> str:
    """An OpenAI-compatible embeddings endpoint that takes 20 ms per request."""

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(0.02)  # the service's latency, not synchronisation
        data = [{"index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(body["input"]))]
        return web.json_response({"data": data, "model": body["model"]})

    app = web.Application()
    app.router.add_post("/embeddings", embeddings)
    server = await aiohttp_server(app)
    return str(server.make_url("/"))


async def test_sigterm_mid_run_leaves_no_job_behind_after_restart(tmp_path: Path, slow_embeddings: str) -> None:
    corpus = "\n".join(
        json.dumps({"tenantId": "t", "shardId": f"s{n}", "text": f"document number {n}"}) for n in range(150)
    )
    assert run_cli(tmp_path, "ingest", "-", stdin=corpus).returncode == 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "embedding_jobs",
        "worker",
        "--embedder",
        "openai",
        "--openai-endpoint",
        slow_embeddings,
        "--concurrency",
        "2",
        env=cli_env(tmp_path),
        stderr=subprocess.PIPE,
    )

    async def progressed() -> bool:
        return (await stats(tmp_path)).get("t", empty_stats())[S.COMPLETED] >= 10

    await wait_until(progressed, "the worker to complete 10 jobs", within=30, interval=0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()
    midway = (await stats(tmp_path))["t"]
    assert midway[S.COMPLETED] < 150, "the worker finished before the signal; the test proves nothing"
    assert midway[S.PROCESSING] == 0
    restart = run_cli(tmp_path, "worker", "--exit-when-idle")
    assert restart.returncode == 0, restart.stderr
    final = (await stats(tmp_path))["t"]
    assert final == {**empty_stats(), S.COMPLETED: 150}
    async with await SQLiteJobStore.open(tmp_path / "embedding-jobs.db") as store:
        assert await store.recount() == {"t": final}
