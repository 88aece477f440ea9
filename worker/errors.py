"""Errors that decide whether a failed attempt is retried or given up at once."""

from __future__ import annotations


class RetryableError(Exception):
    """A transient failure (429, 5xx, timeout, store hiccup): retry with backoff."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(Exception):
    """A failure that retrying cannot fix (missing shard, 4xx): give up at once."""
