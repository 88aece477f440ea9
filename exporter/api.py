"""The REST API over the job store: list, get, stats, retry, the overview and the OpenAPI document.

No request waits on the store longer than the store timeout (`store_timeout`), nor on the
queue longer than the queue timeout (`queue_timeout`): past them the answer is a 503 with
the JSON error. A read that runs out is abandoned; a retry's write is not (it may still
land), so its outcome is followed in the background until the job has its message or is
parked again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from exporter import openapi
from exporter.auth import Principal
from exporter.errors import error_response
from exporter.keys import API_TASKS, AUTH, ENQUEUE, SETTINGS, STORE
from jobs.errors import (
    InvalidContinuationError,
    InvalidJobError,
    InvalidTenantError,
    JobError,
    JobNotFoundError,
    StoreUnavailableError,
    TransitionConflictError,
)
from jobs.model import Job, JobStatus, format_time, truncate_error, utcnow, validate_id, validate_tenant_id
from jobs.store import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, JobStore

log = logging.getLogger(__name__)

T = TypeVar("T")
S = JobStatus
PREFIX = "/api/v1"
RETRYABLE: frozenset[JobStatus] = frozenset({S.FAILED, S.DEAD_LETTERED})
FAILURE_STATUSES: tuple[JobStatus, ...] = (S.FAILED, S.DEAD_LETTERED)
# The overview lists failures from at most this many tenants, so one request stays a bounded
# number of store reads (two per tenant) however many tenants the store holds.
OVERVIEW_TENANT_SCAN_LIMIT = 100
OVERVIEW_FAILURES_PER_STATUS = 5
OVERVIEW_RECENT_FAILURES = 20
# Store reads the overview keeps in flight at once: enough to hide Cosmos latency, few enough
# not to crowd out the state refresher's reads on the same client.
_OVERVIEW_CONCURRENCY = 8
_LIMIT_PATTERN = re.compile(r"[0-9]{1,6}")
_ECHO_MAX = 64

routes = web.RouteTableDef()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Enqueue = Callable[[Job], Awaitable[None]]


class _Reject(Exception):
    """An error answer decided while reading a request; `_api` turns it into the JSON error shape."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _api(handler: Handler) -> Handler:
    """Answer _Reject and an unreachable store with the JSON error shape."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Reject as exc:
            response = error_response(exc.status, exc.code, exc.message)
            response.headers.update(exc.headers)
            return response
        except StoreUnavailableError as exc:
            # The detail (file paths, endpoints) goes to the log, not to API callers.
            log.warning("job store unavailable for %s %s: %s", request.method, request.path, exc)
            return error_response(503, "store_unavailable", "the job store is unavailable; try again later")

    return wrapper


def setup(app: web.Application) -> None:
    """Add the /api/v1 routes to app; the OpenAPI document is built once here."""
    body = json.dumps(openapi.build_spec(), separators=(",", ":")).encode()

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app[API_TASKS] = set()
    app.cleanup_ctx.append(_finish_background_tasks)
    app.router.add_routes(routes)
    app.router.add_get(openapi.OPENAPI_PATH, openapi_json)


async def _finish_background_tasks(app: web.Application) -> AsyncIterator[None]:
    """On shutdown, give retries still following a store write or a send their bounded time to end."""
    yield
    tasks = app[API_TASKS]
    if not tasks:
        return
    settings = app[SETTINGS]
    _, running = await asyncio.wait(set(tasks), timeout=settings.store_timeout + settings.queue_timeout)
    for task in running:
        log.error("shutting down during %s: the job may stay pending without a message", task.get_name())
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


def _background(app: web.Application, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """Run work to its end whatever happens to the request that started it."""
    task = asyncio.create_task(work, name=name)
    tasks = app[API_TASKS]
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


async def _within(request: web.Request, call: Awaitable[T]) -> T:
    """The result of store reads made for request, or a 503 once they take longer than the store timeout."""
    seconds = request.app[SETTINGS].store_timeout
    try:
        async with asyncio.timeout(seconds):
            return await call
    except TimeoutError as exc:
        log.warning("job store did not answer within %g s for %s %s", seconds, request.method, request.path)
        raise _store_timeout(seconds) from exc


def _store_timeout(seconds: float, consequence: str = "try again later") -> _Reject:
    return _Reject(503, "store_timeout", f"the job store did not answer within {seconds:g} s; {consequence}")


async def _result_within(task: asyncio.Task[T], seconds: float | None) -> T:
    """task's result, or TimeoutError after seconds (None: no limit) while the task runs on."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        raise TimeoutError
    return task.result()


# -- request parsing ----------------------------------------------------------------


def _echo(value: str) -> str:
    """A caller-supplied value quoted and bounded for an error message."""
    return repr(value[:_ECHO_MAX] + ("…" if len(value) > _ECHO_MAX else ""))


def _principal(request: web.Request) -> Principal:
    principal = request.app[AUTH].authenticate(request.headers.get("Authorization"))
    if principal is None:
        raise _Reject(
            401,
            "unauthorized",
            "a valid bearer token is required: send 'Authorization: Bearer TOKEN'",
            {"WWW-Authenticate": 'Bearer realm="embedding-jobs"'},
        )
    return principal


def _param(request: web.Request, name: str) -> str | None:
    """A query parameter, None when absent or empty; given twice is refused so no layer reads another value."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise _Reject(400, "invalid_parameter", f"{name} must be given at most once")
    return values[0] if values and values[0] else None


def _tenant(request: web.Request, principal: Principal) -> str:
    tenant = _optional_tenant(request, principal)
    if tenant is None:
        raise _Reject(400, "missing_parameter", "the tenantId query parameter is required")
    return tenant


def _optional_tenant(request: web.Request, principal: Principal) -> str | None:
    raw = _param(request, "tenantId")
    if raw is None:
        return None
    try:
        tenant = validate_tenant_id(raw)
    except InvalidTenantError as exc:
        raise _Reject(400, "invalid_tenant", str(exc)) from exc
    if not principal.may_read(tenant):
        raise _Reject(403, "forbidden", f"this token may not read tenant {tenant!r}")
    return tenant


def _status(request: web.Request) -> JobStatus | None:
    raw = _param(request, "status")
    if raw is None:
        return None
    try:
        return JobStatus(raw)
    except ValueError:
        allowed = ", ".join(s.value for s in JobStatus)
        raise _Reject(400, "invalid_status", f"unknown status {_echo(raw)}; use one of: {allowed}") from None


def _limit(request: web.Request) -> int:
    raw = _param(request, "limit")
    if raw is None:
        return DEFAULT_PAGE_SIZE
    # Plain ASCII digits only: int() would also take '+5', ' 5', '5_0' and other scripts' digits.
    limit = int(raw) if _LIMIT_PATTERN.fullmatch(raw) else 0
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise _Reject(400, "invalid_limit", f"limit must be an integer from 1 to {MAX_PAGE_SIZE}; got {_echo(raw)}")
    return limit


def _job_id(request: web.Request) -> str:
    raw = request.match_info["jobId"]
    try:
        return validate_id(raw, "jobId")
    except InvalidJobError as exc:
        raise _Reject(400, "invalid_job_id", str(exc)) from exc


def _not_found(exc: JobNotFoundError) -> _Reject:
    return _Reject(404, "not_found", str(exc))


def _job_response(job: Job, status: int = 200) -> web.Response:
    return web.Response(text=job.to_json_text(), status=status, content_type="application/json")


def _page_response(jobs: Iterable[Job], continuation: str | None) -> web.Response:
    """The list answer, assembled around each job's JSON text so no record is decoded and encoded again."""
    items = ",".join(job.to_json_text() for job in jobs)
    text = f'{{"items":[{items}],"continuationToken":{json.dumps(continuation)}}}'
    return web.Response(text=text, content_type="application/json")


def _stats_json(stats: Mapping[JobStatus, int]) -> dict[str, int]:
    """Every status, in lifecycle order, zero where the store has no count."""
    return {status.value: stats.get(status, 0) for status in JobStatus}


async def _visible_stats(store: JobStore, principal: Principal) -> dict[str, dict[JobStatus, int]]:
    """Counts of every tenant the caller may read: all of them for operators."""
    if principal.operator:
        return await store.stats_all()
    # A tenant-scoped token reads its own tenants directly (point reads), zero counts included.
    return {tenant: await store.stats(tenant) for tenant in sorted(principal.tenants)}


# -- views ------------------------------------------------------------------------


@routes.get(f"{PREFIX}/embedding-jobs")
@_api
async def list_jobs(request: web.Request) -> web.Response:
    """A page of a tenant's jobs, newest first, optionally of one status."""
    principal = _principal(request)
    tenant = _tenant(request, principal)
    status = _status(request)
    limit = _limit(request)
    token = _param(request, "continuationToken")
    try:
        page = await _within(request, request.app[STORE].list(tenant, status=status, limit=limit, continuation=token))
    except InvalidContinuationError as exc:
        raise _Reject(400, "invalid_continuation_token", str(exc)) from exc
    return _page_response(page.items, page.continuation)


# Registered before /{jobId} so that 'stats' is never read as a job id.
@routes.get(f"{PREFIX}/embedding-jobs/stats")
@_api
async def job_stats(request: web.Request) -> web.Response:
    """One tenant's counts per status, or, without tenantId, those of every tenant the caller may read."""
    principal = _principal(request)
    tenant = _optional_tenant(request, principal)
    store = request.app[STORE]
    if tenant is not None:
        return web.json_response(
            {"tenantId": tenant, "stats": _stats_json(await _within(request, store.stats(tenant)))}
        )
    # One bound for all reads: a token with many tenants reads them one after the other.
    visible = await _within(request, _visible_stats(store, principal))
    return web.json_response({"tenants": {name: _stats_json(visible[name]) for name in sorted(visible)}})


@routes.get(f"{PREFIX}/embedding-jobs/{{jobId}}")
@_api
async def get_job(request: web.Request) -> web.Response:
    """One job record."""
    principal = _principal(request)
    tenant = _tenant(request, principal)
    job_id = _job_id(request)
    try:
        job = await _within(request, request.app[STORE].get(tenant, job_id))
    except JobNotFoundError as exc:
        raise _not_found(exc) from exc
    return _job_response(job)


@routes.post(f"{PREFIX}/embedding-jobs/{{jobId}}/retry")
@_api
async def retry_job(request: web.Request) -> web.Response:
    """Put a failed or dead-lettered job back to pending and send its message again."""
    principal = _principal(request)
    tenant = _tenant(request, principal)
    job_id = _job_id(request)
    enqueue = request.app.get(ENQUEUE)
    if enqueue is None:
        raise _Reject(503, "retry_unavailable", "retries are not available: this exporter has no queue to send to")
    try:
        job = await _within(request, request.app[STORE].get(tenant, job_id))
    except JobNotFoundError as exc:
        raise _not_found(exc) from exc
    if job.status not in RETRYABLE:
        raise _not_retryable(job_id, job.status.value)
    # Once the job is pending its message must be sent, or the job parked again, even if the
    # caller disconnects halfway: otherwise it would sit in pending with nothing to process it.
    return await asyncio.shield(_retry(request.app, enqueue, job))


def _not_retryable(job_id: str, status: str) -> _Reject:
    return _Reject(409, "conflict", f"job {job_id!r} is {status}; only failed or dead_lettered jobs can be retried")


async def _retry(app: web.Application, enqueue: Enqueue, job: Job) -> web.Response:
    settings = app[SETTINGS]
    # The error stays on the record so the reason of the last failure remains visible.
    write = _background(app, _reopen(app[STORE], job), f"retry write of job {job.id} in tenant {job.tenant_id}")
    try:
        pending = await _result_within(write, settings.store_timeout)
    except TimeoutError:
        # An unanswered write may still land (a SQLite write queued on the file's lock, a Cosmos
        # request held up in the network): whenever it does, the job's message is sent then.
        _background(app, _send_once_written(app, enqueue, write), f"retry of job {job.id} in tenant {job.tenant_id}")
        log.warning("retry of job %s in tenant %s: the store did not confirm the write in time", job.id, job.tenant_id)
        raise _store_timeout(
            settings.store_timeout, "if the retry is applied later, its message is sent then: check the job's status"
        ) from None
    except TransitionConflictError as exc:
        raise _not_retryable(job.id, exc.actual) from exc
    except JobNotFoundError as exc:
        raise _not_found(exc) from exc
    return await _send(app, enqueue, pending, wait=settings.store_timeout)


async def _reopen(store: JobStore, job: Job) -> Job:
    """Put a failed or dead-lettered job back to pending; the record as stored then."""
    await store.transition(job.tenant_id, job.id, job.status, S.PENDING, retry_count=0)
    try:
        return await store.get(job.tenant_id, job.id)
    except JobError:
        # The write landed, so the message must go out whatever this read does: send it for the
        # record as written (the store stamped updatedAt a moment earlier).
        return job.with_changes(status=S.PENDING, retry_count=0, completed_at=None, updated_at=utcnow())


async def _send_once_written(app: web.Application, enqueue: Enqueue, write: asyncio.Task[Job]) -> None:
    """Follow a retry write the request stopped waiting for: send the message if it lands."""
    try:
        pending = await write
    except JobError as exc:
        log.warning("a retry write that timed out was not applied: %s", exc)
        return
    log.info("retry of job %s in tenant %s applied after its request timed out", pending.id, pending.tenant_id)
    with contextlib.suppress(_Reject):  # nobody waits for the answer; _send logged what happened
        await _send(app, enqueue, pending, wait=None)


async def _send(app: web.Application, enqueue: Enqueue, pending: Job, *, wait: float | None) -> web.Response:
    """Send the message of a job put back to pending, within the queue timeout, or park the job again."""
    seconds = app[SETTINGS].queue_timeout
    try:
        async with asyncio.timeout(seconds) as deadline:
            await enqueue(pending)
    except Exception as exc:  # whatever the queue raised, the job must not stay pending without a message
        detail = f"the queue did not answer within {seconds:g} s" if deadline.expired() else str(exc)
        reason = truncate_error(f"retry could not be enqueued: {detail or type(exc).__name__}")
        log.warning("retry of job %s in tenant %s could not be enqueued: %r", pending.id, pending.tenant_id, exc)
        return await _park(app, pending, reason, wait=wait)
    log.info("job %s in tenant %s put back to pending by the API", pending.id, pending.tenant_id)
    return _job_response(pending, status=202)


async def _park(app: web.Application, pending: Job, reason: str, *, wait: float | None) -> web.Response:
    """Dead-letter a pending job whose message may not have been sent, waiting at most wait for the store.

    A send that timed out may have reached the queue all the same: its message then finds the
    job dead-lettered and is skipped, or finds it already taken on by a worker, which this
    write then leaves alone. Either way the job is never pending without a message.
    """
    park = _background(
        app,
        app[STORE].transition(pending.tenant_id, pending.id, S.PENDING, S.DEAD_LETTERED, error=reason),
        f"parking of job {pending.id} in tenant {pending.tenant_id}",
    )
    try:
        await _result_within(park, wait)
    except TimeoutError:
        _background(app, _report_park(pending, park), f"parking report of job {pending.id}")
        raise _Reject(503, "enqueue_failed", f"{reason}; the job is being dead-lettered again") from None
    except TransitionConflictError as exc:
        log.info(
            "job %s in tenant %s is %s: its message got through after all", pending.id, pending.tenant_id, exc.actual
        )
        return _job_response(pending, status=202)
    except JobError as exc:
        _log_unparked(pending, exc)
        raise _Reject(503, "enqueue_failed", f"{reason}; the job may remain pending") from exc
    raise _Reject(503, "enqueue_failed", f"{reason}; the job is dead_lettered again")


async def _report_park(pending: Job, park: asyncio.Task[None]) -> None:
    """Log how a parking write the request stopped waiting for ended."""
    try:
        await park
    except TransitionConflictError:
        return
    except JobError as exc:
        _log_unparked(pending, exc)


def _log_unparked(pending: Job, exc: JobError) -> None:
    log.error(
        "job %s in tenant %s is pending without a message and could not be dead-lettered: %s",
        pending.id,
        pending.tenant_id,
        exc,
    )


@routes.get(f"{PREFIX}/overview")
@_api
async def overview(request: web.Request) -> web.Response:
    """Per-tenant counts and failure ratios, and the most recent failures, for the status page."""
    principal = _principal(request)
    # Many reads (two per failing tenant): the whole request is bounded, not only each read.
    return await _within(request, _overview(request.app[STORE], principal))


async def _overview(store: JobStore, principal: Principal) -> web.Response:
    visible = await _visible_stats(store, principal)
    names = sorted(visible)
    # Counters tell which tenants have failures at all, so only those are listed.
    failing = [name for name in names if any(visible[name][status] for status in FAILURE_STATUSES)]
    scanned = failing[:OVERVIEW_TENANT_SCAN_LIMIT]
    failures = await _recent_failures(store, ((name, visible[name]) for name in scanned))
    return web.json_response(
        {
            "generatedAt": format_time(utcnow()),
            "tenants": [_tenant_summary(name, visible[name]) for name in names],
            "recentFailures": [job.to_json() for job in failures],
            "truncated": len(failing) > len(scanned),
        }
    )


def _tenant_summary(tenant: str, stats: Mapping[JobStatus, int]) -> dict[str, Any]:
    failed = stats.get(S.FAILED, 0) + stats.get(S.DEAD_LETTERED, 0)
    finished = stats.get(S.COMPLETED, 0) + failed
    return {
        "tenantId": tenant,
        "stats": _stats_json(stats),
        "total": sum(stats.values()),
        "failureRatio": failed / finished if finished else 0.0,
    }


async def _recent_failures(store: JobStore, tenants: Iterable[tuple[str, Mapping[JobStatus, int]]]) -> list[Job]:
    """The newest failed and dead-lettered jobs of the given tenants, newest update first."""
    gate = asyncio.Semaphore(_OVERVIEW_CONCURRENCY)

    async def read(tenant: str, status: JobStatus) -> list[Job]:
        async with gate:
            page = await store.list(tenant, status=status, limit=OVERVIEW_FAILURES_PER_STATUS)
        return list(page.items)

    reads = [read(tenant, status) for tenant, stats in tenants for status in FAILURE_STATUSES if stats.get(status)]
    # Every read runs to its end before an error is raised, so none is left running unobserved.
    results = await asyncio.gather(*reads, return_exceptions=True)
    jobs: list[Job] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        jobs.extend(result)
    jobs.sort(key=lambda job: (job.updated_at, job.tenant_id, job.id), reverse=True)
    return jobs[:OVERVIEW_RECENT_FAILURES]
