"""The gateway's HTTP server: uvicorn's httptools protocol, with the two relayed routes carried on the connection."""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .app import HOT_PATHS
from .deadlines import deadlines_of
from .exchange import Exchange, body_too_large, client_gone_early
from .relay import serve

log = logging.getLogger("cxygpt.gateway")

# exact request targets only: anything else (a query string, a root path) takes the ASGI route to the same code
HOT_TARGETS = {path.encode(): kind for path, kind in HOT_PATHS.items()}


class GatewayHttpProtocol(HttpToolsProtocol):
    """Every request goes to the ASGI app as usual except POSTs of the relayed routes: those are served straight
    on the connection (no ASGI scope, messages, header checks or listener task per request), the answer's head
    and first bytes in one write. Keep-alive, pipelining, flow control, timeouts and graceful shutdown stay
    uvicorn's: the exchange takes the place of uvicorn's request cycle. A minimal relay built this way passed
    vllm-router where every ASGI stack stayed below it (../shared/notes/perf-peers.md; BENCHMARKS.md)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.gateway = self.config.app.state.gateway
        self.deadlines = deadlines_of(self.loop)

    def on_headers_complete(self) -> None:
        kind = HOT_TARGETS.get(self.url) if self.parser.get_method() == b"POST" else None
        if kind is None or self.parser.should_upgrade():
            return super().on_headers_complete()
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        previous, self.cycle = self.cycle, NativeExchange(self, kind, keep_alive)
        if previous is None or previous.response_complete:
            self._start_asgi_task(self.cycle, None)
        else:  # pipelined behind a request still being answered
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, None))

    def connection_lost(self, exc) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, NativeExchange) and not cycle.response_complete:
            cycle.left()


class NativeExchange(Exchange):
    """One relayed request on a GatewayHttpProtocol connection. It has the attributes uvicorn's protocol drives a
    request cycle by (body, more_body, message_event, response_complete, disconnected, keep_alive, run_asgi)."""
    __slots__ = ("protocol", "kind", "transport", "flow", "body", "more_body", "message_event", "response_complete",
                 "disconnected", "keep_alive", "expect_100", "started", "on_response")

    def __init__(self, protocol: GatewayHttpProtocol, kind: str, keep_alive: bool):
        super().__init__(protocol.loop, protocol.headers, protocol.deadlines)
        self.protocol, self.kind = protocol, kind
        self.transport, self.flow = protocol.transport, protocol.flow
        self.body = bytearray()
        self.more_body = True
        self.message_event = asyncio.Event()
        self.response_complete = self.disconnected = self.started = False
        self.keep_alive, self.expect_100 = keep_alive, protocol.expect_100_continue
        self.on_response = protocol.on_response_complete

    async def run_asgi(self, _app) -> None:
        """The request's task (started by uvicorn's protocol, which knows it by this name)."""
        try:
            await serve(self.protocol.gateway, self, self.kind)
        except Exception:
            log.exception("serving %s failed", self.request_id)
            if not self.started:
                self.keep_alive = False
                await self.respond(500, [(b"content-type", b"text/plain; charset=utf-8")], b"Internal Server Error")
            else:
                self.transport.close()
        finally:
            self.on_response = _nothing  # no reference back to the protocol once done

    async def read_body(self, limit: int) -> bytes:
        if self.expect_100 and self.more_body and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.expect_100 = False
        while True:
            if len(self.body) > limit:
                raise body_too_large(limit)
            if not self.more_body:
                return bytes(self.body)
            if self.disconnected:
                raise client_gone_early()
            self.flow.resume_reading()  # paused by the protocol above 64 KiB buffered
            await self.message_event.wait()
            self.message_event.clear()

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *,
                      more: bool = False) -> None:
        if self.disconnected or self.started:
            return
        self.started = True
        if self.more_body:  # answered before the request body ended: the connection cannot be reused
            self.keep_alive = False
        parts = [STATUS_LINE[status]]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        if more:
            parts.append(b"transfer-encoding: chunked\r\n\r\n")
            if body:
                parts += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            parts += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body)
        self.transport.write(b"".join(parts))
        if not more:
            self._complete()

    async def write(self, body: bytes, *, more: bool) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()  # a slow client: the upstream's reading pauses behind us
        if self.disconnected or self.response_complete:
            return
        data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
        if not more:
            data += b"0\r\n\r\n"
        self.transport.write(data)
        if not more:
            self._complete()

    def _complete(self) -> None:
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()


def _nothing() -> None:
    pass
