"""A real local HTTP server speaking the OpenAI embeddings API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

API_KEY = "sk-test-5ecret-key-do-not-leak"


Reply = Callable[[], web.StreamResponse] | str


@dataclass
class Request:
    """One request as the fake endpoint saw it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeEmbeddingsAPI:
    """Speaks the embeddings API: plays scripted replies first, then answers every request."""

    base_url: str = ""
    requests: list[Request] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Request(request.path, dict(request.query), dict(request.headers), body))
        if self.replies:
            reply = self.replies.pop(0)
            if reply == "hang":
                await self.release.wait()
            elif callable(reply):
                return reply()
        dimensions = body.get("dimensions", 2)
        data = [
            # The vector tells which text it belongs to: its first value is the text's length.
            {"object": "embedding", "index": index, "embedding": [float(len(text))] + [0.5] * (dimensions - 1)}
            for index, text in enumerate(body["input"])
        ]
        # Real servers need not answer in input order; the index says where each vector goes.
        data.reverse()
        return web.json_response({"object": "list", "data": data, "model": body.get("model", "deployment")})


@pytest.fixture
async def api(aiohttp_server: AiohttpServer) -> AsyncIterator[FakeEmbeddingsAPI]:
    fake = FakeEmbeddingsAPI()
    app = web.Application()
    app.router.add_post("/{tail:.*}", fake.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    fake.base_url = str(server.make_url("")).rstrip("/")
    yield fake
    fake.release.set()
