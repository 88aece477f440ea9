"""Embedders, and the one place that builds one from a kind name and its settings."""

from __future__ import annotations

from typing import Any

from worker.embedders.base import Embedder

__all__ = ["EMBEDDER_KINDS", "Embedder", "create_embedder"]

EMBEDDER_KINDS = ("hashing", "openai", "sentence-transformers")


def create_embedder(kind: str = "hashing", **settings: Any) -> Embedder:
    """Build the embedder of `kind` with its constructor's keyword settings.

    hashing: `HashingEmbedder(**settings)`; openai: `OpenAIEmbedder(OpenAISettings(**settings))`;
    sentence-transformers: `SentenceTransformerEmbedder(**settings)`.
    """
    # Imported per kind so that an optional dependency is needed only by the kind that uses it.
    if kind == "hashing":
        from worker.embedders.hashing import HashingEmbedder

        return HashingEmbedder(**settings)
    if kind == "openai":
        from worker.embedders.openai import OpenAIEmbedder, OpenAISettings

        return OpenAIEmbedder(OpenAISettings(**settings))
    if kind == "sentence-transformers":
        from worker.embedders.sentence_transformer import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(**settings)
    raise ValueError(f"unknown embedder kind {kind!r}; choose one of: {', '.join(EMBEDDER_KINDS)}")
