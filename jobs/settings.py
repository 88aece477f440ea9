"""One settings object for every command, read from flags and EMBEDDING_JOBS_* variables.

Each field documents itself once: its help text feeds `--help`, its name gives
both the flag (`--max-attempts`) and the variable (`EMBEDDING_JOBS_MAX_ATTEMPTS`).
A flag beats a variable, a variable beats the default.
"""

from __future__ import annotations

import argparse
import functools
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Self

ENV_PREFIX = "EMBEDDING_JOBS_"


def _opt(default: Any, help: str, section: str, *, secret: bool = False, choices: Sequence[str] = ()) -> Any:
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "section": section, "secret": secret, "choices": tuple(choices)},
    )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Configuration of the store, queue, embedder, worker and exporter."""

    # store
    store: str = _opt("sqlite", "job and shard store backend", "store", choices=("sqlite", "cosmos"))
    data_dir: Path = _opt(Path("var"), "folder for the local SQLite files and the worker's tracking spool", "store")
    cosmos_endpoint: str = _opt("", "Cosmos DB endpoint (https://ACCOUNT.documents.azure.com)", "store")
    cosmos_key: str = _opt(
        "", "Cosmos DB key; when empty, Microsoft Entra ID (DefaultAzureCredential)", "store", secret=True
    )
    cosmos_database: str = _opt("embedding-jobs", "Cosmos DB database", "store")
    cosmos_container: str = _opt("embedding-jobs", "Cosmos DB container of job records", "store")
    cosmos_shards_container: str = _opt("shards", "Cosmos DB container of shards", "store")
    cosmos_leases_container: str = _opt("leases", "Cosmos DB container of the feeder's position", "store")
    retention_hours: float = _opt(0.0, "delete finished jobs older than this (0 keeps them)", "store")
    store_timeout: float = _opt(
        5.0,
        "seconds one job-store call may take before the API answers 503 and the worker buffers the write",
        "store",
    )

    # queue
    queue: str = _opt("local", "queue backend", "queue", choices=("local", "servicebus"))
    queue_name: str = _opt("embedding-jobs", "queue name", "queue")
    servicebus_connection_string: str = _opt("", "Service Bus connection string", "queue", secret=True)
    servicebus_namespace: str = _opt(
        "", "Service Bus namespace (NAME.servicebus.windows.net) for Entra ID auth", "queue"
    )
    lock_duration: float = _opt(30.0, "message lock duration in seconds (local queue)", "queue")
    max_delivery_count: int = _opt(10, "deliveries before the queue dead-letters a message", "queue")
    queue_timeout: float = _opt(10.0, "seconds one queue call made by the API or the state refresher may take", "queue")

    # embedder
    embedder: str = _opt(
        "hashing", "embedding backend", "embedder", choices=("hashing", "openai", "sentence-transformers")
    )
    embedding_dimensions: int = _opt(
        256, "vector size of the hashing embedder (the other embedders use their model's own size)", "embedder"
    )
    openai_endpoint: str = _opt("", "OpenAI-compatible or Azure OpenAI endpoint", "embedder")
    openai_api_key: str = _opt("", "API key for the embeddings endpoint", "embedder", secret=True)
    openai_model: str = _opt("text-embedding-3-small", "model, or Azure deployment name", "embedder")
    openai_api_version: str = _opt("", "Azure OpenAI api-version (set for Azure endpoints)", "embedder")
    openai_batch_size: int = _opt(16, "chunks per embeddings request", "embedder")
    openai_timeout: float = _opt(30.0, "embeddings request timeout in seconds", "embedder")
    chunk_max_tokens: int = _opt(512, "token budget per chunk (estimated conservatively)", "embedder")
    chunk_overlap_tokens: int = _opt(0, "tokens repeated between consecutive chunks", "embedder")

    # worker
    concurrency: int = _opt(4, "jobs processed at once", "worker")
    max_attempts: int = _opt(4, "attempts before a job is dead-lettered", "worker")
    backoff_base: float = _opt(2.0, "first retry delay (s); doubles per attempt, with jitter", "worker")
    backoff_max: float = _opt(300.0, "longest retry delay in seconds", "worker")
    drain_timeout: float = _opt(
        25.0,
        "seconds in-flight jobs get to finish on SIGTERM; keep below terminationGracePeriodSeconds",
        "worker",
    )
    reconcile_interval: float = _opt(
        300.0, "seconds between dead-letter reconcile passes inside the worker (0 turns them off)", "worker"
    )
    tracking_buffer: int = _opt(10_000, "job-store writes held while the store is down", "worker")
    heartbeat_file: str = _opt(
        "",
        "file the consume loop touches every second or so, for a liveness probe: "
        "python -m worker.heartbeat --max-age SECONDS FILE (empty: none)",
        "worker",
    )
    otlp_endpoint: str = _opt(
        "",
        "send spans over OTLP/HTTP to this base URL, e.g. the exporter's receiver at http://127.0.0.1:4318 "
        "(else OTEL_EXPORTER_OTLP_ENDPOINT)",
        "worker",
    )
    log_level: str = _opt("INFO", "log level", "worker", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _opt("text", "log format", "worker", choices=("text", "json"))

    # exporter
    exporter_host: str = _opt(
        "127.0.0.1", "address /metrics, the API and the status page listen on (0.0.0.0 in a pod)", "exporter"
    )
    exporter_port: int = _opt(8080, "port of /metrics, the API and the status page (0: any free port)", "exporter")
    otlp_host: str = _opt(
        "127.0.0.1",
        "address the OTLP/HTTP receiver (/v1/traces) listens on; any other than loopback needs otlp_token",
        "exporter",
    )
    otlp_port: int = _opt(4318, "port of the OTLP/HTTP receiver (0: any free port)", "exporter")
    otlp_token: str = _opt(
        "",
        "bearer token the OTLP receiver requires of every sender, and that a worker sends with its spans "
        "(empty: none, allowed only on a loopback otlp_host)",
        "exporter",
        secret=True,
    )
    api_tokens: str = _opt(
        "",
        "bearer tokens and the tenants each may read: 'TOKEN=tenant-a,tenant-b;OPS=*' "
        "(empty: the API is open, for local use only)",
        "exporter",
        secret=True,
    )
    metrics_token: str = _opt("", "bearer token required on /metrics (empty: open)", "exporter", secret=True)
    tenant_label_limit: int = _opt(
        1000, "distinct tenant label values before new tenants fold into __other__", "exporter"
    )
    metrics_detail: str = _opt(
        "compact",
        "per-tenant histogram detail: compact (at most 40 samples a tenant) or full (outcome split, finer buckets)",
        "exporter",
        choices=("compact", "full"),
    )
    metrics_cache_ttl: float = _opt(
        1.0, "seconds a rendered /metrics body is served again to other scrapes (0: render every scrape)", "exporter"
    )
    refresh_interval: float = _opt(15.0, "seconds between reads of the store for state metrics", "exporter")
    refresh_timeout: float = _opt(10.0, "seconds a store read for state metrics may take", "exporter")
    state_role: str = _opt(
        "elect",
        "which exporters read the store for state metrics: one elected per store through a lease, "
        "always (this one), or never",
        "exporter",
        choices=("elect", "always", "never"),
    )
    stuck_after: float = _opt(900.0, "seconds in pending/processing before a job counts as stuck", "exporter")
    forward_otlp_endpoint: str = _opt("", "forward received spans to this OTLP/HTTP base URL", "exporter")
    forward_queue_size: int = _opt(1024, "span batches held for forwarding before dropping", "exporter")

    @property
    def sqlite_path(self) -> Path:
        """The local store's SQLite file (jobs, shards and the local queue share it)."""
        return self.data_dir / "embedding-jobs.db"

    def redacted(self) -> dict[str, Any]:
        """All values with secrets masked, for logs and `config` output."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = ("***" if value else "") if f.metadata["secret"] else value
        return out

    @classmethod
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser,
        sections: Sequence[str],
        *,
        describe: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Add a flag for every field in the given sections.

        With describe, each flag's help shows its variable and default (a secret shows only
        whether its variable is set); without, the flags work but `--help` leaves them out.
        """
        environ = os.environ if environ is None else environ
        groups = {name: parser.add_argument_group(f"{name} settings") for name in sections} if describe else {}
        for f in fields(cls):
            section = f.metadata["section"]
            if section not in sections:
                continue
            env = ENV_PREFIX + f.name.upper()
            # A secret's value is never shown, only whether its variable is set.
            is_set = "(set)" if environ.get(env) else "(unset)"
            shown = is_set if f.metadata["secret"] else f"default: {f.default}"
            kwargs: dict[str, Any] = {
                "dest": f.name,
                "default": argparse.SUPPRESS,
                "help": f"{f.metadata['help']} [{env}; {shown}]" if describe else argparse.SUPPRESS,
            }
            choices = f.metadata["choices"]
            if choices:
                kwargs["choices"] = choices
                kwargs["type"] = functools.partial(_choice, choices)
            (groups[section] if describe else parser).add_argument("--" + f.name.replace("_", "-"), **kwargs)

    @classmethod
    def flags_summary(cls, sections: Sequence[str], width: int = 100) -> str:
        """One wrapped paragraph per section naming its flags: the short form of `--help`."""
        paragraphs = []
        for section in sections:
            flags = " ".join("--" + f.name.replace("_", "-") for f in fields(cls) if f.metadata["section"] == section)
            paragraphs.append(
                textwrap.fill(
                    flags, width, initial_indent=f"  {section}: ", subsequent_indent="    ", break_on_hyphens=False
                )
            )
        return "\n".join(paragraphs)

    @classmethod
    def load(cls, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Self:
        """Defaults, overridden by EMBEDDING_JOBS_* variables, overridden by parsed flags."""
        environ = os.environ if environ is None else environ
        given = vars(args) if args is not None else {}
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = given.get(f.name, environ.get(ENV_PREFIX + f.name.upper()))
            if raw is None:
                continue
            values[f.name] = _convert(f.name, f.default, raw)
            choices = f.metadata["choices"]
            if choices:
                values[f.name] = _choice(choices, values[f.name])
            if choices and values[f.name] not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {raw!r}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError naming the setting when a value is out of range."""
        positive = (
            "concurrency",
            "max_attempts",
            "chunk_max_tokens",
            "openai_batch_size",
            "tracking_buffer",
            "tenant_label_limit",
            "forward_queue_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "lock_duration",
            "backoff_base",
            "backoff_max",
            "openai_timeout",
            "refresh_interval",
            "refresh_timeout",
            "stuck_after",
            "store_timeout",
            "queue_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        # A queue message carries its attempt number, bounded to this as well (worker/messages.py).
        if self.max_attempts > 10_000:
            raise ValueError("max_attempts must be at most 10000")
        if self.chunk_overlap_tokens >= self.chunk_max_tokens or self.chunk_overlap_tokens < 0:
            raise ValueError("chunk_overlap_tokens must be between 0 and chunk_max_tokens - 1")
        if self.drain_timeout < 0 or self.retention_hours < 0 or self.reconcile_interval < 0:
            raise ValueError("drain_timeout, retention_hours and reconcile_interval must not be negative")
        for name in ("exporter_port", "otlp_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be between 0 and 65535")
        if not 0 <= self.metrics_cache_ttl <= 60:
            raise ValueError("metrics_cache_ttl must be between 0 and 60 seconds")

    def with_changes(self, **changes: Any) -> Self:
        """A copy with some values replaced (validated)."""
        updated = replace(self, **changes)
        updated.validate()
        return updated


def _choice(choices: Sequence[str], raw: str) -> str:
    """The choice raw names, whatever its case; raw itself when it names none (for the caller to refuse)."""
    folded = str(raw).casefold()
    return next((choice for choice in choices if choice.casefold() == folded), raw)


def _convert(name: str, default: Any, raw: Any) -> Any:
    if default is MISSING or (isinstance(raw, type(default)) and not isinstance(raw, str)):
        return raw
    try:
        if isinstance(default, bool):
            return str(raw).lower() in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
    except ValueError as exc:
        raise ValueError(f"{name}: {raw!r} is not a valid {type(default).__name__}") from exc
    return str(raw)
