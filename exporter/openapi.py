"""The OpenAPI 3.1 document of every exporter endpoint, built as a plain dict."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from jobs.model import ID_MAX_LENGTH, SAFE_ID, TENANT_ID_MAX_LENGTH, JobStatus
from jobs.store import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

OPENAPI_PATH = "/api/v1/openapi.json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def _param(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/parameters/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _version() -> str:
    try:
        return metadata.version("embedding-jobs")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


def _schemas() -> dict[str, Any]:
    statuses = [status.value for status in JobStatus]
    timestamp = {"type": "string", "format": "date-time", "description": "ISO-8601 UTC with milliseconds and Z"}
    identifier = {"type": "string", "pattern": SAFE_ID.pattern, "maxLength": ID_MAX_LENGTH}
    stats = {
        "type": "object",
        "description": "Job count per status; every status is present.",
        "properties": {status: {"type": "integer", "minimum": 0} for status in statuses},
        "required": statuses,
        "additionalProperties": False,
    }
    return {
        "JobStatus": {"type": "string", "enum": statuses},
        "TenantId": {"type": "string", "pattern": SAFE_ID.pattern, "maxLength": TENANT_ID_MAX_LENGTH},
        "JobMetadata": {
            "type": "object",
            "description": "What the completed attempt produced.",
            "properties": {
                "embeddingModel": {"type": "string"},
                "vectorCount": {"type": "integer", "minimum": 0},
                "processingTimeMs": {"type": "number", "minimum": 0},
                "chunkCount": {"type": "integer", "minimum": 0},
            },
        },
        "Job": {
            "type": "object",
            "description": "One embedding job: a shard of one tenant turned into vectors.",
            "properties": {
                "id": identifier,
                "tenantId": _ref("TenantId"),
                "shardId": identifier,
                "shardTypeId": identifier,
                "status": _ref("JobStatus"),
                "retryCount": {"type": "integer", "minimum": 0},
                "error": {"type": "string", "description": "Why the last attempt failed."},
                "createdAt": timestamp,
                "updatedAt": timestamp,
                "completedAt": timestamp,
                "traceId": {"type": "string", "description": "W3C trace id of the last attempt (32 hex digits)."},
                "metadata": _ref("JobMetadata"),
            },
            "required": [
                "id",
                "tenantId",
                "shardId",
                "shardTypeId",
                "status",
                "retryCount",
                "createdAt",
                "updatedAt",
                "metadata",
            ],
        },
        "Stats": stats,
        "TenantStats": {
            "type": "object",
            "properties": {"tenantId": _ref("TenantId"), "stats": _ref("Stats")},
            "required": ["tenantId", "stats"],
        },
        "AllTenantStats": {
            "type": "object",
            "description": "Counts of every tenant the caller may read, keyed by tenant id.",
            "properties": {"tenants": {"type": "object", "additionalProperties": _ref("Stats")}},
            "required": ["tenants"],
        },
        "Page": {
            "type": "object",
            "description": "Jobs newest first; pass continuationToken back to read the next page.",
            "properties": {
                "items": {"type": "array", "items": _ref("Job")},
                "continuationToken": {
                    "type": ["string", "null"],
                    "description": "Opaque; null on the last page.",
                },
            },
            "required": ["items", "continuationToken"],
        },
        "TenantOverview": {
            "type": "object",
            "properties": {
                "tenantId": _ref("TenantId"),
                "stats": _ref("Stats"),
                "total": {"type": "integer", "minimum": 0},
                "failureRatio": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 1,
                    "description": "(failed + dead_lettered) / (completed + failed + dead_lettered), 0 if none.",
                },
            },
            "required": ["tenantId", "stats", "total", "failureRatio"],
        },
        "Overview": {
            "type": "object",
            "description": "What the status page shows, restricted to the tenants the caller may read.",
            "properties": {
                "generatedAt": timestamp,
                "tenants": {
                    "type": "array",
                    "items": _ref("TenantOverview"),
                    "description": "Sorted by tenant id.",
                },
                "recentFailures": {
                    "type": "array",
                    "items": _ref("Job"),
                    "description": "Failed and dead-lettered jobs, most recently updated first; a bounded number.",
                },
                "truncated": {
                    "type": "boolean",
                    "description": "True when recent failures come from only some of the tenants with failures.",
                },
            },
            "required": ["generatedAt", "tenants", "recentFailures", "truncated"],
        },
        "Error": {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "string", "description": "Stable, machine-readable, e.g. invalid_limit."},
                        "message": {"type": "string", "description": "What was wrong, for people."},
                    },
                    "required": ["code", "message"],
                }
            },
            "required": ["error"],
        },
        "Health": {
            "type": "object",
            "properties": {"status": {"type": "string"}},
            "required": ["status"],
        },
    }


def _parameters() -> dict[str, Any]:
    statuses = ", ".join(status.value for status in JobStatus)
    return {
        "TenantId": {
            "name": "tenantId",
            "in": "query",
            "required": True,
            "description": "The tenant whose jobs to read; the token must allow it.",
            "schema": _ref("TenantId"),
        },
        "OptionalTenantId": {
            "name": "tenantId",
            "in": "query",
            "required": False,
            "description": "One tenant; without it, every tenant the token may read.",
            "schema": _ref("TenantId"),
        },
        "JobId": {
            "name": "jobId",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": SAFE_ID.pattern, "maxLength": ID_MAX_LENGTH},
        },
        "Status": {
            "name": "status",
            "in": "query",
            "required": False,
            "description": f"Only jobs in this status ({statuses}).",
            "schema": _ref("JobStatus"),
        },
        "Limit": {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": "Page size.",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE_SIZE, "default": DEFAULT_PAGE_SIZE},
        },
        "ContinuationToken": {
            "name": "continuationToken",
            "in": "query",
            "required": False,
            "description": "The previous page's continuationToken, with the same tenantId and status.",
            "schema": {"type": "string"},
        },
    }


def _responses() -> dict[str, Any]:
    error = _ref("Error")
    return {
        "BadRequest": _json(
            error,
            "A parameter is missing or invalid (codes: missing_parameter, invalid_parameter, invalid_tenant, "
            "invalid_status, invalid_limit, invalid_continuation_token, invalid_job_id).",
        ),
        "Unauthorized": {
            **_json(error, "No valid bearer token (code: unauthorized)."),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        },
        "Forbidden": _json(error, "The token may not read this tenant (code: forbidden)."),
        "NotFound": _json(error, "The tenant has no job with this id (code: not_found)."),
        "StoreUnavailable": _json(
            error,
            "The job store cannot be reached (code: store_unavailable) or did not answer within the store "
            "timeout (code: store_timeout); try again later.",
        ),
    }


def _api_paths() -> dict[str, Any]:
    common = {
        "400": _response("BadRequest"),
        "401": _response("Unauthorized"),
        "403": _response("Forbidden"),
        "503": _response("StoreUnavailable"),
    }
    return {
        "/api/v1/embedding-jobs": {
            "get": {
                "operationId": "listJobs",
                "summary": "A page of a tenant's jobs, newest first",
                "tags": ["jobs"],
                "parameters": [_param("TenantId"), _param("Status"), _param("Limit"), _param("ContinuationToken")],
                "responses": {"200": _json(_ref("Page"), "A page of jobs."), **common},
            }
        },
        "/api/v1/embedding-jobs/stats": {
            "get": {
                "operationId": "getStats",
                "summary": "Job counts per status, of one tenant or of every tenant the token may read",
                "tags": ["jobs"],
                "parameters": [_param("OptionalTenantId")],
                "responses": {
                    "200": _json(
                        {"oneOf": [_ref("TenantStats"), _ref("AllTenantStats")]},
                        "TenantStats with tenantId, AllTenantStats without.",
                    ),
                    **common,
                },
            }
        },
        "/api/v1/embedding-jobs/{jobId}": {
            "parameters": [_param("JobId")],
            "get": {
                "operationId": "getJob",
                "summary": "One job",
                "tags": ["jobs"],
                "parameters": [_param("TenantId")],
                "responses": {"200": _json(_ref("Job"), "The job."), "404": _response("NotFound"), **common},
            },
        },
        "/api/v1/embedding-jobs/{jobId}/retry": {
            "parameters": [_param("JobId")],
            "post": {
                "operationId": "retryJob",
                "summary": "Put a failed or dead-lettered job back to pending and send its message again",
                "description": (
                    "The job's retryCount is reset to 0 and its last error kept. If the message cannot be "
                    "sent within the queue timeout, the job is dead-lettered with the reason and the answer is "
                    "503 (enqueue_failed). If the store does not confirm the change within the store timeout, "
                    "the answer is 503 (store_timeout) and the change may still be applied: its message is "
                    "then sent, so the job is never left pending without one."
                ),
                "tags": ["jobs"],
                "parameters": [_param("TenantId")],
                "responses": {
                    "202": _json(_ref("Job"), "The job, now pending; its message is on the queue."),
                    "404": _response("NotFound"),
                    "409": _json(
                        _ref("Error"),
                        "The job is neither failed nor dead_lettered (code: conflict); the message names its status.",
                    ),
                    **common,
                    "503": _json(
                        _ref("Error"),
                        "The store cannot be reached (store_unavailable) or did not answer in time "
                        "(store_timeout), no queue is configured (retry_unavailable), or the message could not "
                        "be sent (enqueue_failed).",
                    ),
                },
            },
        },
        "/api/v1/overview": {
            "get": {
                "operationId": "getOverview",
                "summary": "Per-tenant counts, failure ratios and recent failures, for the status page",
                "tags": ["status"],
                "responses": {
                    "200": _json(_ref("Overview"), "The overview."),
                    "401": _response("Unauthorized"),
                    "503": _response("StoreUnavailable"),
                },
            }
        },
        OPENAPI_PATH: {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document",
                "tags": ["meta"],
                "security": [],
                "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
            }
        },
    }


def _service_paths() -> dict[str, Any]:
    return {
        "/healthz": {
            "get": {
                "operationId": "getHealth",
                "summary": "Liveness: the process answers",
                "tags": ["operations"],
                "security": [],
                "responses": {"200": _json(_ref("Health"), "Alive.")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "getReadiness",
                "summary": "Readiness: the job store answers within a short timeout",
                "tags": ["operations"],
                "security": [],
                "responses": {"200": _json(_ref("Health"), "Ready."), "503": _response("StoreUnavailable")},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "summary": "Prometheus metrics; OpenMetrics with exemplars when the Accept header asks for it",
                "tags": ["operations"],
                # The metrics token is separate from API tokens and optional (empty: open).
                "security": [{"metricsToken": []}, {}],
                "responses": {
                    "200": {
                        "description": "The exposition.",
                        "content": {
                            "text/plain; version=0.0.4": {"schema": {"type": "string"}},
                            "application/openmetrics-text; version=1.0.0": {"schema": {"type": "string"}},
                        },
                    },
                    "401": _response("Unauthorized"),
                },
            }
        },
        "/": {
            "get": {
                "operationId": "getStatusPage",
                "summary": "Status page (HTML); it reads /api/v1/overview with a token the user enters",
                "tags": ["status"],
                "security": [],
                "responses": {"200": {"description": "The page.", "content": {"text/html": {}}}},
            }
        },
    }


def build_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document for the exporter's routes."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "embedding-jobs exporter",
            "version": _version(),
            "description": (
                "Job status API, metrics and status page of the embedding-jobs exporter. "
                'Errors are JSON {"error": {"code", "message"}}. The OTLP/HTTP trace receiver (POST /v1/traces) '
                "is served on a listener of its own (EMBEDDING_JOBS_OTLP_PORT, loopback by default), not here."
            ),
        },
        "tags": [
            {"name": "jobs", "description": "Embedding job records of one tenant."},
            {"name": "status", "description": "The status page and the overview it shows."},
            {"name": "operations", "description": "Health, readiness and metrics."},
            {"name": "meta", "description": "This document."},
        ],
        "security": [{"apiToken": []}],
        "paths": {**_api_paths(), **_service_paths()},
        "components": {
            "schemas": _schemas(),
            "parameters": _parameters(),
            "responses": _responses(),
            "securitySchemes": {
                "apiToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token; each maps to the tenants it may read, or to all (operators).",
                },
                "metricsToken": {"type": "http", "scheme": "bearer", "description": "The /metrics token, if set."},
            },
        },
    }
