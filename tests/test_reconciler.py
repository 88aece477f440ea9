"""The dead-letter reconciler marks jobs whose messages the queue gave up on.

Run on every queue kind (the local queue and Service Bus through its test peer), with the job
store in a file of its own.
"""

from __future__ import annotations

from pathlib import Path

from jobs.model import Job, JobStatus, utcnow
from jobs.sqlite_store import SQLiteJobStore
from tests.components import wait_for, wait_until
from tests.queues import QueueBackend
from worker.consumer import REASON_PERMANENT
from worker.messages import JobMessage
from worker.queue import Queue, ReceivedMessage
from worker.reconciler import reconcile_dead_letters

S = JobStatus
WAIT = 10.0


async def receive_one(queue: Queue) -> ReceivedMessage:
    [message] = await queue.receive(max_messages=1, max_wait=WAIT)
    return message


async def abandon_until_dead_lettered(queue: Queue, count: int) -> None:
    """Abandon every delivery, as workers crashing mid-job would, until the queue gives up on count messages."""

    async def dead_lettered() -> bool:
        if (await queue.depth()).dead_letter >= count:
            return True
        for message in await queue.receive(max_messages=10, max_wait=0.2):
            await queue.abandon(message)
        return False

    await wait_until(dead_lettered, f"the queue to dead-letter {count} messages", within=WAIT)


async def test_message_dead_lettered_by_the_queue_marks_its_job(queues: QueueBackend, tmp_path: Path) -> None:
    queue = await queues.new(max_delivery_count=2)
    async with await SQLiteJobStore.open(tmp_path / "jobs.db") as store:
        for n, status in enumerate([S.PROCESSING, S.FAILED, S.COMPLETED]):
            job = Job.new(job_id=f"j{n}", tenant_id="acme", shard_id=f"s{n}", shard_type_id="d")
            await store.create(job)
            if status is not S.PENDING:
                await store.transition("acme", job.id, S.PENDING, S.PROCESSING)
            if status is not S.PROCESSING:
                await store.transition("acme", job.id, S.PROCESSING, status)
            msg = JobMessage(job.id, "acme", job.shard_id, "d")
            await queue.send(msg.to_body(), message_id=msg.message_id)
        await queue.send(b"not json", message_id="junk")
        await queue.send(JobMessage("ghost", "acme", "s", "d").to_body(), message_id="ghost")
        await abandon_until_dead_lettered(queue, 5)
        assert (await queue.depth()).dead_letter == 5

        result = await reconcile_dead_letters(queue, store)
        assert (result.scanned, result.marked, result.already_final, result.unknown) == (5, 2, 1, 2)
        for job_id in ("j0", "j1"):
            job = await store.get("acme", job_id)
            assert job.status is S.DEAD_LETTERED
            assert job.error is not None
            assert "MaxDeliveryCountExceeded" in job.error
        assert (await store.get("acme", "j2")).status is S.COMPLETED
        assert await store.recount("acme") == {"acme": await store.stats("acme")}

        again = await reconcile_dead_letters(queue, store)
        assert (again.marked, again.already_final) == (0, 3)
        resumed = await reconcile_dead_letters(queue, store, from_sequence_number=result.next_sequence_number)
        assert resumed.scanned == 0


async def test_a_message_sent_before_a_manual_retry_does_not_dead_letter_the_retried_job(
    queues: QueueBackend, tmp_path: Path
) -> None:
    queue = await queues.new(max_delivery_count=1)
    async with await SQLiteJobStore.open(tmp_path / "jobs.db") as store:
        for job_id in ("retried", "never-ran"):
            job = Job.new(job_id=job_id, tenant_id="acme", shard_id=job_id, shard_type_id="d")
            await store.create(job)
            msg = JobMessage(job_id, "acme", job_id, "d")
            await queue.send(msg.to_body(), message_id=msg.message_id)
        first = await receive_one(queue)
        assert first.message_id == "retried"
        await store.transition("acme", "retried", S.PENDING, S.PROCESSING)
        await store.transition("acme", "retried", S.PROCESSING, S.DEAD_LETTERED, error="gave up")
        # Given up on by the queue (a worker that kept crashing on it would leave it so).
        await queue.dead_letter(first, "MaxDeliveryCountExceeded", "gave up")
        # Job times have millisecond precision: the retry must fall in a later millisecond than the send.
        wait_for(lambda: utcnow() > first.enqueued_time, 1, "the clock to pass the message's enqueue time")
        # A manual retry: the job is pending again after its old message went to the dead-letter queue.
        await store.transition("acme", "retried", S.DEAD_LETTERED, S.PENDING, retry_count=0)
        # The other job's message is given up on by the queue while the job is still pending.
        await abandon_until_dead_lettered(queue, 2)
        assert (await queue.depth()).dead_letter == 2

        result = await reconcile_dead_letters(queue, store)
        assert (result.scanned, result.marked, result.superseded) == (2, 1, 1)
        assert (await store.get("acme", "retried")).status is S.PENDING
        assert (await store.get("acme", "never-ran")).status is S.DEAD_LETTERED


async def test_a_message_the_worker_dead_lettered_never_marks_its_job_again(
    queues: QueueBackend, tmp_path: Path
) -> None:
    queue = await queues.new()
    async with await SQLiteJobStore.open(tmp_path / "jobs.db") as store:
        job = Job.new(job_id="retried", tenant_id="acme", shard_id="s", shard_type_id="d")
        await store.create(job)
        msg = JobMessage("retried", "acme", "s", "d")
        await queue.send(msg.to_body(), message_id=msg.message_id)
        first = await receive_one(queue)
        # The worker records the job, then dead-letters its message.
        await store.transition("acme", "retried", S.PENDING, S.PROCESSING)
        await store.transition("acme", "retried", S.PROCESSING, S.DEAD_LETTERED, error="PermanentError: no")
        await queue.dead_letter(first, REASON_PERMANENT, "PermanentError: no")
        # Retried through the API and already taken on again by a worker when the pass runs.
        await store.transition("acme", "retried", S.DEAD_LETTERED, S.PENDING, retry_count=0)
        await store.transition("acme", "retried", S.PENDING, S.PROCESSING)

        result = await reconcile_dead_letters(queue, store)

        assert (result.scanned, result.marked, result.recorded) == (1, 0, 1)
        assert (await store.get("acme", "retried")).status is S.PROCESSING
