"""One relayed request as admission and the relay see it, whichever server side carries the connection."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .deadlines import Deadline, Deadlines, deadlines_of
from .errors import GatewayError

if TYPE_CHECKING:
    from .app import Gateway

Headers = list[tuple[bytes, bytes]]


class ClientLeft(Exception):
    """The client closed the connection while its request was waiting or being relayed."""


class Exchange:
    """The request's headers, the state its log line needs, and the I/O a server side provides: `read_body`,
    `respond` (status, headers and the first body bytes in one write) and `write`. The server side calls
    `left()` when the client goes away; work in a `watched()` block is then cancelled at once and ends in
    `ClientLeft` (nothing polls for it)."""

    __slots__ = ("loop", "deadlines", "headers", "request_id", "key_id", "model", "degraded", "client_left", "_task",
                 "_watching", "_cancelled", "_cancelling")

    def __init__(self, loop: asyncio.AbstractEventLoop, headers: Headers, deadlines: Deadlines | None = None):
        self.loop, self.headers = loop, headers
        # `is None`, not `or`: a Deadlines with nothing pending has length 0
        self.deadlines = deadlines if deadlines is not None else deadlines_of(loop)
        self.request_id: str | None = None
        self.key_id: str | None = None
        self.model = "-"
        self.degraded = False
        self.client_left = False
        self._task: asyncio.Task | None = None
        self._watching = self._cancelled = False

    async def read_body(self, limit: int) -> bytes:
        """The whole request body; GatewayError 400 once it is over `limit` bytes."""
        raise NotImplementedError

    async def respond(self, status: int, headers: Headers, body: bytes, *, more: bool = False) -> None:
        """Start the answer; `more`: body bytes follow through `write` (length not known yet)."""
        raise NotImplementedError

    async def write(self, body: bytes, *, more: bool) -> None:
        raise NotImplementedError

    def deadline(self, seconds: float) -> Deadline:
        return Deadline(self.deadlines, seconds)

    def left(self) -> None:
        self.client_left = True
        if self._watching and not self._cancelled:
            self._cancelled = True
            self._task.cancel()

    def watched(self) -> "Exchange":
        return self

    def __enter__(self) -> None:
        if self.client_left:
            raise ClientLeft()
        self._task, self._watching = asyncio.current_task(self.loop), True
        self._cancelling = self._task.cancelling()

    def __exit__(self, kind, error, tb) -> bool:
        self._watching = False
        if self._cancelled and kind is asyncio.CancelledError:
            self._cancelled = False
            # our own cancel, taken here: the caller sees ClientLeft, not a cancelled task
            if self._task.uncancel() <= self._cancelling:
                raise ClientLeft() from None
        return False


def count_rejection(gw: "Gateway", error: GatewayError, *, model: str, request_id: str | None, key_id: str | None,
                    degraded: bool) -> None:
    """A request the gateway answered itself: counted and logged."""
    gw.metrics.requests.labels(model, str(error.status)).inc()
    gw.metrics.rejections.labels(model, error.reason).inc()
    gw.request_log.write(request_id=request_id, key_id=key_id, model=model, status=error.status,
                         error=error.message, reason=error.reason, degraded=degraded)


async def answer_error(gw: "Gateway", ex: Exchange, error: GatewayError) -> None:
    count_rejection(gw, error, model=ex.model, request_id=ex.request_id, key_id=ex.key_id, degraded=ex.degraded)
    if ex.client_left:
        return
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
    if ex.request_id:
        headers.append((b"x-request-id", ex.request_id.encode()))
    await ex.respond(error.status, headers, error.body())


class AsgiExchange(Exchange):
    """An exchange carried by an ASGI server (the app mounted elsewhere, the ASGI tests); the gateway's own
    server carries the relayed routes natively (server.py)."""
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


def body_too_large(limit: int, declared: str | None = None) -> GatewayError:
    size = f" of {declared} bytes" if declared else ""
    return GatewayError(400, f"request body{size} is over the limit of {limit} bytes", code="body_too_large",
                        reason="body_too_large")


def client_gone_early() -> GatewayError:
    return GatewayError(499, "client closed the connection before its request body arrived",
                        code="client_closed_request", reason="client_gone")
