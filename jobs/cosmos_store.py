"""JobStore on Azure Cosmos DB (NoSQL API), through the async SDK.

One container, partitioned on /tenantId. A tenant's partition holds its job
documents (the camelCase record plus `type: "job"`) and one counter document
(id `__counters__`, `type: "counters"`, one number per status). Every write that
changes counts is one transactional batch in that partition: the job write
(a create, or a patch conditioned on the expected status) plus increments on the
counter document. So `stats` is a point read and `stats_all` pages through
counter documents only, whatever the number of jobs.

Throttling: the client retries 429 answers itself, waiting as the service's
retry-after asks, up to `retry_total` times within `retry_backoff_max` seconds
(client options set in jobs.cosmos_setup.connect). What still fails, and every
network error, timeout or 5xx, surfaces as StoreUnavailableError, which the
worker's tracker buffers and replays.

Retention: finished jobs get an item `ttl` of retention + expiry_grace. Cosmos
deletes expired items without touching the counters, so run `purge` with the
retention more often than the grace (it deletes with exact counter updates);
the ttl is the backstop, and `recount` repairs counters after it fired.

`round_trips` counts the HTTP responses to this store's requests (query pages
and retries included), so tests can assert what an operation costs.
"""

from __future__ import annotations

import builtins
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any, Final, Self, cast

from azure.core import MatchConditions
from azure.core.async_paging import AsyncPageIterator
from azure.core.credentials_async import AsyncTokenCredential
from azure.cosmos.aio import ContainerProxy, CosmosClient
from azure.cosmos.exceptions import (
    CosmosAccessConditionFailedError,
    CosmosBatchOperationError,
    CosmosResourceExistsError,
    CosmosResourceNotFoundError,
)

from jobs.cosmos_containers import jobs_container_spec
from jobs.cosmos_setup import CosmosConnection, open_containers, unavailable_errors
from jobs.errors import InvalidJobError, JobNotFoundError, StoreUnavailableError, TransitionConflictError
from jobs.model import (
    TERMINAL,
    Job,
    JobMetadata,
    JobStatus,
    check_transition,
    format_time,
    parse_time,
    utcnow,
    validate_id,
    validate_tenant_id,
)
from jobs.store import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    UNSET,
    Page,
    Position,
    StuckJobs,
    _Unset,
    decode_continuation,
    empty_stats,
    encode_continuation,
)

log = logging.getLogger(__name__)

COUNTERS_ID: Final = "__counters__"  # job ids start with a letter or digit, so never collide
JOB_TYPE: Final = "job"
COUNTERS_TYPE: Final = "counters"
DEFAULT_DATABASE: Final = "embedding-jobs"
DEFAULT_CONTAINER: Final = "embedding-jobs"
DEFAULT_EXPIRY_GRACE: Final = timedelta(days=1)
MAX_BATCH_OPERATIONS: Final = 100  # the service's limit per transactional batch
SCAN_PAGE_SIZE: Final = 1000
# Rounds of "the batch failed, look, try again" before giving up; each round means another
# writer changed the same job or counters in between, which is rare.
_ATTEMPTS: Final = 5
S = JobStatus


def _params(**values: Any) -> list[dict[str, Any]]:
    return [{"name": f"@{name}", "value": value} for name, value in values.items()]


def _stats_of(doc: dict[str, Any]) -> dict[JobStatus, int]:
    out = empty_stats()
    for status in JobStatus:
        out[status] = int(doc.get(status.value) or 0)
    return out


def _counters_doc(tenant_id: str, stats: dict[JobStatus, int]) -> dict[str, Any]:
    return {
        "id": COUNTERS_ID,
        "tenantId": tenant_id,
        "type": COUNTERS_TYPE,
        **{status.value: count for status, count in stats.items()},
    }


def _incr(deltas: dict[JobStatus, int]) -> list[dict[str, Any]]:
    return [{"op": "incr", "path": f"/{status.value}", "value": n} for status, n in deltas.items() if n]


def _require_job_id(tenant_id: str, job_id: str) -> None:
    """Validate the tenant; JobNotFoundError for an id no job can have (so it never reaches a URL)."""
    validate_tenant_id(tenant_id)
    try:
        validate_id(job_id, "job id")
    except InvalidJobError:
        raise JobNotFoundError(tenant_id, job_id) from None


def _failed(exc: CosmosBatchOperationError) -> tuple[int, int]:
    """(index, status) of the operation that failed a batch."""
    return int(exc.error_index if exc.error_index is not None else -1), int(exc.status_code or 0)


class CosmosJobStore:
    """JobStore on one Cosmos DB container partitioned by tenant, with a counter document per tenant."""

    def __init__(
        self,
        container: ContainerProxy,
        *,
        retention: timedelta | None = None,
        expiry_grace: timedelta = DEFAULT_EXPIRY_GRACE,
        connection: CosmosConnection | None = None,
    ) -> None:
        self.container = container
        self._connection = connection
        self.ttl: int | None = None
        if retention is not None and retention > timedelta(0):
            self.ttl = max(1, round((retention + expiry_grace).total_seconds()))
        self.round_trips = 0

    @classmethod
    async def open(
        cls,
        *,
        endpoint: str = "",
        key: str = "",
        credential: AsyncTokenCredential | None = None,
        client: CosmosClient | None = None,
        database: str = DEFAULT_DATABASE,
        container: str = DEFAULT_CONTAINER,
        create_if_missing: bool = False,
        retention: timedelta | None = None,
        expiry_grace: timedelta = DEFAULT_EXPIRY_GRACE,
        verify: bool = True,
    ) -> Self:
        """Open the store on client, or on a client for endpoint (key, else credential or DefaultAzureCredential).

        verify=False opens it without reading the container, for a worker starting while the
        store is unavailable.
        """
        [(proxy, properties)], connection = await open_containers(
            [jobs_container_spec(container, retention)],
            database=database,
            client=client,
            endpoint=endpoint,
            key=key,
            credential=credential,
            create=create_if_missing,
            verify=verify,
        )
        if verify and retention and properties.get("defaultTtl") is None:
            log.warning(
                "container %s has TTL off, so finished jobs will not expire: run `embedding-jobs init-db`", container
            )
        return cls(proxy, retention=retention, expiry_grace=expiry_grace, connection=connection)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client if this store opened it."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    def _count(self, _response: object) -> None:
        self.round_trips += 1

    async def ping(self) -> None:
        """Raise StoreUnavailableError unless the container can be read."""
        with unavailable_errors("ping"):
            await self.container.read(raw_response_hook=self._count)

    # -- writes -----------------------------------------------------------------

    def _job_doc(self, job: Job) -> dict[str, Any]:
        doc = {**job.to_json(), "type": JOB_TYPE}
        if self.ttl is not None and job.status in TERMINAL:
            doc["ttl"] = self.ttl
        return doc

    async def _batch(self, tenant_id: str, operations: Sequence[Any], what: str) -> list[dict[str, Any]]:
        with unavailable_errors(what):
            results = await self.container.execute_item_batch(
                operations, partition_key=tenant_id, raw_response_hook=self._count
            )
        return list(results)

    async def create(self, job: Job) -> Job:
        """Insert job and count it in one batch; if the tenant already has that id, return the stored job."""
        doc = self._job_doc(job)
        count = _incr({job.status: 1})
        for _ in range(_ATTEMPTS):
            try:
                try:
                    await self._batch(
                        job.tenant_id, [("create", (doc,)), ("patch", (COUNTERS_ID, count))], "create job"
                    )
                    return job
                except CosmosBatchOperationError as exc:
                    if _failed(exc) != (1, 404):
                        raise
                # The tenant's first job: create its counter document in the same batch.
                counters = _counters_doc(job.tenant_id, {**empty_stats(), job.status: 1})
                await self._batch(job.tenant_id, [("create", (doc,)), ("create", (counters,))], "create job")
                return job
            except CosmosBatchOperationError as exc:
                failed = _failed(exc)
                if failed == (0, 409):
                    try:
                        return await self.get(job.tenant_id, job.id)
                    except JobNotFoundError:
                        continue  # purged in between: insert it after all
                if failed == (1, 409):
                    continue  # another writer created the counter document first
                raise
        raise StoreUnavailableError(f"job {job.id}: its tenant's records kept changing during create")

    async def transition(
        self,
        tenant_id: str,
        job_id: str,
        from_status: JobStatus,
        to_status: JobStatus,
        *,
        error: str | _Unset | None = UNSET,
        retry_count: int | None = None,
        metadata: JobMetadata | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Patch the job, conditioned on from_status, and move its count, in one batch; read only on failure."""
        _require_job_id(tenant_id, job_id)
        check_transition(from_status, to_status)
        expected, target = JobStatus(from_status), JobStatus(to_status)
        now = format_time(utcnow())
        patch: list[dict[str, Any]] = [
            {"op": "set", "path": "/status", "value": target.value},
            {"op": "set", "path": "/updatedAt", "value": now},
        ]
        if target in TERMINAL:
            patch.append({"op": "set", "path": "/completedAt", "value": now})
            if self.ttl is not None:
                patch.append({"op": "set", "path": "/ttl", "value": self.ttl})
        elif target is S.PENDING:
            patch.append({"op": "set", "path": "/completedAt", "value": None})
        if expected in TERMINAL:
            patch.append({"op": "set", "path": "/ttl", "value": -1})  # reopened: never expires
        if not isinstance(error, _Unset):
            patch.append({"op": "set", "path": "/error", "value": error})
        if retry_count is not None:
            patch.append({"op": "set", "path": "/retryCount", "value": retry_count})
        if metadata is not None:
            patch.append({"op": "set", "path": "/metadata", "value": metadata.to_json()})
        if trace_id is not None:
            patch.append({"op": "set", "path": "/traceId", "value": trace_id})
        # Filter predicates take no parameters; the literal is a JobStatus value, never caller text.
        condition = f"FROM c WHERE c.status = '{expected.value}'"
        operations: list[Any] = [("patch", (job_id, patch), {"filter_predicate": condition})]
        if expected is not target:
            operations.append(("patch", (COUNTERS_ID, _incr({expected: -1, target: 1}))))
        for _ in range(_ATTEMPTS):
            try:
                await self._batch(tenant_id, operations, f"transition job {job_id}")
            except CosmosBatchOperationError as exc:
                failed = _failed(exc)
                if failed == (0, 404):
                    raise JobNotFoundError(tenant_id, job_id) from None
                if failed == (0, 412):
                    current = await self.get(tenant_id, job_id)
                    if current.status is not expected:
                        raise TransitionConflictError(job_id, expected.value, current.status.value) from None
                    continue  # it left from_status and came back before the read: try again
                if failed == (1, 404):
                    await self._restore_counters(tenant_id)
                    continue
                raise
            return
        raise TransitionConflictError(job_id, expected.value, expected.value)

    async def _restore_counters(self, tenant_id: str) -> None:
        # Only a hand-deleted counter document gets here; counts restart at zero until a recount.
        try:
            with unavailable_errors("restore counters"):
                await self.container.create_item(_counters_doc(tenant_id, empty_stats()), raw_response_hook=self._count)
        except CosmosResourceExistsError:
            pass

    async def _tenants(self) -> builtins.list[str]:
        """Every tenant that has a counter document, i.e. that ever had a job."""
        return sorted(await self.stats_all())

    async def purge(self, older_than: timedelta, tenant_id: str | None = None) -> int:
        """Delete finished jobs completed before now - older_than, uncounting them, tenant by tenant."""
        cutoff = format_time(utcnow() - older_than)
        if tenant_id is not None:
            validate_tenant_id(tenant_id)
            return await self._purge_tenant(tenant_id, cutoff)
        return sum([await self._purge_tenant(tenant, cutoff) for tenant in await self._tenants()])

    async def _purge_tenant(self, tenant_id: str, cutoff: str) -> int:
        sql = (
            "SELECT TOP @top c.id, c.status, c._etag FROM c WHERE c.tenantId = @tenant AND c.type = @type "
            "AND c.status IN (@completed, @deadLettered) AND c.completedAt < @cutoff"
        )
        params = _params(
            top=SCAN_PAGE_SIZE,
            tenant=tenant_id,
            type=JOB_TYPE,
            completed=S.COMPLETED.value,
            deadLettered=S.DEAD_LETTERED.value,
            cutoff=cutoff,
        )
        deleted = 0
        # Query afresh after each round rather than page on: the deletions would shift the pages.
        while True:
            docs = [doc async for page in self._pages(sql, params, tenant_id) for doc in page]
            removed = 0
            for start in range(0, len(docs), MAX_BATCH_OPERATIONS - 1):
                removed += await self._delete_jobs(tenant_id, docs[start : start + MAX_BATCH_OPERATIONS - 1])
            deleted += removed
            if len(docs) < SCAN_PAGE_SIZE or not removed:
                return deleted

    async def _delete_jobs(self, tenant_id: str, docs: builtins.list[dict[str, Any]]) -> int:
        """Delete docs (each only if unchanged since read) and uncount them, in one batch."""
        remaining = list(docs)
        while remaining:
            uncount = Counter(JobStatus(doc["status"]) for doc in remaining)
            operations: list[Any] = [("delete", (doc["id"],), {"if_match_etag": doc["_etag"]}) for doc in remaining]
            operations.append(("patch", (COUNTERS_ID, _incr({s: -n for s, n in uncount.items()}))))
            try:
                await self._batch(tenant_id, operations, "purge jobs")
                return len(remaining)
            except CosmosBatchOperationError as exc:
                index, status = _failed(exc)
                if index < len(remaining) and status in (404, 412):
                    del remaining[index]  # deleted or changed since the query: leave it
                elif (index, status) == (len(remaining), 404):
                    await self._restore_counters(tenant_id)
                else:
                    raise
        return 0

    async def recount(self, tenant_id: str | None = None) -> dict[str, dict[JobStatus, int]]:
        """Rebuild counters from the job documents, of one tenant or of all that have counters; return them.

        Each tenant is counted by a query in its own partition.
        """
        if tenant_id is not None:
            validate_tenant_id(tenant_id)
            return {tenant_id: await self._recount_tenant(tenant_id, drop_empty=False)}
        result: dict[str, dict[JobStatus, int]] = {}
        for tenant in await self._tenants():
            # As in SQLite, a recount of all tenants forgets those left without jobs.
            stats = await self._recount_tenant(tenant, drop_empty=True)
            if any(stats.values()):
                result[tenant] = stats
        return result

    async def _recount_tenant(self, tenant_id: str, *, drop_empty: bool) -> dict[JobStatus, int]:
        """Count the tenant's jobs and write the counts, unless a writer changed them meanwhile (then again)."""
        sql = "SELECT VALUE c.status FROM c WHERE c.tenantId = @tenant AND c.type = @type"
        for _ in range(_ATTEMPTS):
            try:
                with unavailable_errors("recount"):
                    etag = (await self._read(COUNTERS_ID, tenant_id))["_etag"]
            except CosmosResourceNotFoundError:
                etag = None
            stats = empty_stats()
            async for page in self._pages(sql, _params(tenant=tenant_id, type=JOB_TYPE), tenant_id):
                for status in page:
                    stats[JobStatus(status)] += 1
            if await self._write_counters(tenant_id, stats, etag, drop_empty=drop_empty):
                return stats
        raise StoreUnavailableError(f"the counters of tenant {tenant_id} kept changing during the recount")

    async def _write_counters(
        self, tenant_id: str, stats: dict[JobStatus, int], etag: str | None, *, drop_empty: bool
    ) -> bool:
        """Write counts unless the counter document changed since etag was read (then False)."""
        doc = _counters_doc(tenant_id, stats)
        try:
            with unavailable_errors("write counters"):
                if etag is None:
                    if any(stats.values()):
                        await self.container.create_item(doc, raw_response_hook=self._count)
                elif drop_empty and not any(stats.values()):
                    await self.container.delete_item(
                        COUNTERS_ID,
                        partition_key=tenant_id,
                        etag=etag,
                        match_condition=MatchConditions.IfNotModified,
                        raw_response_hook=self._count,
                    )
                else:
                    await self.container.replace_item(
                        COUNTERS_ID,
                        doc,
                        etag=etag,
                        match_condition=MatchConditions.IfNotModified,
                        raw_response_hook=self._count,
                    )
        except (CosmosAccessConditionFailedError, CosmosResourceExistsError, CosmosResourceNotFoundError):
            return False
        return True

    # -- reads ------------------------------------------------------------------

    async def _read(self, item_id: str, tenant_id: str) -> dict[str, Any]:
        return dict(await self.container.read_item(item_id, partition_key=tenant_id, raw_response_hook=self._count))

    async def get(self, tenant_id: str, job_id: str) -> Job:
        """Point read of the tenant's job; JobNotFoundError if none."""
        _require_job_id(tenant_id, job_id)
        try:
            with unavailable_errors(f"read job {job_id}"):
                doc = await self._read(job_id, tenant_id)
        except CosmosResourceNotFoundError:
            raise JobNotFoundError(tenant_id, job_id) from None
        if doc.get("type") != JOB_TYPE:
            raise JobNotFoundError(tenant_id, job_id)
        return Job.from_json(doc)

    async def _pages(
        self,
        sql: str,
        params: builtins.list[dict[str, Any]],
        tenant_id: str | None = None,
        page_size: int = SCAN_PAGE_SIZE,
    ) -> AsyncIterator[builtins.list[Any]]:
        """Pages of a parameterised query: in tenant_id's partition, or across partitions when None."""
        options: dict[str, Any] = {"parameters": params, "max_item_count": page_size}
        if tenant_id is not None:
            options["partition_key"] = tenant_id
        pages = cast(
            AsyncPageIterator[Any],
            self.container.query_items(sql, raw_response_hook=self._count, **options).by_page(),
        )
        while True:
            with unavailable_errors("query"):
                try:
                    page = await anext(pages)
                except StopAsyncIteration:
                    return
                items = [item async for item in page]
            yield items

    async def list(
        self,
        tenant_id: str,
        status: JobStatus | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        continuation: str | None = None,
    ) -> Page:
        """Newest first by (createdAt, id), in the tenant's partition, resumed by a keyset token."""
        validate_tenant_id(tenant_id)
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        query = {"t": tenant_id, "s": status.value if status else None}
        params = _params(top=limit + 1, tenant=tenant_id)
        if status is not None:
            # The counter document has no status field, so this filter alone excludes it.
            where = ["c.tenantId = @tenant", "c.status = @status"]
            order = "c.tenantId ASC, c.status ASC, c.createdAt DESC, c.id DESC"
            params += _params(status=JobStatus(status).value)
        else:
            where = ["c.tenantId = @tenant", "c.type = @type"]
            order = "c.tenantId ASC, c.type ASC, c.createdAt DESC, c.id DESC"
            params += _params(type=JOB_TYPE)
        if continuation is not None:
            position = decode_continuation(continuation, query)
            where.append("(c.createdAt < @afterCreated OR (c.createdAt = @afterCreated AND c.id < @afterId))")
            params += _params(afterCreated=position.created_at, afterId=position.job_id)
        # Only fixed clauses are joined in; every value is a parameter.
        sql = f"SELECT TOP @top * FROM c WHERE {' AND '.join(where)} ORDER BY {order}"  # noqa: S608
        docs: builtins.list[dict[str, Any]] = []
        async for page in self._pages(sql, params, tenant_id, page_size=limit + 1):
            docs.extend(page)
        items = [Job.from_json(doc) for doc in docs[:limit]]
        token = None
        if len(docs) > limit:
            last = docs[limit - 1]
            token = encode_continuation(query, Position(last["createdAt"], last["id"]))
        return Page(items=items, continuation=token)

    async def stats(self, tenant_id: str) -> dict[JobStatus, int]:
        """The tenant's counts: one point read of its counter document."""
        validate_tenant_id(tenant_id)
        try:
            with unavailable_errors("read counters"):
                return _stats_of(await self._read(COUNTERS_ID, tenant_id))
        except CosmosResourceNotFoundError:
            return empty_stats()

    async def stats_all(self) -> dict[str, dict[JobStatus, int]]:
        """Every tenant's counts: counter documents only, a page per SCAN_PAGE_SIZE tenants."""
        result: dict[str, dict[JobStatus, int]] = {}
        async for page in self._pages("SELECT * FROM c WHERE c.type = @type", _params(type=COUNTERS_TYPE)):
            for doc in page:
                result[doc["tenantId"]] = _stats_of(doc)
        return result

    async def stuck(
        self,
        older_than: timedelta,
        statuses: Sequence[JobStatus] = (S.PENDING, S.PROCESSING),
    ) -> builtins.list[StuckJobs]:
        """Per tenant and status, jobs not updated since now - older_than (a cross-partition operator view)."""
        if not statuses:
            return []
        names = {f"s{i}": JobStatus(status).value for i, status in enumerate(statuses)}
        marks = ", ".join(f"@{name}" for name in names)
        # Only generated parameter names are formatted in; every value is a parameter.
        sql = (
            "SELECT c.tenantId, c.status, c.updatedAt FROM c "  # noqa: S608
            f"WHERE c.type = @type AND c.status IN ({marks}) AND c.updatedAt < @cutoff"
        )
        params = _params(type=JOB_TYPE, cutoff=format_time(utcnow() - older_than), **names)
        groups: dict[tuple[str, JobStatus], tuple[int, str]] = {}
        async for page in self._pages(sql, params):
            for row in page:
                key = (row["tenantId"], JobStatus(row["status"]))
                count, oldest = groups.get(key, (0, row["updatedAt"]))
                groups[key] = (count + 1, min(oldest, row["updatedAt"]))
        return [
            StuckJobs(tenant_id=tenant, status=status, count=count, oldest_updated_at=parse_time(oldest))
            for (tenant, status), (count, oldest) in sorted(groups.items())
        ]
