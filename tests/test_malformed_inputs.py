"""Malformed input on every path: a clear refusal for the bad item, and nothing else lost or stuck.

One named list of cases per input path — queue messages, ingest lines, continuation tokens,
Authorization headers, OTLP bodies — and a hypothesis fuzz of the API's query parameters,
path segments and headers. docs/reliability.md reports the number of cases in each list.
Everything runs against the real parts: SQLite, the Cosmos test server, the Service Bus test
peer driven by the real SDK, the real aiohttp app on a socket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from azure.servicebus.aio import ServiceBusClient
from azure.servicebus.amqp import AmqpAnnotatedMessage, AmqpMessageProperties
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp.plugin import AiohttpClient

from exporter.app import create_app
from jobs import telemetry as attr
from jobs.errors import InvalidContinuationError
from jobs.model import Job, JobStatus
from jobs.settings import Settings
from jobs.sqlite_store import SQLiteJobStore
from jobs.store import JobStore, Position, encode_continuation
from jobs.telemetry import Outcome
from tests.helpers.cli import run_cli
from tests.helpers.metrics import job_span_request, receiver_of, sample
from tests.pipeline import QUEUE_KINDS, Pipeline, pipeline
from worker.consumer import REASON_MALFORMED
from worker.local_queue import LocalQueue
from worker.messages import MAX_ATTEMPT, MAX_BODY_BYTES, JobMessage
from worker.reconciler import reconcile_dead_letters
from worker.shards import Shard
from worker.sources import Rejected, read_shards

S = JobStatus
Client = TestClient[web.Request, web.Application]
TEXT = "Malformed neighbours must not cost this shard its embedding."


def deep(levels: int, inner: str = "1") -> str:
    """JSON arrays nested levels deep around inner."""
    return "[" * levels + inner + "]" * levels


# -- queue messages ---------------------------------------------------------------------

GOOD_IDS = {"jobId": "job-1", "tenantId": "tenant-a", "shardId": "shard-1", "shardTypeId": "document"}


def message(**changes: Any) -> bytes:
    """A job message body with fields replaced (None removes one)."""
    fields = {**GOOD_IDS, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


def raw_message(tail: str) -> bytes:
    """A job message body with tail spliced in as raw JSON text after the ids."""
    return (json.dumps(GOOD_IDS)[:-1] + ", " + tail + "}").encode()


# (name, body, what the dead-letter description must say)
QUEUE_CASES: list[tuple[str, bytes, str]] = [
    ("empty-body", b"", "not JSON"),
    ("invalid-utf8", b'{"jobId": "\xff\xfe"}', "invalid UTF-8 at byte 11"),
    ("utf16-body", message().decode().encode("utf-16"), "invalid UTF-8"),
    ("truncated-json", message()[:-3], "not JSON"),
    ("json-array", b"[1, 2]", "must be a JSON object"),
    ("json-string", b'"job-1"', "must be a JSON object"),
    ("json-null", b"null", "must be a JSON object"),
    ("nested-2kb-of-brackets", b"[" * 2048, "nested deeper than"),
    ("nested-field", raw_message('"extra": ' + deep(100)), "nested deeper than"),
    ("attempt-1e30", raw_message(f'"attempt": {10**30}'), "outside the 64-bit range"),
    ("attempt-4400-digits", raw_message('"attempt": ' + "9" * 4400), "outside the 64-bit range"),
    ("attempt-above-bound", message(attempt=MAX_ATTEMPT + 1), f"from 0 to {MAX_ATTEMPT}"),
    ("attempt-2^62", message(attempt=2**62), f"from 0 to {MAX_ATTEMPT}"),
    ("attempt-negative", message(attempt=-1), f"from 0 to {MAX_ATTEMPT}"),
    ("attempt-float", message(attempt=1.5), "attempt must be an integer"),
    ("attempt-bool", message(attempt=True), "attempt must be an integer"),
    ("attempt-string", message(attempt="1"), "attempt must be an integer"),
    ("attempt-nan", raw_message('"attempt": NaN'), "NaN is not a JSON value"),
    ("attempt-1e400", raw_message('"attempt": 1e400'), "out of range"),
    ("jobId-number", message(jobId=7), "jobId is a number"),
    ("tenantId-true", message(tenantId=True), "tenantId is a boolean"),
    ("tenantId-number", message(tenantId=123), "tenantId is a number"),
    ("tenantId-object", message(tenantId={"id": "tenant-a"}), "tenantId is an object"),
    ("shardId-array", message(shardId=["shard-1"]), "shardId is an array"),
    ("shardTypeId-null", message(shardTypeId=None) + b"", "missing field(s): shardTypeId"),
    ("missing-ids", b'{"jobId": "job-1"}', "missing field(s): tenantId, shardId, shardTypeId"),
    ("tenant-path-traversal", message(tenantId="../tenant-b"), "tenant id"),
    ("tenant-too-long", message(tenantId="t" * 65), "tenant id is 65 characters"),
    ("jobId-unpaired-surrogate", message(jobId="?").replace(b'"?"', b'"\\ud800"'), "unpaired"),
    ("duplicate-tenantId", raw_message('"tenantId": "tenant-b"'), "appears more than once"),
    ("over-64kb", message(padding="x" * MAX_BODY_BYTES), f"at most {MAX_BODY_BYTES} allowed"),
]

# Service Bus only: bodies that are AMQP value or sequence sections, not data.
SERVICEBUS_BODY_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("amqp-value-int", {"value_body": 42}, "int value"),
    ("amqp-value-map", {"value_body": {"jobId": "job-1"}}, "dict value"),
    ("amqp-value-list", {"value_body": [1, 2, 3]}, "list value"),
    ("amqp-sequence", {"sequence_body": [[1, 2], [3]]}, "a sequence"),
]

PipelineFactory = Callable[..., AbstractAsyncContextManager[Pipeline]]


@pytest.fixture(params=QUEUE_KINDS)
def queue_kind(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """Each queue: the local SQLite queue, and Service Bus through its test peer and the real SDK."""
    kind = request.param
    return kind, request.getfixturevalue("servicebus_peer") if kind == "servicebus" else None


async def handle_everything(p: Pipeline, expected: int, within: float = 30.0) -> dict[str, tuple[int, Outcome]]:
    """Receive and hand each message to Consumer.handle until expected were handled: id -> (delivery, outcome)."""
    handled: dict[str, tuple[int, Outcome]] = {}
    deadline = asyncio.get_running_loop().time() + within
    while len(handled) < expected:
        assert asyncio.get_running_loop().time() < deadline, f"only {sorted(handled)} handled"
        for received in await p.queue.receive(max_messages=16, max_wait=0.2):
            assert received.message_id not in handled, f"{received.message_id} was delivered twice"
            # handle must return an outcome for anything at all: an exception here fails the test.
            handled[received.message_id] = (received.delivery_count, await p.consumer.handle(received))
    return handled


async def send_amqp_bodies(peer: Any, queue_name: str) -> None:
    async with (
        ServiceBusClient.from_connection_string(peer.connection_string) as client,
        client.get_queue_sender(queue_name) as sender,
    ):
        for name, body, _ in SERVICEBUS_BODY_CASES:
            await sender.send_messages(AmqpAnnotatedMessage(**body, properties=AmqpMessageProperties(message_id=name)))
        # A text body in a value section (as JMS producers send it) is read as its text.
        good = JobMessage("job-text-value", "tenant-a", "shard-text-value", "document")
        await sender.send_messages(
            AmqpAnnotatedMessage(
                value_body=good.to_body().decode(), properties=AmqpMessageProperties(message_id=good.message_id)
            )
        )


async def test_every_malformed_message_is_dead_lettered_on_its_first_delivery(
    queue_kind: tuple[str, Any], tmp_path: Path
) -> None:
    kind, peer = queue_kind
    async with pipeline(tmp_path, queue_kind=kind, peer=peer) as p:
        good = [await p.ingest("tenant-a", "shard-before", TEXT)]
        for name, body, _ in QUEUE_CASES:
            await p.queue.send(body, message_id=name)
        bad = [name for name, _, _ in QUEUE_CASES]
        if kind == "servicebus":
            await p.shards.put(Shard(tenant_id="tenant-a", id="shard-text-value", shard_type_id="document", text=TEXT))
            await send_amqp_bodies(peer, p.queue.name)
            bad += [name for name, _, _ in SERVICEBUS_BODY_CASES]
        good.append(await p.ingest("tenant-a", "shard-after", TEXT + " after"))
        # A byte-order mark before the JSON is tolerated (RFC 8259 allows a parser to ignore it).
        with_bom = JobMessage("job-with-bom", "tenant-a", "shard-before", "document")
        await p.queue.send(b"\xef\xbb\xbf" + with_bom.to_body(), message_id=with_bom.job_id)
        good_ids = [job.id for job in good] + ["job-with-bom"] + (["job-text-value"] if kind == "servicebus" else [])

        handled = await handle_everything(p, len(bad) + len(good_ids))

        assert {name: handled[name] for name in bad} == dict.fromkeys(bad, (1, Outcome.DEAD_LETTERED))
        assert {job_id: handled[job_id] for job_id in good_ids} == dict.fromkeys(good_ids, (1, Outcome.COMPLETED))
        letters = {letter.message_id: letter for letter in await p.queue.peek_dead_letters()}
        assert sorted(letters) == sorted(bad)
        expected = {name: complaint for name, _, complaint in QUEUE_CASES}
        if kind == "servicebus":
            expected |= {name: complaint for name, _, complaint in SERVICEBUS_BODY_CASES}
        wrong = {
            name: (letter.reason, letter.description)
            for name, letter in letters.items()
            if letter.reason != REASON_MALFORMED or expected[name] not in letter.description
        }
        assert wrong == {}
        assert all(len(letter.description) <= 1024 for letter in letters.values())
        for job_id in good_ids:
            assert (await p.store.get("tenant-a", job_id)).status is S.COMPLETED
        # No malformed message made a job; none is left pending or processing.
        assert await p.store.stats_all() == {"tenant-a": {**dict.fromkeys(S, 0), S.COMPLETED: len(good_ids)}}
        depth = await p.depth()
        assert (depth.active, depth.scheduled) == (0, 0)
        assert p.tracker.buffered == 0


@pytest.mark.parametrize("refused", ["begin", "complete"])
async def test_an_unexpected_store_error_is_a_failed_attempt_and_the_message_still_settles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, refused: str
) -> None:
    # The real SQLite file refuses one job's writes with an error that is no outage: a trigger
    # aborting the update (IntegrityError, a value the store will never take). The consumer's
    # handling does not depend on the queue, so the local one suffices.
    async with pipeline(tmp_path) as p:
        job = await p.ingest("tenant-a", "shard-refused", TEXT)
        other = await p.ingest("tenant-a", "shard-fine", TEXT + " fine")
        status = "processing" if refused == "begin" else "completed"

        def refuse() -> None:
            with contextlib.closing(sqlite3.connect(tmp_path / "pipeline.db", isolation_level=None)) as conn:
                conn.execute(
                    f"CREATE TRIGGER refuse BEFORE UPDATE ON jobs WHEN NEW.id = '{job.id}' "
                    f"AND NEW.status = '{status}' BEGIN SELECT RAISE(ABORT, 'refused by policy'); END"
                )

        await asyncio.to_thread(refuse)
        with caplog.at_level(logging.ERROR, logger="worker.consumer"):
            p.start()
            await p.wait_for_status("tenant-a", other.id, S.COMPLETED)

            async def settled() -> bool:
                return len(await p.queue.peek_dead_letters()) == 1

            await p.wait_until(settled, "the refused job's message to be dead-lettered")
            await p.wait_idle()
        [letter] = await p.queue.peek_dead_letters()
        assert letter.reason == "MaxAttemptsExceeded"
        assert "refused by policy" in letter.description
        outcomes = [(s.attributes or {}).get(attr.OUTCOME) for s in p.job_spans()]
        assert sorted(outcomes, key=str) == ["completed", "dead_lettered", "failed", "failed"]
        tracebacks = [r for r in caplog.records if r.exc_info and "refused by policy" in str(r.exc_info[1])]
        assert tracebacks, "the unexpected error was not logged with its traceback"
        # Never left in processing. Refused at the end, the attempts are recorded failed and the job
        # finally dead_lettered by the normal retry path. Refused at the start, it never left
        # pending, and the dead-letter reconciler settles it from the dead-lettered message.
        assert (await p.store.get("tenant-a", job.id)).status is (S.PENDING if refused == "begin" else S.DEAD_LETTERED)
        await reconcile_dead_letters(p.queue, p.store)
        assert (await p.store.get("tenant-a", job.id)).status is S.DEAD_LETTERED
        counts = {**dict.fromkeys(S, 0), S.COMPLETED: 1, S.DEAD_LETTERED: 1}
        assert await p.store.stats_all() == {"tenant-a": counts}
        assert await p.store.recount("tenant-a") == {"tenant-a": counts}


# -- ingest -----------------------------------------------------------------------------


def line(**changes: Any) -> bytes:
    """An ingest record with fields replaced (None removes one)."""
    fields = {"tenantId": "tenant-a", "shardId": "shard-x", "text": TEXT, **changes}
    return json.dumps({k: v for k, v in fields.items() if v is not None}).encode()


def raw_line(tail: str) -> bytes:
    return (json.dumps({"tenantId": "tenant-a", "shardId": "shard-x", "text": TEXT})[:-1] + ", " + tail + "}").encode()


# (name, line, what the rejection must say)
INGEST_CASES: list[tuple[str, bytes, str]] = [
    ("invalid-utf8", b'{"tenantId": "tenant-a", "shardId": "s", "text": "caf\xe9"}', "invalid UTF-8 at byte 53"),
    ("truncated-utf8-sequence", line(text="x")[:-3] + b'\xe2\x82"}', "invalid UTF-8"),
    ("not-json", b"tenantId=tenant-a", "not JSON"),
    ("nested-5000", deep(5000).encode(), "nested deeper than"),
    ("nested-field", raw_line('"meta": ' + deep(40)), "nested deeper than"),
    ("json-array", b'["tenant-a", "shard-x", "text"]', "must be a JSON object"),
    ("tenantId-number", line(tenantId=123), "field 'tenantId' must be a string; it is a number"),
    ("tenantId-true", line(tenantId=True), "field 'tenantId' must be a string; it is a boolean"),
    ("tenantId-missing", line(tenantId=None), "field 'tenantId' must be a string; it is missing"),
    ("shardId-number", line(shardId=7), "field 'shardId' must be a string; it is a number"),
    ("shardTypeId-null", raw_line('"shardTypeId": null'), "field 'shardTypeId' must be a string; it is null"),
    ("text-array", line(text=["a", "b"]), "field 'text' must be a string; it is an array"),
    ("text-missing", line(text=None), "field 'text' must be a string; it is missing"),
    ("integer-4400-digits", raw_line('"size": ' + "9" * 4400), "outside the 64-bit range"),
    ("nan", raw_line('"score": NaN'), "NaN is not a JSON value"),
    ("unpaired-surrogate-text", raw_line('"text": "\\udc00"').replace(f'"text": "{TEXT}", '.encode(), b""), "unpaired"),
    ("duplicate-tenantId", raw_line('"tenantId": "tenant-b"'), "appears more than once"),
    ("unsafe-tenant", line(tenantId="tenant a"), "tenant id 'tenant a' may contain only"),
    ("unsafe-shardId", line(shardId="../../etc/passwd"), "shard id must be"),
]


@pytest.mark.parametrize(("name", "bad", "complaint"), INGEST_CASES, ids=[c[0] for c in INGEST_CASES])
def test_a_malformed_ingest_line_is_rejected_at_its_position_and_the_file_read_on(
    tmp_path: Path, name: str, bad: bytes, complaint: str
) -> None:
    source = tmp_path / "shards.jsonl"
    source.write_bytes(b"\n".join([line(shardId="before"), bad, line(shardId="after")]) + b"\n")

    items = list(read_shards(str(source)))

    assert [type(item).__name__ for item in items] == ["Shard", "Rejected", "Shard"]
    before, rejected, after = items
    assert isinstance(rejected, Rejected)
    assert rejected.where == f"{source}:2"
    assert complaint in rejected.reason
    assert isinstance(before, Shard)
    assert isinstance(after, Shard)
    assert (before.id, after.id) == ("before", "after")


def test_ingest_rejects_every_malformed_line_and_ingests_every_good_one(tmp_path: Path) -> None:
    lines = [b"\xef\xbb\xbf" + line(shardId="good-0")]  # a byte-order mark at the start is tolerated
    for n, (_, bad, _) in enumerate(INGEST_CASES, start=1):
        lines += [bad, line(shardId=f"good-{n}")]
    source = tmp_path / "shards.jsonl"
    source.write_bytes(b"\n".join(lines))

    result = run_cli(tmp_path / "data", "ingest", str(source))

    assert result.returncode == 1, result.stderr
    reported = dict(
        row.removeprefix("rejected ").split(": ", 1)
        for row in result.stderr.splitlines()
        if row.startswith("rejected ")
    )
    expected = {f"{source}:{2 * n}": complaint for n, (_, _, complaint) in enumerate(INGEST_CASES, start=1)}
    assert sorted(reported) == sorted(expected)
    assert {where: why for where, why in reported.items() if expected[where] not in why} == {}
    assert "Traceback" not in result.stderr
    good = len(INGEST_CASES) + 1
    assert f"{good} shards read, {good} jobs enqueued, 0 unchanged, {len(INGEST_CASES)} rejected" in result.stderr
    listed = run_cli(tmp_path / "data", "jobs", "list", "--tenant", "tenant-a", "--limit", "100", "--output", "json")
    assert sorted(json.loads(row)["shardId"] for row in listed.stdout.splitlines()) == sorted(
        f"good-{n}" for n in range(good)
    )
    # No other tenant came out of a number or a boolean.
    stats = run_cli(tmp_path / "data", "jobs", "stats")
    assert [row.split()[0] for row in stats.stdout.strip().splitlines()[1:]] == ["tenant-a"]


# -- continuation tokens ----------------------------------------------------------------

QUERY = {"t": "tenant-a", "s": None}
AT = "2024-05-01T12:00:00.000Z"


def token(data: Any) -> str:
    """A continuation token with any content at all, encoded as the stores encode theirs."""
    raw = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def position(c: Any, i: Any) -> str:
    return token({"p": {"c": c, "i": i}, "q": QUERY})


CONTINUATION_CASES: list[tuple[str, str]] = [
    ("not-base64", "!!not base64!!"),
    ("non-ascii", "é" + position(AT, "job-1")),
    ("base64-of-text", token(b"hello")),
    ("base64-of-invalid-utf8", token(b'{"q": "\xff"}')),
    ("json-array", token([QUERY, {"c": AT, "i": "job-1"}])),
    ("json-null", token(None)),
    ("position-missing", token({"q": QUERY})),
    ("position-list", token({"p": [AT, "job-1"], "q": QUERY})),
    ("position-string", token({"p": "job-1", "q": QUERY})),
    ("position-extra-key", token({"p": {"c": AT, "i": "job-1", "x": 1}, "q": QUERY})),
    ("extra-top-level-key", token({"p": {"c": AT, "i": "job-1"}, "q": QUERY, "x": 1})),
    ("values-lists", position([AT], ["job-1"])),
    ("values-objects", position({"c": AT}, {"i": "job-1"})),
    ("values-null", position(None, None)),
    ("values-integers", position(1, 2)),
    ("values-above-64-bits", position(2**70, 2**70)),
    ("values-4400-digits", token(b'{"p":{"c":' + b"9" * 4400 + b',"i":"job-1"},"q":{"s":null,"t":"tenant-a"}}')),
    ("values-nested-deep", token(b'{"p":{"c":' + deep(3000).encode() + b',"i":"job-1"},"q":{}}')),
    ("time-free-text", position("yesterday", "job-1")),
    ("time-not-a-date", position("2024-13-45T99:99:99.999Z", "job-1")),
    ("time-other-format", position("2024-05-01 12:00:00", "job-1")),
    ("time-non-ascii-digits", position("\uff12\uff10\uff12\uff14-05-01T12:00:00.000Z", "job-1")),
    ("id-sql-quote", position(AT, "x' OR '1'='1")),
    ("id-too-long", position(AT, "j" * 129)),
    ("id-empty", position(AT, "")),
    ("other-tenant", token({"p": {"c": AT, "i": "job-1"}, "q": {"t": "tenant-b", "s": None}})),
    ("other-status", token({"p": {"c": AT, "i": "job-1"}, "q": {"t": "tenant-a", "s": "failed"}})),
    ("duplicate-keys", token(b'{"p":{"c":"' + AT.encode() + b'","i":"job-1"},"q":{"s":null,"t":"tenant-a"},"q":{}}')),
    ("too-long", "A" * 5000),
]


async def seeded_page(store: JobStore) -> str:
    """Three jobs in tenant-a; the token of the first page of one."""
    for n in range(3):
        await store.create(Job.new(job_id=f"job-{n}", tenant_id="tenant-a", shard_id=f"s{n}", shard_type_id="d"))
    page = await store.list("tenant-a", limit=1)
    assert page.continuation is not None
    return page.continuation


async def test_every_malformed_continuation_token_is_refused_by_both_stores(store: JobStore) -> None:
    good = await seeded_page(store)
    refused: dict[str, str] = {}
    for name, bad in CONTINUATION_CASES:
        try:
            await store.list("tenant-a", limit=1, continuation=bad)
        except InvalidContinuationError:
            refused[name] = "refused"
        except Exception as exc:  # anything else is the bug this test is for
            refused[name] = repr(exc)
    assert refused == dict.fromkeys(refused, "refused")
    assert len(refused) == len(CONTINUATION_CASES)
    # A token the store wrote still pages on.
    assert len((await store.list("tenant-a", limit=1, continuation=good)).items) == 1
    assert encode_continuation(QUERY, Position(AT, "job-1")) == position(AT, "job-1")


TOKEN = "tenant-a-token-123456"
METRICS_TOKEN = "metrics-token-1234567"
OTLP_TOKEN = "otlp-token-12345678"
SECURED = Settings(
    api_tokens=f"{TOKEN}=tenant-a", metrics_token=METRICS_TOKEN, otlp_token=OTLP_TOKEN, metrics_cache_ttl=0
)


@pytest.fixture
async def job_store(tmp_path: Path) -> AsyncIterator[SQLiteJobStore]:
    store = await SQLiteJobStore.open(tmp_path / "jobs.db")
    try:
        yield store
    finally:
        await store.close()


@dataclass(frozen=True)
class Exporter:
    """Clients of the exporter's two listeners: the API and /metrics, and the OTLP receiver."""

    api: Client
    otlp: Client


@pytest.fixture
async def exporter(aiohttp_client: AiohttpClient, job_store: SQLiteJobStore, tmp_path: Path) -> AsyncIterator[Exporter]:
    """The real apps on sockets over SQLite, with tokens on the API, /metrics and OTLP, a real queue for retries."""
    async with LocalQueue(tmp_path / "queue.db") as queue:

        async def enqueue(job: Job) -> None:
            msg = JobMessage(job.id, job.tenant_id, job.shard_id, job.shard_type_id)
            await queue.send(msg.to_body(), message_id=f"{msg.message_id}.{uuid.uuid4().hex}")

        app = create_app(SECURED, job_store, enqueue=enqueue)
        yield Exporter(await aiohttp_client(app), await receiver_of(aiohttp_client, app))


@pytest.fixture
def api(exporter: Exporter) -> Client:
    return exporter.api


@pytest.mark.parametrize(("name", "bad"), CONTINUATION_CASES, ids=[c[0] for c in CONTINUATION_CASES])
async def test_a_malformed_continuation_token_is_a_400(
    api: Client, job_store: SQLiteJobStore, name: str, bad: str
) -> None:
    response = await api.get(
        "/api/v1/embedding-jobs",
        params={"tenantId": "tenant-a", "continuationToken": bad},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["code"] == "invalid_continuation_token"


# -- Authorization headers --------------------------------------------------------------


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: bytes
    body: bytes


async def raw_request(
    client: Client, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> RawResponse:
    """One HTTP/1.1 request written byte for byte (no client library re-encodes it); the parsed answer."""
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        head = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
        head += [name + b": " + value for name, value in headers]
        if body:
            head.append(b"Content-Length: " + str(len(body)).encode())
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1."), f"no HTTP answer to {method!r} {target!r}: {answer[:200]!r}"
    response_headers, _, body = rest.partition(b"\r\n\r\n")
    return RawResponse(int(status_line.split()[1]), response_headers, body)


# (name, Authorization header value, status): 401 from the app, or 400 where aiohttp's HTTP
# parser refuses the header before any handler runs.
AUTH_CASES: list[tuple[str, bytes, int]] = [
    ("latin1-bytes", b"Bearer caf\xe9-token-123456", 401),
    ("invalid-utf8", b"Bearer \xff\xfe\xfd\xfc", 401),
    ("utf8-non-ascii", "Bearer tenant-a-tökén-123456".encode(), 401),
    ("emoji", "Bearer 🔑🔑🔑🔑".encode(), 401),
    ("valid-token-plus-invalid-byte", b"Bearer " + TOKEN.encode() + b"\xff", 401),
    ("valid-token-prefix", b"Bearer " + TOKEN[:-1].encode(), 401),
    ("empty", b"", 401),
    ("scheme-only", b"Bearer", 401),
    ("scheme-and-space", b"Bearer ", 401),
    ("other-scheme", b"Basic " + base64.b64encode(b"user:" + TOKEN.encode()), 401),
    ("no-scheme", TOKEN.encode(), 401),
    ("long-4kb", b"Bearer " + b"a" * 4096, 401),
    ("delete-character", b"Bearer " + TOKEN.encode() + b"\x7f", 400),
    ("control-characters", b"Bearer \x01\x02\x03", 400),
    ("nul-byte", b"Bearer " + TOKEN.encode() + b"\x00", 400),
]
AUTH_TARGETS = [
    b"/api/v1/embedding-jobs?tenantId=tenant-a",
    b"/api/v1/embedding-jobs/stats",
    b"/api/v1/embedding-jobs/job-1?tenantId=tenant-a",
    b"/api/v1/overview",
    b"/metrics",
]


@pytest.mark.parametrize(("name", "value", "status"), AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
async def test_a_bad_authorization_header_is_a_401(exporter: Exporter, name: str, value: bytes, status: int) -> None:
    auth = [(b"Authorization", value)]
    statuses = {
        target.decode(): (await raw_request(exporter.api, b"GET", target, auth)).status for target in AUTH_TARGETS
    }
    retry = b"/api/v1/embedding-jobs/job-1/retry?tenantId=tenant-a"
    statuses["retry"] = (await raw_request(exporter.api, b"POST", retry, auth)).status
    spans = job_span_request("acme", "completed").SerializeToString()
    otlp = await raw_request(exporter.otlp, b"POST", b"/v1/traces", [*auth, (b"Content-Type", PB.encode())], spans)
    statuses["/v1/traces"] = otlp.status
    assert statuses == dict.fromkeys(statuses, status)
    # The good tokens still get in.
    ok = await raw_request(exporter.api, b"GET", b"/metrics", [(b"Authorization", f"Bearer {METRICS_TOKEN}".encode())])
    assert ok.status == 200


# -- OTLP -------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def protobuf_job_span(attribute_value: bytes) -> bytes:
    """An ExportTraceServiceRequest holding one consumer job span with attribute k = attribute_value (raw AnyValue)."""
    span = (
        _field(1, b"\x01" * 16)
        + _field(2, b"\x02" * 8)
        + _field(5, b"embedding.job")
        + b"\x30\x05"  # kind = CONSUMER
        + _field(9, _field(1, b"embedding.tenant") + _field(2, attribute_value))
    )
    return _field(1, _field(2, _field(2, span)))


def nested_any_value(levels: int) -> bytes:
    """An AnyValue holding an array holding an AnyValue ... levels deep."""
    value = _field(1, b"x")  # string_value
    for _ in range(levels):
        value = _field(5, _field(1, value))  # array_value { values: [value] }
    return value


def json_job_span(attributes: str) -> bytes:
    return (
        '{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"AQEBAQEBAQEBAQEBAQEBAQ==","spanId":"AgICAgICAgI=",'
        '"name":"embedding.job","kind":5,"startTimeUnixNano":"1","endTimeUnixNano":"2","attributes":'
        + attributes
        + "}]}]}]}"
    ).encode()


PB = "application/x-protobuf"
JS = "application/json"
# (name, body, content type, content encoding)
OTLP_CASES: list[tuple[str, bytes, str, str | None]] = [
    ("protobuf-garbage", b"\xff" * 64, PB, None),
    ("protobuf-truncated", job_span_request("acme", "completed").SerializeToString()[:-7], PB, None),
    ("protobuf-anyvalue-nested-2000", protobuf_job_span(nested_any_value(2000)), PB, None),
    ("protobuf-anyvalue-nested-120", protobuf_job_span(nested_any_value(120)), PB, None),
    ("protobuf-invalid-utf8-string", protobuf_job_span(_field(1, b"\xff\xfe")), PB, None),
    ("json-garbage", b"{not json", JS, None),
    ("json-brackets-3000", b'{"resourceSpans":' + deep(3000).encode() + b"}", JS, None),
    (
        "json-anyvalue-nested-600",
        json_job_span('[{"key":"k","value":' + '{"arrayValue":{"values":[' * 600 + "{}" + "]}}" * 600 + "}]"),
        JS,
        None,
    ),
    ("json-int-4400-digits", json_job_span("[]").replace(b'"1"', b"9" * 4400, 1), JS, None),
    ("json-int-above-64-bits", json_job_span("[]").replace(b'"1"', str(2**70).encode(), 1), JS, None),
    ("json-wrong-type-list", b'{"resourceSpans":{"a":1}}', JS, None),
    ("json-wrong-type-kind", json_job_span('"not a list"'), JS, None),
    ("json-top-level-array", b"[1, 2]", JS, None),
    ("json-top-level-empty-array", b"[]", JS, None),
    ("json-top-level-string", b'"AAA"', JS, None),
    ("json-top-level-null", b"null", JS, None),
    ("json-invalid-utf8", b'{"resourceSpans":"\xff"}', JS, None),
    ("json-utf16", '{"resourceSpans":[]}'.encode("utf-16"), JS, None),
    (
        "json-unpaired-surrogate",
        json_job_span('[{"key":"embedding.tenant","value":{"stringValue":"\\ud800"}}]'),
        JS,
        None,
    ),
    ("json-duplicate-keys", b'{"resourceSpans":[],"resourceSpans":[]}', JS, None),
    ("gzip-not-gzip", b"not gzip at all", PB, "gzip"),
    ("gzip-truncated", gzip.compress(job_span_request("acme", "completed").SerializeToString())[:-12], PB, "gzip"),
    ("gzip-of-garbage", gzip.compress(b"\xff" * 64), PB, "gzip"),
    ("gzip-bomb-70mb", gzip.compress(b"\x00" * (70 * 1024 * 1024)), PB, "gzip"),
    ("deflate-not-deflate", b"not deflate", PB, "deflate"),
    ("gzip-nested-json", gzip.compress(b'{"resourceSpans":' + b"[" * 100_000 + b"}"), JS, "gzip"),
    ("unknown-encoding", b"x", PB, "compress"),
    ("brotli-not-installed", b"x", PB, "br"),
    ("unsupported-content-type", b"<spans/>", "application/xml", None),
]


@pytest.mark.parametrize(("name", "body", "content_type", "encoding"), OTLP_CASES, ids=[c[0] for c in OTLP_CASES])
async def test_a_malformed_otlp_body_is_a_4xx_and_the_exporter_keeps_serving(
    exporter: Exporter, name: str, body: bytes, content_type: str, encoding: str | None
) -> None:
    headers = [(b"Authorization", f"Bearer {OTLP_TOKEN}".encode()), (b"Content-Type", content_type.encode())]
    if encoding:
        headers.append((b"Content-Encoding", encoding.encode()))
    response = await raw_request(exporter.otlp, b"POST", b"/v1/traces", headers, body)
    assert 400 <= response.status < 500, (response.status, response.body[:300])
    good = await exporter.otlp.post(
        "/v1/traces",
        data=job_span_request("acme", "completed").SerializeToString(),
        headers={"Content-Type": PB, "Authorization": f"Bearer {OTLP_TOKEN}"},
    )
    assert good.status == 200
    metrics = await exporter.api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert metrics.status == 200
    assert sample(await metrics.text(), "embedding_job_attempts_total", {"tenant": "acme", "outcome": "completed"}) == 1


# -- the API, fuzzed ----------------------------------------------------------------------

OPERATOR = "operator-token-123456"
FUZZED = Settings(api_tokens=f"{TOKEN}=tenant-a;{OPERATOR}=*", metrics_token=METRICS_TOKEN, metrics_cache_ttl=0)
FUZZ_EXAMPLES = 100


def _encoded(raw: bytes) -> str:
    return quote_from_bytes(raw, safe="")


_TEXT = st.text(max_size=40).map(lambda t: _encoded(t.encode("utf-8", "surrogatepass")))
_BYTES = st.binary(max_size=40).map(_encoded)
# Anything at all, percent-encoded; and raw pieces a query parser has to cope with.
_JUNK = st.one_of(
    _TEXT,
    _BYTES,
    st.integers().map(str),
    st.sampled_from(["", "%20", "%2B5", "%EF%BC%95", "5_0", "%00", "%ff%fe", "%", "%zz", "a=b", ";", "+", "&"]),
)


def _weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, chosen with the given weights (one_of leans towards simpler branches)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(range(len(pool))).flatmap(lambda i: pool[i])


# Each parameter is mostly absent or a value a real caller sends, else junk, so that most
# requests get past parsing into the handlers and the store.
_TENANT = _weighted((3, st.just("tenant-a")), (1, st.sampled_from(["tenant-b", "*", "Tenant-A", ""])), (2, _JUNK))
_STATUS = _weighted((3, st.none()), (2, st.sampled_from([*(s.value for s in S), "FAILED", "done"])), (1, _JUNK))
_LIMIT = _weighted(
    (3, st.none()), (2, st.sampled_from(["1", "2", "500", "501", "0", "-1", "1e3", "0x10", "9" * 20])), (1, _JUNK)
)
_CONTINUATION = _weighted(
    (3, st.none()),
    (2, st.sampled_from([bad for _, bad in CONTINUATION_CASES]).map(lambda t: _encoded(t.encode()))),
    (1, _JUNK),
)


def _query(params: dict[str, str | None], junk: list[tuple[str, str]]) -> str:
    pairs = [(k, v) for k, v in params.items() if v is not None] + junk
    return "&".join(f"{k}={v}" for k, v in pairs)


_QUERY = st.builds(
    _query,
    st.fixed_dictionaries(
        {
            "tenantId": _weighted((1, st.none()), (5, _TENANT)),
            "status": _STATUS,
            "limit": _LIMIT,
            "continuationToken": _CONTINUATION,
        }
    ),
    st.lists(st.tuples(_JUNK, _JUNK), max_size=2),
)
_JOB_ID = st.one_of(
    st.sampled_from(["job-000", "job-001", "job-002", "job-003", "job-004", "job-404", "stats"]),
    st.sampled_from(["", ".", "..", "%2e%2e", "%2F", "%00", "a" * 300, "job-001%2F..", "%E2%80%AE"]),
    _TEXT,
    _BYTES,
)
# (method, path) per endpoint; the last one is everything else, any method, any path.
ENDPOINTS: dict[str, st.SearchStrategy[tuple[bytes, str]]] = {
    "list": st.just((b"GET", "/api/v1/embedding-jobs")),
    "stats": st.just((b"GET", "/api/v1/embedding-jobs/stats")),
    "get": _JOB_ID.map(lambda s: (b"GET", f"/api/v1/embedding-jobs/{s}")),
    "retry": _JOB_ID.map(lambda s: (b"POST", f"/api/v1/embedding-jobs/{s}/retry")),
    "overview": st.just((b"GET", "/api/v1/overview")),
    "other": st.tuples(
        st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]),
        st.one_of(
            st.sampled_from(["/api/v1/openapi.json", "/healthz", "/readyz", "/metrics", "/", "/static/status.js"]),
            st.lists(_JOB_ID, max_size=4).map(lambda segments: "/" + "/".join(segments)),
            _JOB_ID.map(lambda s: f"/api/v1/embedding-jobs/{s}/{s}"),
        ),
    ),
}
# Header values as bytes: printable (which the HTTP parser passes to the app) or anything at all
# but CR and LF, which would end the header (the framing itself is not under test).
_HEADER_BYTES: st.SearchStrategy[bytes] = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60).map(
        lambda t: t.encode("latin-1")
    ),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
# Mostly a valid token, so that requests get past authentication to the handlers.
# Who calls: each endpoint is fuzzed as a tenant, as an operator, and as anyone at all.
CALLERS: dict[str, st.SearchStrategy[bytes]] = {
    "tenant": st.just(f"Bearer {TOKEN}".encode()),
    "operator": st.just(f"Bearer {OPERATOR}".encode()),
    "anyone": st.one_of(
        st.sampled_from([f"Bearer {METRICS_TOKEN}".encode(), f"bearer  {TOKEN} ".encode(), b"Bearer", b""]),
        _HEADER_BYTES.map(lambda b: b"Bearer " + b),
        _HEADER_BYTES,
    ),
}
_HEADER = st.tuples(
    st.one_of(
        st.sampled_from([b"Accept", b"Accept-Encoding", b"Content-Type", b"If-None-Match", b"Range", b"Cookie"]),
        st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).map(str.encode),
    ),
    st.one_of(
        st.sampled_from(
            [b"application/openmetrics-text; version=1.0.0", b"gzip;q=0", b"application/json", b"bytes=0-1"]
        ),
        _HEADER_BYTES,
    ),
)


@pytest.fixture
async def fuzz_api(
    aiohttp_client: AiohttpClient, job_store: SQLiteJobStore, tmp_path: Path
) -> AsyncIterator[tuple[Client, dict[int, int]]]:
    """The real app over a SQLite store holding jobs in every status of two tenants; a tally of statuses."""
    for tenant in ("tenant-a", "tenant-b"):
        for n, status in enumerate(S):
            await job_store.create(
                Job.new(job_id=f"job-{n:03d}", tenant_id=tenant, shard_id=f"s{n}", shard_type_id="d", status=status)
            )
    async with LocalQueue(tmp_path / "queue.db") as queue:

        async def enqueue(job: Job) -> None:
            msg = JobMessage(job.id, job.tenant_id, job.shard_id, job.shard_type_id)
            await queue.send(msg.to_body(), message_id=f"{msg.message_id}.{uuid.uuid4().hex}")

        tally: dict[int, int] = {}
        yield await aiohttp_client(create_app(FUZZED, job_store, enqueue=enqueue)), tally
    print(f"API fuzz: {sum(tally.values())} requests, answered {dict(sorted(tally.items()))}")


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_no_request_to_the_api_is_answered_with_a_5xx(
    fuzz_api: tuple[Client, dict[int, int]], endpoint: str, caller: str, data: st.DataObject
) -> None:
    client, tally = fuzz_api
    method, path = data.draw(ENDPOINTS[endpoint], label="endpoint")
    query = data.draw(_QUERY, label="query")
    headers = [(b"Authorization", data.draw(CALLERS[caller], label="authorization"))]
    headers += data.draw(st.lists(_HEADER, max_size=3), label="headers")
    body = data.draw(st.binary(max_size=64), label="body") if method != b"HEAD" else b""
    target = (path + ("?" + query if query else "")).encode("utf-8", "surrogatepass")
    response = await raw_request(client, method, target, headers, body)
    tally[response.status] = tally.get(response.status, 0) + 1
    assert response.status < 500, (method, target, headers, response.body[:300])
