"""Logging setup: plain text or one JSON object per line, carrying trace and job ids."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from opentelemetry import trace

# Azure SDK loggers (HTTP request/response logging, Service Bus's AMQP stack): at INFO they write
# several lines for every HTTP call, thousands per minute on a busy store, so below DEBUG they
# are held at WARNING.
SDK_LOGGERS = ("azure", "uamqp")
# Attributes a record may carry through `extra=`; they become top-level JSON keys.
CONTEXT_KEYS = ("tenant_id", "job_id", "shard_id", "message_id", "attempt", "outcome")
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class TraceContextFilter(logging.Filter):
    """Stamps each record with the current span's trace and span ids."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        record.span_id = format(ctx.span_id, "016x") if ctx.is_valid else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids and any extras."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and value not in ("", None):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the job context appended as key=value pairs."""

    converter = staticmethod(time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{key}={getattr(record, key)}"
            for key in (*CONTEXT_KEYS, "trace_id")
            if getattr(record, key, "") not in ("", None)
        )
        return f"{line} {context}" if context else line


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Route the root logger to stderr in the chosen format; SDK loggers show WARNING and up unless level is DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TraceContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # A level on the logger itself, as propagation to the root handler skips the root's level.
    sdk_level = logging.NOTSET if root.level <= logging.DEBUG else max(root.level, logging.WARNING)
    for name in SDK_LOGGERS:
        logging.getLogger(name).setLevel(sdk_level)
