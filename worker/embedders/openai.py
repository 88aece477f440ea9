"""Embeddings from Azure OpenAI or any OpenAI-compatible `/embeddings` endpoint, over aiohttp.

How failures map onto the job's retry policy:

* 429: waited out inside the call (Retry-After / retry-after-ms, up to `max_retry_wait`) at most
  `max_retries` times; then, or when the server asks for a longer wait, RetryableError carrying
  `retry_after` so the queue reschedules the job instead of holding its lock.
* 408, 409, 425, 5xx, timeouts and connection errors: RetryableError.
* Any other 4xx (bad input such as too many tokens, bad key, unknown deployment): PermanentError
  with the server's message, truncated.
* A 200 whose body is not the embeddings shape (not JSON, no `data`, wrong count, bad indices):
  RetryableError, since a gateway glitch is the likely cause and the job's attempt limit bounds
  the cost if it is not. Vectors of the wrong length when `dimensions` is set: PermanentError,
  a configuration mismatch that retrying cannot fix.

The API key is sent only as a header; it is kept out of reprs, logs and error messages, and
redacted from any server text quoted in an error.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from worker.errors import PermanentError, RetryableError

log = logging.getLogger(__name__)

TokenProvider = Callable[[], str | Awaitable[str]]
"""Returns a bearer token for Microsoft Entra ID (Azure AD), e.g. azure-identity's
`get_bearer_token_provider(credential, "https://cognitiveservices.azure.com/.default")`."""

_MAX_ERROR_TEXT = 500
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})
# Used when a 429 carries no Retry-After: short, growing waits before giving the job back.
_DEFAULT_429_WAIT = 1.0


@dataclass(frozen=True, kw_only=True)
class OpenAISettings:
    """Where and how to call the embeddings endpoint.

    Setting `api_version` selects the Azure shape: `{base_url}/openai/deployments/{model}/embeddings`
    with an `api-key` header; otherwise `{base_url}/embeddings` with `Authorization: Bearer`.
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    token_provider: TokenProvider | None = field(default=None, repr=False)
    api_version: str | None = None
    dimensions: int | None = None
    batch_size: int = 16
    timeout: float = 60.0
    max_retries: int = 2
    max_retry_wait: float = 10.0

    def __post_init__(self) -> None:
        if not self.base_url:
            raise ValueError("base_url is required")
        if not self.model:
            raise ValueError("model (the deployment name on Azure) is required")
        if self.api_key is not None and self.token_provider is not None:
            raise ValueError("give either api_key or token_provider, not both")
        if self.api_key is None and self.token_provider is None and self.is_azure:
            raise ValueError("Azure OpenAI needs api_key or token_provider")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if self.max_retries < 0 or self.max_retry_wait < 0:
            raise ValueError("max_retries and max_retry_wait must not be negative")

    @property
    def is_azure(self) -> bool:
        """True when requests take the Azure OpenAI URL and header shape."""
        return self.api_version is not None

    @property
    def url(self) -> str:
        """The embeddings URL, without the api-version query."""
        base = self.base_url.rstrip("/")
        if self.is_azure:
            return f"{base}/openai/deployments/{quote(self.model, safe='')}/embeddings"
        return f"{base}/embeddings"


class OpenAIEmbedder:
    """Embedder over the OpenAI embeddings API; one aiohttp session, opened on first use."""

    def __init__(self, settings: OpenAISettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAIEmbedder(url={self._settings.url!r}, model={self._settings.model!r})"

    @property
    def model(self) -> str:
        """The model (or Azure deployment) name recorded on completed jobs."""
        return self._settings.model

    @property
    def max_input_tokens(self) -> int | None:
        """The input limit of OpenAI's embedding models."""
        return 8191

    @property
    def max_batch_size(self) -> int:
        """Texts per request; `embed` splits longer lists into several requests."""
        return self._settings.batch_size

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed texts in order, `batch_size` texts per request, one request at a time."""
        for position, text in enumerate(texts):
            if not text.strip():
                # The API rejects empty input with a 400; say which text it was instead.
                raise PermanentError(f"text {position} is empty; embeddings need non-empty input")
        vectors: list[list[float]] = []
        size = self._settings.batch_size
        for start in range(0, len(texts), size):
            vectors.extend(await self._embed_batch(texts[start : start + size]))
        return vectors

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession belongs to the running loop, which the constructor may lack.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout),
                raise_for_status=False,
            )
        return self._session

    async def _embed_batch(self, texts: Sequence[str]) -> list[list[float]]:
        settings = self._settings
        body: dict[str, Any] = {"input": list(texts), "encoding_format": "float"}
        if not settings.is_azure:
            body["model"] = settings.model
        if settings.dimensions is not None:
            body["dimensions"] = settings.dimensions
        params = {"api-version": settings.api_version} if settings.api_version else None

        waits = 0
        while True:
            status, headers, payload = await self._post(body, params)
            if status == 200:
                return self._parse(payload, len(texts))
            message = self._server_message(payload)
            if status == 429:
                delay = _retry_after(headers)
                wait = delay if delay is not None else _DEFAULT_429_WAIT * 2**waits
                if waits < settings.max_retries and wait <= settings.max_retry_wait:
                    waits += 1
                    log.info("embeddings rate-limited (429); retry %d in %.3fs", waits, wait)
                    await asyncio.sleep(wait)
                    continue
                raise RetryableError(
                    f"embeddings rate-limited (HTTP 429) after {waits} in-request retries: {message}",
                    retry_after=wait,
                )
            if status >= 500 or status in _RETRYABLE_4XX:
                raise RetryableError(
                    f"embeddings request failed with HTTP {status}: {message}", retry_after=_retry_after(headers)
                )
            if status >= 400:
                raise PermanentError(f"embeddings request to {settings.url} rejected with HTTP {status}: {message}")
            raise RetryableError(f"embeddings request returned unexpected HTTP {status}: {message}")

    async def _post(
        self, body: dict[str, Any], params: Mapping[str, str] | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        headers = await self._auth_headers()
        try:
            request = self._client().post(self._settings.url, json=body, params=params, headers=headers)
            async with request as response:
                return response.status, response.headers, await response.read()
        except TimeoutError as exc:
            raise RetryableError(
                f"embeddings request to {self._settings.url} timed out after {self._settings.timeout}s"
            ) from exc
        except aiohttp.ClientError as exc:
            # The exception's text names the URL and the OS error, never request headers.
            reason = f"{type(exc).__name__}: {_truncate(self._redact(str(exc)))}"
            raise RetryableError(f"embeddings request to {self._settings.url} failed: {reason}") from exc

    async def _auth_headers(self) -> dict[str, str]:
        settings = self._settings
        if settings.token_provider is not None:
            try:
                token = settings.token_provider()
                if inspect.isawaitable(token):
                    token = await token
            except Exception as exc:
                # Credential failures are often transient (token endpoint hiccups); the job's
                # attempt limit ends the retries if the configuration is wrong.
                raise RetryableError(
                    f"could not get a token for {settings.url}: {type(exc).__name__}: {_truncate(str(exc))}"
                ) from exc
            return {"Authorization": f"Bearer {token}"}
        if settings.api_key is None:
            return {}
        if settings.is_azure:
            return {"api-key": settings.api_key}
        return {"Authorization": f"Bearer {settings.api_key}"}

    def _parse(self, payload: bytes, expected: int) -> list[list[float]]:
        try:
            document = json.loads(payload)
        except ValueError as exc:
            snippet = _truncate(self._redact(payload.decode("utf-8", "replace")))
            raise RetryableError(f"embeddings response is not JSON: {snippet}") from exc
        data = document.get("data") if isinstance(document, dict) else None
        if not isinstance(data, list):
            raise RetryableError("embeddings response has no 'data' list")
        if len(data) != expected:
            raise RetryableError(f"embeddings response has {len(data)} vectors for {expected} texts")
        vectors: list[list[float] | None] = [None] * expected
        for position, item in enumerate(data):
            index = item.get("index", position) if isinstance(item, dict) else None
            embedding = item.get("embedding") if isinstance(item, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < expected:
                raise RetryableError(f"embeddings response item {position} has a bad index: {index!r}")
            if vectors[index] is not None:
                raise RetryableError(f"embeddings response repeats index {index}")
            vectors[index] = self._vector(embedding, index)
        return [vector for vector in vectors if vector is not None]

    def _vector(self, embedding: object, index: int) -> list[float]:
        if not isinstance(embedding, list) or not embedding:
            raise RetryableError(f"embeddings response item {index} has no list of floats")
        vector: list[float] = []
        for value in embedding:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RetryableError(f"embeddings response item {index} holds a non-number")
            vector.append(float(value))
        wanted = self._settings.dimensions
        if wanted is not None and len(vector) != wanted:
            raise PermanentError(f"model {self._settings.model!r} returned {len(vector)} dimensions, expected {wanted}")
        return vector

    def _server_message(self, payload: bytes) -> str:
        text = payload.decode("utf-8", "replace")
        try:
            document = json.loads(text)
        except ValueError:
            document = None
        if isinstance(document, dict):
            error = document.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                code = error.get("code")
                text = f"{error['message']} (code: {code})" if code else error["message"]
            elif isinstance(error, str):
                text = error
        # Redact before truncating so that a cut cannot leave part of the key behind.
        return _truncate(self._redact(text).strip() or "(empty body)")

    def _redact(self, text: str) -> str:
        # Some servers echo the presented key in 401 messages.
        key = self._settings.api_key
        return text.replace(key, "[redacted]") if key else text


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks to wait: retry-after-ms, else Retry-After (seconds or HTTP date).

    `headers` is the response's case-insensitive header mapping.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None and (seconds := _seconds(raw_ms, scale=1000.0)) is not None:
        return seconds
    raw = headers.get("Retry-After")
    if raw is None:
        return None
    if (seconds := _seconds(raw, scale=1.0)) is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _seconds(raw: str, *, scale: float) -> float | None:
    try:
        value = float(raw) / scale
    except ValueError:
        return None
    return max(0.0, value) if math.isfinite(value) else None


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_TEXT else text[:_MAX_ERROR_TEXT] + "…"
