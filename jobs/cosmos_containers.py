"""The job and lease containers of Cosmos DB: their partition keys, indexes and TTL.

The shard container's spec lives with the shard store (worker/cosmos_shards.py).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from jobs.cosmos_setup import ASC, DESC, ContainerSpec

DEFAULT_LEASES_CONTAINER: Final = "leases"


def _composite(*paths: tuple[str, str]) -> list[dict[str, str]]:
    return [{"path": f"/{name}", "order": order} for name, order in paths]


# Each composite index serves one query of jobs/cosmos_store.py. Equality filters lead,
# and the ORDER BY repeats them, so the index serves filter and order together.
JOBS_COMPOSITE_INDEXES: Final = [
    # list(status=...): the design's (tenantId, status, createdAt DESC), plus id for a total order.
    _composite(("tenantId", ASC), ("status", ASC), ("createdAt", DESC), ("id", DESC)),
    # list() without a status: job documents of the tenant, newest first.
    _composite(("tenantId", ASC), ("type", ASC), ("createdAt", DESC), ("id", DESC)),
    # A shard's jobs, latest first (from the design; for lookups by shard).
    _composite(("tenantId", ASC), ("shardId", ASC), ("updatedAt", DESC)),
    # stuck(): status IN (...) AND updatedAt < cutoff, across tenants.
    _composite(("type", ASC), ("status", ASC), ("updatedAt", ASC)),
    # purge(): finished jobs with completedAt < cutoff.
    _composite(("type", ASC), ("status", ASC), ("completedAt", ASC)),
]
JOBS_INDEXING_POLICY: Final = {
    "indexingMode": "consistent",
    "automatic": True,
    "includedPaths": [{"path": "/*"}],
    # Never filtered on: indexing them would only add to the cost of every write.
    "excludedPaths": [{"path": '/"_etag"/?'}, {"path": "/error/?"}, {"path": "/metadata/*"}],
    "compositeIndexes": JOBS_COMPOSITE_INDEXES,
}



def jobs_container_spec(name: str, retention: timedelta | None) -> ContainerSpec:
    """The job container: per tenant, composite indexes, TTL on (-1) only when retention is set."""
    # -1 switches TTL on without expiring anything by default: only finished jobs carry a ttl.
    return ContainerSpec(name, "/tenantId", JOBS_INDEXING_POLICY, -1 if retention else None)


def leases_container_spec(name: str) -> ContainerSpec:
    """Leases: the exporters' state lease and the feeder's state, small documents read by id, each its own partition."""
    return ContainerSpec(name, "/id")
