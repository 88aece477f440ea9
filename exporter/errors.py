"""The JSON error shape every exporter endpoint answers with."""

from __future__ import annotations

from aiohttp import web


def error_response(status: int, code: str, message: str) -> web.Response:
    """`{"error": {"code", "message"}}` with the given HTTP status."""
    return web.json_response({"error": {"code": code, "message": message}}, status=status)
