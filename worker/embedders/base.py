"""The embedder protocol: texts in, one vector per text out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Embedder(Protocol):
    """Turns chunks of text into vectors. Raises worker.errors.RetryableError or PermanentError."""

    @property
    def model(self) -> str:
        """The model name recorded on completed jobs."""
        ...

    @property
    def max_input_tokens(self) -> int | None:
        """Longest input the model reads in full (tokens), or None when it has no such limit."""
        ...

    @property
    def max_batch_size(self) -> int:
        """How many texts one call may carry at most."""
        ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed texts in order; one vector per text."""
        ...

    async def close(self) -> None:
        """Release clients and models."""
        ...
