"""An offline, deterministic embedder: signed feature hashing of words and character trigrams.

It needs no model and no network, so the local shape of the pipeline runs anywhere. Texts sharing
words or word fragments get similar vectors, which is enough for demos and tests; it is not a
semantic model. Hashes come from blake2b, never Python's salted `hash()`, so a text maps to the
same vector in every process and on every machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import unicodedata
from collections.abc import Iterator, Sequence
from functools import lru_cache

_WORD = re.compile(r"\w+")

# Whole words carry more meaning than their fragments; trigrams make related word forms
# ("embedding", "embeddings") land near each other.
_WORD_WEIGHT = 1.0
_TRIGRAM_WEIGHT = 0.5

# Bumping this changes every vector: do it only together with the model name.
_HASH_PERSON = b"embjobs-hash-v1"


class HashingEmbedder:
    """Feature-hashing embedder: L2-normalised vectors of `dimensions` floats, no model needed."""

    def __init__(self, dimensions: int = 256, *, batch_size: int = 256) -> None:
        if dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {dimensions}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._dimensions = dimensions
        self._batch_size = batch_size

    def __repr__(self) -> str:
        return f"HashingEmbedder(dimensions={self._dimensions})"

    @property
    def model(self) -> str:
        """The model name recorded on completed jobs, e.g. `hashing-256`."""
        return f"hashing-{self._dimensions}"

    @property
    def max_input_tokens(self) -> int | None:
        """Feature hashing reads any length."""
        return None

    @property
    def max_batch_size(self) -> int:
        """How many texts one call should carry; larger calls work too."""
        return self._batch_size

    @property
    def dimensions(self) -> int:
        """Length of every vector."""
        return self._dimensions

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed texts in order; a text without word characters maps to the zero vector."""
        if not texts:
            return []
        # Hashing thousands of long chunks takes long enough to stall lock renewal and
        # other jobs if it ran on the event loop.
        return await asyncio.to_thread(self.embed_sync, list(texts))

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        """The same vectors as `embed`, computed in the calling thread."""
        return [_embed_one(text, self._dimensions) for text in texts]

    async def close(self) -> None:
        """Nothing to release."""


def _embed_one(text: str, dimensions: int) -> list[float]:
    vector = [0.0] * dimensions
    for feature, weight in _features(text):
        slot, sign = _slot(feature, dimensions)
        vector[slot] += sign * weight
    norm = math.sqrt(math.fsum(value * value for value in vector))
    if norm == 0.0:
        return vector
    return [value / norm for value in vector]


def _features(text: str) -> Iterator[tuple[str, float]]:
    # NFKC + casefold so that visually equal texts ("ﬁle" / "file", "Straße" / "STRASSE") agree.
    normalised = unicodedata.normalize("NFKC", text).casefold()
    for word in _WORD.findall(normalised):
        yield "w:" + word, _WORD_WEIGHT
        padded = f"<{word}>"
        for start in range(len(padded) - 2):
            yield "c:" + padded[start : start + 3], _TRIGRAM_WEIGHT


@lru_cache(maxsize=1 << 16)
def _slot(feature: str, dimensions: int) -> tuple[int, float]:
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, person=_HASH_PERSON).digest()
    value = int.from_bytes(digest, "little")
    # The top bit picks the sign so that collisions cancel out on average instead of piling up.
    sign = -1.0 if value >> 63 else 1.0
    return value % dimensions, sign
