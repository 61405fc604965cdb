"""The plain ASGI side: the app class that serves the relayed POSTs before FastAPI's routing, and their exchange."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import FastAPI

from ..admission.request import RELAYED
from ..exchange.port import Exchange, Headers, body_too_large, client_gone_early

if TYPE_CHECKING:
    from ..director import Director


class GatewayApp(FastAPI):
    """FastAPI for the app factory, docs and every other route; the relayed POST routes are served straight from
    here (the same director as the gateway's own server), skipping the routing, dependency and middleware layers
    that cost ~20 % of the gateway's CPU per request (measured, BENCHMARKS.md)."""
    director: Director  # set by create_app

    async def __call__(self, scope, receive, send) -> None:
        kind = RELAYED.get(scope.get("path")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            return await super().__call__(scope, receive, send)
        ex = AsgiExchange(scope, receive, send)
        try:
            await self.director.serve(ex, kind)
        finally:
            ex.close()


class AsgiExchange(Exchange):
    """An exchange carried by an ASGI server (the app mounted elsewhere, the ASGI tests); the gateway's own
    server carries the relayed routes natively (uvicorn_native.py)."""
    __slots__ = ("receive", "send", "_listener")

    def __init__(self, scope: dict, receive, send):
        super().__init__(asyncio.get_running_loop(), scope["headers"])
        self.receive, self.send = receive, send
        self._listener: asyncio.Future | None = None

    async def read_body(self, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.left()
                raise client_gone_early()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise body_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self._listener = asyncio.ensure_future(self._until_disconnect())
        return b"".join(chunks)

    async def _until_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.left()

    async def respond(self, status: int, headers: Headers, body: bytes, *, more: bool = False) -> None:
        if not more:
            headers = [*headers, (b"content-length", str(len(body)).encode())]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    async def write(self, body: bytes, *, more: bool) -> None:
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
