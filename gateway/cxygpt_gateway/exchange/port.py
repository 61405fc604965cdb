"""The port: one relayed request as admission and the relay see it, whichever server carries the connection."""
from __future__ import annotations

import asyncio
from typing import Literal

from ..errors import GatewayError
from .deadlines import Deadline, Deadlines, deadlines_of

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
        self._task: asyncio.Task = None  # type: ignore[assignment]  # set by __enter__, before any use
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

    def watched(self) -> Exchange:
        return self

    def __enter__(self) -> None:
        if self.client_left:
            raise ClientLeft()
        self._task, self._watching = asyncio.current_task(self.loop), True  # type: ignore[assignment]
        self._cancelling = self._task.cancelling()

    def __exit__(self, kind, error, tb) -> Literal[False]:
        self._watching = False
        if self._cancelled and kind is asyncio.CancelledError:
            self._cancelled = False
            # our own cancel, taken here: the caller sees ClientLeft, not a cancelled task
            if self._task.uncancel() <= self._cancelling:
                raise ClientLeft() from None
        return False


def body_too_large(limit: int, declared: str | None = None) -> GatewayError:
    size = f" of {declared} bytes" if declared else ""
    return GatewayError(400, f"request body{size} is over the limit of {limit} bytes", code="body_too_large",
                        reason="body_too_large")


def client_gone_early() -> GatewayError:
    return GatewayError(499, "client closed the connection before its request body arrived",
                        code="client_closed_request", reason="client_gone")
