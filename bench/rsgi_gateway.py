"""The gateway's relayed routes on granian's public RSGI interface: a measured alternative to its own server
(servers/uvicorn_native.py; issue 15)."""
from __future__ import annotations

import asyncio
import os

from cxygpt_gateway.admission.request import RELAYED
from cxygpt_gateway.app import create_app
from cxygpt_gateway.exchange.port import Exchange, body_too_large
from cxygpt_gateway.settings import load_settings


class RsgiExchange(Exchange):
    """One relayed request on an RSGI protocol object: the body in one await, the answer in one call (or a
    stream transport), and the client's leaving from `client_disconnect()`."""
    __slots__ = ("proto", "stream", "_watch")

    def __init__(self, loop: asyncio.AbstractEventLoop, scope, proto):
        super().__init__(loop, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in scope.headers.items()])
        self.proto, self.stream, self._watch = proto, None, None

    async def read_body(self, limit: int) -> bytes:
        body = await self.proto()
        if len(body) > limit:
            raise body_too_large(limit)
        self._watch = asyncio.ensure_future(self.proto.client_disconnect())
        self._watch.add_done_callback(lambda f: f.cancelled() or self.left())
        return body

    async def respond(self, status: int, headers, body: bytes, *, more: bool = False) -> None:
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        if not more:
            self.proto.response_bytes(status, pairs, body)
            return
        self.stream = self.proto.response_stream(status, pairs)
        if body:
            await self.stream.send_bytes(body)

    async def write(self, body: bytes, *, more: bool) -> None:
        if body and not self.client_left:
            await self.stream.send_bytes(body)  # the stream ends when the handler returns

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


class RsgiGateway:
    """Relayed POSTs only (what G1/G2 measure), on the app's own state and lifespan."""

    def __init__(self):
        self.app = create_app(load_settings(os.environ["CXYGPT_GATEWAY_CONFIG"]))
        self.director = self.app.director
        self._lifespan = None

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lifespan = self.app.router.lifespan_context(self.app)
        loop.run_until_complete(self._lifespan.__aenter__())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self._lifespan.__aexit__(None, None, None))

    async def __rsgi__(self, scope, proto) -> None:
        kind = RELAYED.get(scope.path) if scope.method == "POST" else None
        if kind is None:
            proto.response_bytes(200 if scope.path == "/healthz" else 404, [("content-type", "text/plain")], b"ok")
            return
        ex = RsgiExchange(self.loop, scope, proto)
        try:
            await self.director.serve(ex, kind)
        finally:
            ex.close()


app = RsgiGateway() if "CXYGPT_GATEWAY_CONFIG" in os.environ else None
