"""The consume loop: receive a shard message, embed the shard, record the job, settle the message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from jobs import telemetry as attr
from jobs.model import JobMetadata, JobStatus
from jobs.telemetry import JOB_SPAN, Outcome
from worker.chunking import chunk_text
from worker.embedders.base import Embedder
from worker.errors import PermanentError, RetryableError
from worker.heartbeat import Heartbeat
from worker.local_path import Begun, LocalPath
from worker.messages import MAX_ATTEMPT, JobMessage, MalformedMessageError, parse_message, trace_carrier
from worker.queue import MessageLockLostError, Queue, QueueError, ReceivedMessage
from worker.shards import Shard, ShardNotFoundError, ShardStore, ShardVectors
from worker.tracing import extract_context, inject_context
from worker.tracker import Begin, JobTracker

log = logging.getLogger(__name__)

REASON_MALFORMED = "MalformedMessage"
REASON_PERMANENT = "PermanentFailure"
REASON_MAX_ATTEMPTS = "MaxAttemptsExceeded"
REASON_JOB_DEAD_LETTERED = "JobDeadLettered"
# The reasons the worker dead-letters a message with; it records the job before it does so.
WORKER_REASONS = frozenset({REASON_MALFORMED, REASON_PERMANENT, REASON_MAX_ATTEMPTS, REASON_JOB_DEAD_LETTERED})
# Dead-letter descriptions are for people reading the dead-letter queue; a bound keeps every queue able to store one.
DESCRIPTION_MAX = 1024


@dataclass(frozen=True, kw_only=True)
class ConsumerConfig:
    """How the consume loop behaves: concurrency, retries, chunking and draining."""

    concurrency: int = 4
    max_attempts: int = 4
    backoff_base: float = 2.0
    backoff_max: float = 300.0
    chunk_max_tokens: int = 512
    chunk_overlap_tokens: int = 0
    drain_timeout: float = 25.0
    messaging_system: str = "sqlite"
    # How long one receive call waits for a message; also bounds how long a stop request waits.
    receive_wait: float = 1.0
    # Touched on every turn of the loop, for a liveness probe (worker/heartbeat.py); None: no heartbeat.
    heartbeat_file: Path | None = None
    # When the queue, job store and shard store are one SQLite file: merge a job's writes into
    # fewer transactions (worker/local_path.py). Off only to compare against the separate writes.
    merge_local_writes: bool = True


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay before retry number `attempt` (1-based): exponential, capped, with full jitter."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    # Full jitter keeps a burst of failures from retrying in lockstep; half is kept as a floor.
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


class Consumer:
    """Processes queue messages with bounded concurrency until asked to stop."""

    def __init__(
        self,
        *,
        queue: Queue,
        tracker: JobTracker,
        shards: ShardStore,
        embedder: Embedder,
        tracer: trace.Tracer,
        config: ConsumerConfig,
        rng: random.Random | None = None,
    ) -> None:
        self.queue = queue
        self.tracker = tracker
        self.shards = shards
        self.embedder = embedder
        self.tracer = tracer
        self.config = config
        self._rng = rng or random.Random()
        self._in_flight: set[asyncio.Task[Outcome]] = set()
        self._heartbeat = Heartbeat(config.heartbeat_file)
        self.processed: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        self._local = LocalPath.of(queue, shards, tracker) if config.merge_local_writes else None
        self._receive = self._local.receive if self._local is not None else queue.receive

    @property
    def chunk_budget(self) -> int:
        """Tokens per chunk: the configured budget, lowered to what the model reads in full."""
        limit = self.embedder.max_input_tokens
        return min(self.config.chunk_max_tokens, limit) if limit else self.config.chunk_max_tokens

    @property
    def in_flight(self) -> int:
        """Messages being processed right now."""
        return len(self._in_flight)

    async def run(self, stop: asyncio.Event) -> None:
        """Receive and process until stop is set; then drain within the configured grace period."""
        slots = asyncio.Semaphore(self.config.concurrency)
        try:
            while not stop.is_set():
                self._heartbeat.beat()
                # Waiting for a free slot is bounded too, so a worker whose slots are all busy still beats.
                if not await _first(slots.acquire(), stop, self.config.receive_wait):
                    continue
                try:
                    messages = await self._receive(max_messages=1, max_wait=self.config.receive_wait)
                except QueueError as exc:
                    slots.release()
                    log.warning("receive failed: %s", exc)
                    await _wait(stop, 1.0)
                    continue
                if not messages:
                    slots.release()
                    continue
                task = asyncio.create_task(self.handle(messages[0]))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                task.add_done_callback(lambda _: slots.release())
        finally:
            await self._drain()

    async def _drain(self) -> None:
        if not self._in_flight:
            return
        log.info("draining %d in-flight job(s) for up to %.0fs", len(self._in_flight), self.config.drain_timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        pending = set(self._in_flight)
        # In steps, beating in between: a long drain is the loop at work, not a hung worker.
        while pending and (remaining := deadline - loop.time()) > 0:
            self._heartbeat.beat()
            _, pending = await asyncio.wait(pending, timeout=min(remaining, self.config.receive_wait))
        pending = {task for task in pending if not task.done()}
        for task in pending:
            task.cancel()
        if pending:
            log.warning("abandoned %d job(s) still running after the drain timeout", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def handle(self, received: ReceivedMessage) -> Outcome:
        """Process one message end to end and settle it; never raises except on cancellation.

        Whatever goes wrong is logged with its traceback and the message still settles: a
        malformed one is dead-lettered at once, a failed attempt is retried or dead-lettered.
        """
        try:
            return await self._handle(received)
        except asyncio.CancelledError:
            raise
        except Exception:  # the last line of defence: a bug here must not leave a message unsettled
            log.exception("unexpected error handling message %s; abandoning it for redelivery", received.message_id)
            await self._settle(self.queue.abandon(received), received)
            self.processed[Outcome.FAILED] += 1
            return Outcome.FAILED

    async def _handle(self, received: ReceivedMessage) -> Outcome:
        begun = self._local.take(received) if self._local is not None else None
        context = extract_context(trace_carrier(received.application_properties))
        with self.tracer.start_as_current_span(
            JOB_SPAN,
            context=context,
            kind=SpanKind.CONSUMER,
            attributes={
                attr.MESSAGING_SYSTEM: self.config.messaging_system,
                attr.MESSAGING_DESTINATION: self.queue.name,
                attr.MESSAGING_OPERATION_TYPE: "process",
                attr.MESSAGING_OPERATION_NAME: "process",
                attr.MESSAGING_MESSAGE_ID: received.message_id,
                attr.MESSAGING_DELIVERY_COUNT: received.delivery_count,
                attr.QUEUE_WAIT: _queue_wait(received),
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            renewer = asyncio.create_task(self._renew_lock(received))
            try:
                outcome = await self._process(received, span, begun)
            except asyncio.CancelledError:
                span.set_attribute(attr.OUTCOME, "abandoned")
                await asyncio.shield(self._settle(self.queue.abandon(received), received))
                raise
            finally:
                renewer.cancel()
            span.set_attribute(attr.OUTCOME, outcome.value)
            if outcome in (Outcome.FAILED, Outcome.DEAD_LETTERED):
                span.set_status(Status(StatusCode.ERROR))
            self.processed[outcome] += 1
            return outcome

    async def _process(self, received: ReceivedMessage, span: trace.Span, begun: Begun | None) -> Outcome:
        try:
            if received.body_error is not None:
                raise MalformedMessageError(received.body_error)
            msg = parse_message(received.body)
        except MalformedMessageError as exc:
            description = _description(str(exc))
            span.set_attributes({attr.ERROR_TYPE: REASON_MALFORMED, attr.DEAD_LETTER_REASON: REASON_MALFORMED})
            log.warning("dead-lettering malformed message %s: %s", received.message_id, description)
            await self._settle(self.queue.dead_letter(received, REASON_MALFORMED, description), received)
            return Outcome.DEAD_LETTERED

        span.set_attributes(
            {
                attr.TENANT: msg.tenant_id,
                attr.JOB_ID: msg.job_id,
                attr.SHARD_ID: msg.shard_id,
                attr.SHARD_TYPE_ID: msg.shard_type_id,
                attr.RETRY_COUNT: msg.attempt,
                attr.GEN_AI_OPERATION: "embeddings",
                attr.GEN_AI_MODEL: self.embedder.model,
            }
        )
        extra = {"tenant_id": msg.tenant_id, "job_id": msg.job_id, "attempt": msg.attempt}
        try:
            return await self._attempt(received, msg, span, extra, begun)
        except Exception as exc:  # an unforeseen error (a bug, a store refusing a value) is a failed attempt
            log.error("unexpected error in the attempt: %r", exc, exc_info=True, extra=extra)
            span.record_exception(exc)
            span.set_attribute(attr.ERROR_TYPE, type(exc).__name__)
            return await self._fail(received, msg, exc, extra)

    async def _attempt(
        self,
        received: ReceivedMessage,
        msg: JobMessage,
        span: trace.Span,
        extra: dict[str, object],
        begun: Begun | None,
    ) -> Outcome:
        trace_id = format(span.get_span_context().trace_id, "032x")
        started = time.perf_counter()
        begin = begun.begin if begun is not None else None
        if begin is None:
            with self.tracer.start_as_current_span("embedding.store.begin"):
                begin = await asyncio.shield(self.tracker.begin(msg, trace_id))
        if begin is Begin.SKIP:
            log.info("job already completed; completing duplicate delivery", extra=extra)
            await self._settle(self.queue.complete(received), received)
            return Outcome.SKIPPED
        if begin is Begin.DEAD_LETTERED:
            # A dead-lettered job's message is kept where operators look for it, even when this is
            # a second delivery of one already there: a duplicate entry beats a missing one.
            log.warning("job already dead-lettered; dead-lettering its delivered message", extra=extra)
            description = "the job record is dead_lettered; see its error for why"
            await self._settle(self.queue.dead_letter(received, REASON_JOB_DEAD_LETTERED, description), received)
            return Outcome.SKIPPED

        try:
            vectors = await self._embed_shard(msg, begun.shard if begun is not None else None)
        except Exception as exc:  # any failure is an attempt outcome; unknown ones are retried
            span.record_exception(exc)
            span.set_attribute(attr.ERROR_TYPE, type(exc).__name__)
            return await self._fail(received, msg, exc, extra)

        metadata = JobMetadata(
            embedding_model=vectors.model,
            vector_count=len(vectors.vectors),
            chunk_count=len(vectors.chunks),
            processing_time_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        span.set_attributes({attr.VECTOR_COUNT: len(vectors.vectors), attr.CHUNK_COUNT: len(vectors.chunks)})
        if self._local is not None:
            with self.tracer.start_as_current_span("embedding.store.complete"):
                # Shielded: a shutdown must not lose the record of work already done.
                merged = self._local.complete(received, msg, vectors, metadata, trace_id)
                if await asyncio.shield(merged):
                    log.info("job completed: %d vectors", len(vectors.vectors), extra=extra)
                    return Outcome.COMPLETED
        try:
            with self.tracer.start_as_current_span("embedding.save_vectors"):
                await self.shards.save_vectors(msg.tenant_id, msg.shard_id, vectors)
        except Exception as exc:  # as for the embedding: a failed attempt, retried unless permanent
            span.record_exception(exc)
            span.set_attribute(attr.ERROR_TYPE, type(exc).__name__)
            return await self._fail(received, msg, exc, extra)
        with self.tracer.start_as_current_span("embedding.store.complete"):
            # Shielded: a shutdown must not lose the record of work already done.
            await asyncio.shield(self.tracker.finish(msg, JobStatus.COMPLETED, metadata=metadata, error=None))
        await self._settle(self.queue.complete(received), received)
        log.info("job completed: %d vectors", len(vectors.vectors), extra=extra)
        return Outcome.COMPLETED

    async def _embed_shard(self, msg: JobMessage, shard: Shard | None) -> ShardVectors:
        """The shard's chunks and vectors; the shard is read unless the receipt read it already."""
        if shard is None:
            with self.tracer.start_as_current_span("embedding.load_shard"):
                try:
                    shard = await self.shards.get(msg.tenant_id, msg.shard_id)
                except ShardNotFoundError as exc:
                    raise PermanentError(str(exc)) from exc
        chunks = [
            c.text
            for c in chunk_text(
                shard.text,
                max_tokens=self.chunk_budget,
                overlap_tokens=min(self.config.chunk_overlap_tokens, self.chunk_budget // 2),
            )
        ]
        with self.tracer.start_as_current_span(
            "embedding.embed",
            attributes={attr.GEN_AI_OPERATION: "embeddings", attr.GEN_AI_MODEL: self.embedder.model},
        ) as span:
            vectors: list[list[float]] = []
            size = self.embedder.max_batch_size
            for i in range(0, len(chunks), size):
                vectors.extend(await self.embedder.embed(chunks[i : i + size]))
            span.set_attribute(attr.CHUNK_COUNT, len(chunks))
        if len(vectors) != len(chunks):
            raise RetryableError(f"embedder returned {len(vectors)} vectors for {len(chunks)} chunks")
        return ShardVectors(model=self.embedder.model, content_hash=shard.content_hash, chunks=chunks, vectors=vectors)

    async def _fail(
        self, received: ReceivedMessage, msg: JobMessage, exc: BaseException, extra: dict[str, object]
    ) -> Outcome:
        error = f"{type(exc).__name__}: {exc}"
        next_attempt = msg.attempt + 1
        permanent = isinstance(exc, PermanentError)
        if not permanent and next_attempt < self.config.max_attempts and next_attempt <= MAX_ATTEMPT:
            delay = backoff_delay(next_attempt, self.config.backoff_base, self.config.backoff_max, self._rng)
            if isinstance(exc, RetryableError) and exc.retry_after:
                delay = max(delay, min(exc.retry_after, self.config.backoff_max))
            await self._record(msg, JobStatus.FAILED, error=error, retry_count=next_attempt)
            retry = msg.retry()
            carrier: dict[str, str] = {}
            inject_context(carrier)
            try:
                # Schedule the retry before completing this message: a crash in between leaves
                # a duplicate, which the job record dedupes, never a lost job.
                await self.queue.send(
                    retry.to_body(),
                    message_id=retry.message_id,
                    application_properties=carrier,
                    scheduled_enqueue_time=datetime.now(UTC) + timedelta(seconds=delay),
                )
            except Exception as send_exc:  # whatever the queue raised, the message goes back for redelivery
                log.warning("could not schedule retry (%r); abandoning for redelivery", send_exc, extra=extra)
                await self._settle(self.queue.abandon(received), received)
                return Outcome.FAILED
            await self._settle(self.queue.complete(received), received)
            log.warning("attempt failed, retry %d in %.1fs: %s", next_attempt, delay, error, extra=extra)
            return Outcome.FAILED

        reason = REASON_PERMANENT if permanent else REASON_MAX_ATTEMPTS
        trace.get_current_span().set_attribute(attr.DEAD_LETTER_REASON, reason)
        await self._record(msg, JobStatus.DEAD_LETTERED, error=error, retry_count=msg.attempt)
        await self._settle(self.queue.dead_letter(received, reason, _description(error)), received)
        log.error("job dead-lettered (%s): %s", reason, error, extra=extra)
        return Outcome.DEAD_LETTERED

    async def _record(self, msg: JobMessage, status: JobStatus, *, error: str, retry_count: int) -> None:
        """Record a failed attempt's status; an error here is logged, never raised.

        The tracker buffers what the store cannot take now; anything else it raises must not stop
        the message from settling. A job left in processing this way is picked up again by its
        retry (processing -> processing is legal) or by the dead-letter reconciler.
        """
        try:
            # Shielded: a shutdown must not lose the record of the attempt.
            await asyncio.shield(self.tracker.finish(msg, status, error=error, retry_count=retry_count))
        except Exception:
            log.exception(
                "could not record %s for job %s",
                status.value,
                msg.job_id,
                extra={"tenant_id": msg.tenant_id, "job_id": msg.job_id},
            )

    async def _settle(self, settlement: Awaitable[None], received: ReceivedMessage) -> None:
        try:
            await settlement
        except MessageLockLostError:
            # The message comes back to some receiver; its job record dedupes the redelivery.
            log.warning("lock lost before settling message %s; it will be redelivered", received.message_id)
        except QueueError as exc:
            log.error("settling message %s failed: %s", received.message_id, exc)
        except Exception:  # an unsettled message is redelivered when its lock expires; the worker goes on
            log.exception("settling message %s failed unexpectedly", received.message_id)

    async def _renew_lock(self, received: ReceivedMessage) -> None:
        locked_until = received.locked_until
        while True:
            remaining = (locked_until - datetime.now(UTC)).total_seconds()
            await asyncio.sleep(max(remaining / 2, 0.05))
            try:
                locked_until = await self.queue.renew_lock(received)
            except MessageLockLostError:
                log.warning("lock on message %s lost while processing", received.message_id)
                return
            except QueueError as exc:
                log.warning("renewing lock on message %s failed: %s", received.message_id, exc)
            except Exception:  # keep renewing: losing the lock mid-job would only cause a duplicate
                log.exception("renewing lock on message %s failed unexpectedly", received.message_id)


def _queue_wait(received: ReceivedMessage) -> float:
    """Seconds between enqueue and now; 0 when the queue's clock is ahead or its timestamp unusable."""
    try:
        return max(0.0, (datetime.now(UTC) - received.enqueued_time).total_seconds())
    except (TypeError, ValueError, OverflowError):
        return 0.0


def _description(text: str) -> str:
    """A dead-letter description every queue can store: bounded, and encodable as UTF-8."""
    bounded = text if len(text) <= DESCRIPTION_MAX else text[: DESCRIPTION_MAX - 1] + "…"
    return bounded.encode("utf-8", "backslashreplace").decode("utf-8")


async def _first(acquire: Awaitable[bool], stop: asyncio.Event, within: float) -> bool:
    """Wait up to `within` seconds for acquire or stop; True if acquired and not stopping (the slot is then held)."""
    acquiring = asyncio.ensure_future(acquire)
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({acquiring, stopping}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if acquiring not in done:
        acquiring.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquiring
    # The cancel can lose the race with a slot being granted: the slot is then held, and used here.
    acquired = acquiring.done() and not acquiring.cancelled() and acquiring.result()
    return acquired and not stop.is_set()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
