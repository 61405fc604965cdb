"""The gateway's own HTTP server: uvicorn's httptools protocol, with the relayed routes carried natively on the
connection and every connection bounded. The one module that uses uvicorn's private interface (its protocol's request
cycle): tests/unit/test_uvicorn_contract.py guards it, bench/servers.py measured the public alternatives."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..admission.request import RELAYED, Kind
from ..errors import GatewayError
from ..exchange.deadlines import deadlines_of
from ..exchange.port import Exchange, body_too_large, client_gone_early
from .connections import HEALTH_PATHS, ConnectionCounts

if TYPE_CHECKING:
    from ..director import Director
    from ..metrics import GatewayMetrics
    from ..settings import GatewaySettings

log = logging.getLogger("cxygpt.gateway")

# exact request targets only: anything else (a query string, a root path) takes the ASGI route to the same code
HOT_TARGETS = {path.encode(): kind for path, kind in RELAYED.items()}


def run(app, settings: GatewaySettings, director: Director, counts: ConnectionCounts,
        metrics: GatewayMetrics) -> None:
    """Serve `app` until a signal stops it: uvloop + httptools, no access log, no proxy-header rewriting (nothing
    reads the client address), no WebSocket routes (an upgrade is refused rather than handed to another protocol)."""
    protocol = type("BoundGatewayHttpProtocol", (GatewayHttpProtocol,),
                    {"director": director, "counts": counts, "settings": settings, "metrics": metrics})
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False, proxy_headers=False,
                loop="uvloop", http=protocol, ws="none", timeout_graceful_shutdown=5,
                timeout_keep_alive=settings.keepalive_timeout_s)


class GatewayHttpProtocol(HttpToolsProtocol):
    """Every request goes to the ASGI app as usual except POSTs of the relayed routes: those are served straight
    on the connection (no ASGI scope, messages, header checks or listener task per request), the answer's head
    and first bytes in one write. Keep-alive, pipelining, flow control, timeouts and graceful shutdown stay
    uvicorn's: the exchange takes the place of uvicorn's request cycle. A minimal relay built this way passed
    vllm-router where every ASGI stack stayed below it (BENCHMARKS.md). `run` binds what it uses: the director
    that serves the relayed requests, the connection counts, the settings and the metrics."""
    director: Director
    counts: ConnectionCounts
    settings: GatewaySettings
    metrics: GatewayMetrics
    timer: list | None      # the deadline running: the head's or the body's
    timing: str | None      # which: "head" or "body"

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.deadlines = deadlines_of(self.loop)
        self.address = self.client[0] if self.client else "-"
        self.verdict = self.counts.opened(self.address)
        self.refused, self.head_bytes, self.chunk, self.timer, self.timing = False, 0, 0, None, None
        self.max_head = self.settings.max_header_bytes
        if self.verdict == "drop":  # past even the health checks' room: no request is read, no descriptor kept
            self.metrics.connections_refused.labels("connection_limit").inc()
            self.refused = True
            transport.abort()
            return
        self._arm("head")

    def connection_lost(self, exc) -> None:
        self.counts.closed(self.address)
        self._disarm()
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, NativeExchange) and not cycle.response_complete:
            cycle.left()

    # -- bounds: the head's time and size, the body's time, the connection's verdict. Kept in data_received, so a
    # request whose head and body come in one segment (nearly all) costs no timer and no callback of ours --

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self.chunk = len(data)
        super().data_received(data)
        if self.refused or self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # a head not complete yet
            self.head_bytes += len(data)
            if self.head_bytes > self.max_head:
                self._head_too_large()
            elif self.timing is None:
                self._arm("head")
        else:  # its head came: its answer is under way, maybe its body still on the way
            self.head_bytes = 0
            if cycle.more_body:
                if self.timing != "body":
                    self._arm("body")
            elif self.timing is not None:
                self._disarm()

    def _arm(self, timing: str) -> None:
        self._disarm()
        settings = self.settings
        seconds, callback = ((settings.header_timeout_s, self._head_timed_out) if timing == "head" else
                             (settings.body_timeout_s, self._body_timed_out))
        self.timer, self.timing = self.deadlines.call_at(self.loop.time() + seconds, callback), timing

    def _disarm(self) -> None:
        if self.timer is not None:
            self.deadlines.cancel(self.timer)
            self.timer = self.timing = None

    def _refuse(self, reason: str, error: GatewayError) -> None:
        """Answer `error` on this connection and close it; nothing more of it is read."""
        self._disarm()
        if self.refused or self.transport.is_closing():
            return
        self.refused = True
        self.metrics.connections_refused.labels(reason).inc()
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy:  # an answer is on its way (a pipelined request came slowly): it ends the connection
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.cycle = REFUSED  # type: ignore[assignment]  # what the parser still has of the request finds it answered
        head = [STATUS_LINE[error.status], b"content-type: application/json\r\nconnection: close\r\n"]
        head += [b"%s: %s\r\n" % (k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]
        body = error.body()
        self.transport.write(b"".join(head) + b"content-length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()

    def _head_too_large(self) -> None:
        self._refuse("header_too_large", GatewayError(
            431, f"the request line and headers are over the limit of {self.max_head} bytes", code="header_too_large"))

    def _head_timed_out(self) -> None:
        self.timer = self.timing = None
        seconds = self.settings.header_timeout_s
        self._refuse("header_timeout", GatewayError(408, f"the request line and headers did not arrive within "
                                                         f"{seconds:g} s", code="request_timeout"))

    def _body_timed_out(self) -> None:
        self.timer = self.timing = None
        cycle = self.cycle
        if isinstance(cycle, NativeExchange):  # it answers 408 itself, from read_body
            cycle.body_late()
        elif cycle is not None and cycle.more_body:
            self.metrics.connections_refused.labels("body_timeout").inc()
            self.transport.close()  # an ASGI route still reading: it sees the client gone

    def on_headers_complete(self) -> None:
        if self.refused:
            return
        # a head that came whole in one segment: measured only when that segment could hold too much
        if self.head_bytes + self.chunk > self.max_head and head_size(self.url, self.headers) > self.max_head:
            return self._head_too_large()
        if self.verdict != "serve" and self.url.partition(b"?")[0] not in HEALTH_PATHS:
            counts = self.counts
            limits = counts.limits
            self._refuse("connection_limit", GatewayError(
                503, f"the gateway is at its connection limit ({limits.max_connections} in all, "
                     f"{limits.per_client} per client address; this one has {counts.by_client.get(self.address, 0)})"
                     ": close idle connections or retry", code="connection_limit", retry_after=1))
            return
        kind = HOT_TARGETS.get(self.url) if self.parser.get_method() == b"POST" else None
        if kind is None or self.parser.should_upgrade():
            return super().on_headers_complete()
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        # the exchange stands in for uvicorn's request cycle (its private interface types only its own)
        previous, self.cycle = self.cycle, NativeExchange(self, kind, keep_alive)  # type: ignore[assignment]
        if previous is None or previous.response_complete:
            self._start_asgi_task(self.cycle, None)  # type: ignore[arg-type]
        else:  # pipelined behind a request still being answered
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, None))  # type: ignore[arg-type]



def head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


class _Refused:
    """The request cycle of a connection that was answered and closed by a bound."""
    response_complete, more_body, keep_alive = True, False, False
    message_event = asyncio.Event()


REFUSED = _Refused()


class NativeExchange(Exchange):
    """One relayed request on a GatewayHttpProtocol connection. It has the attributes uvicorn's protocol drives a
    request cycle by (body, more_body, message_event, response_complete, disconnected, keep_alive, run_asgi)."""
    __slots__ = ("protocol", "kind", "transport", "flow", "body", "more_body", "message_event", "response_complete",
                 "disconnected", "keep_alive", "expect_100", "started", "on_response", "late")

    def __init__(self, protocol: GatewayHttpProtocol, kind: Kind, keep_alive: bool):
        super().__init__(protocol.loop, protocol.headers, protocol.deadlines)
        self.protocol, self.kind = protocol, kind
        self.transport, self.flow = protocol.transport, protocol.flow
        self.body = bytearray()
        self.more_body = True
        self.message_event = asyncio.Event()
        self.response_complete = self.disconnected = self.started = False
        self.keep_alive, self.expect_100 = keep_alive, protocol.expect_100_continue
        self.on_response = protocol.on_response_complete
        self.late = False

    def body_late(self) -> None:
        """The body did not arrive in time: read_body answers 408 (the connection then closes: more_body)."""
        self.late = True
        self.message_event.set()

    async def run_asgi(self, _app) -> None:
        """The request's task (started by uvicorn's protocol, which knows it by this name)."""
        try:
            await self.protocol.director.serve(self, self.kind)
        except Exception as e:
            log.exception("serving %s failed", self.request_id)
            if not self.started:
                self.keep_alive = False
                error = GatewayError(500, f"the gateway failed on this request ({e.__class__.__name__}); it was not "
                                          "relayed", code="gateway_error")
                await self.respond(500, [(b"content-type", b"application/json")], error.body())
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
            if self.late:
                seconds = self.protocol.settings.body_timeout_s
                raise GatewayError(408, f"the request body did not arrive within {seconds:g} s of its headers",
                                   code="request_timeout", reason="body_timeout")
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
