"""The HTTP/1.1 client of the engines: keep-alive connections per upstream, one write per request, httptools parsing."""
from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

import httptools

# aiohttp's client spent ~30 % of the gateway's CPU per relayed request (request/response objects, timeout
# and header machinery, a write per part); this one keeps a pool of keep-alive connections per upstream,
# writes each request in one piece and parses answers with httptools (measured, BENCHMARKS.md).


class UpstreamUnreachable(ConnectionError):
    """No connection could be opened (refused, no route, name not resolved): nothing of the request was sent."""


class UpstreamConnectTimeout(Exception):
    """The connection was not accepted within the connect timeout: nothing of the request was sent."""


class AnswerTooLarge(Exception):
    """An answer longer than its reader takes (its connection is then dropped, not reused)."""


# an idle connection older than this is not reused: servers close idle keep-alive connections (vLLM after 5 s)
IDLE_S = 4.0
# buffered but unread upstream bytes above which reading pauses (a slow client must not fill our memory)
HIGH_WATER = 1 << 18


class _Connection(asyncio.Protocol):
    __slots__ = ("pool", "key", "loop", "parser", "transport", "response", "closed", "idle_since", "_paused")

    def __init__(self, pool: UpstreamPool, key: tuple, loop: asyncio.AbstractEventLoop):
        self.pool, self.key, self.loop = pool, key, loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        # the answer being read; parser callbacks come only while there is one
        self.response: UpstreamResponse = None  # type: ignore[assignment]
        self.closed, self.idle_since, self._paused = False, 0.0, False

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        r = self.response
        if r is not None and not r.complete:
            if r.status and r.until_close:
                r._finish(keep_alive=False)
            else:
                r._fail(ConnectionResetError(f"upstream closed the connection{f': {exc}' if exc else ''}"))

    def data_received(self, data):
        r = self.response
        if r is None:  # bytes nobody asked for: the connection is not safe to reuse
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            r._fail(ConnectionError(f"malformed answer from upstream: {e}"))
            self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes):
        name = name.lower()
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
            self.response.until_close = False

    def on_headers_complete(self):
        r = self.response
        r.status = self.parser.get_status_code()
        if not r.head.done():
            r.head.set_result(None)

    def on_body(self, body: bytes):
        r = self.response
        r._feed(body)
        if r.buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self):
        self.response._finish(keep_alive=self.parser.should_keep_alive())

    def resume(self):
        if self._paused and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self):
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """One answer: `status`, then `read()` or `events()`; leaving `async with` gives the connection back
    (only when the answer was read to its end) or closes it."""
    __slots__ = ("conn", "status", "head", "until_close", "complete", "keep_alive", "buffered",
                 "_chunks", "_waiter", "_error", "_tail")

    def __init__(self, conn: _Connection):
        self.conn, self.status, self.until_close = conn, 0, True
        self.head = conn.loop.create_future()  # not get_running_loop(): a getpid() system call each
        self.complete, self.keep_alive, self.buffered = False, False, 0
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._tail = b""

    def _wake(self):
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _feed(self, data: bytes):
        self._chunks.append(data)
        self.buffered += len(data)
        self._wake()

    def _finish(self, keep_alive: bool):
        self.complete, self.keep_alive = True, keep_alive
        self._wake()

    def _fail(self, error: BaseException):
        self._error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved here; the opener re-raises it
        self._wake()

    async def _more(self) -> bytes | None:
        """What arrived since the last call; None at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            self._waiter = self.conn.loop.create_future()
            await self._waiter
            self._waiter = None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self.buffered = 0
        self.conn.resume()
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; with `limit`, AnswerTooLarge once it is over that many bytes (the rest is not read)."""
        parts, size = [], 0
        while (data := await self._more()) is not None:
            parts.append(data)
            size += len(data)
            if limit is not None and size > limit:
                raise AnswerTooLarge(limit)
        return b"".join(parts)

    async def events(self) -> bytes | None:
        """The next run of complete SSE events (ending on a blank line) that arrived; None at the end (an
        unterminated last event is completed). Lines may end in CRLF, LF or CR (the SSE spec; sse-starlette
        sends CRLF): they are passed on ending in LF."""
        while True:
            data = await self._more()
            if data is None:
                tail, self._tail = self._tail.replace(b"\r", b"\n"), b""  # a held CR ended a line
                return tail.rstrip(b"\n") + b"\n\n" if tail.strip() else None
            if b"\r" in data or self._tail.endswith(b"\r"):
                data = self._tail + data
                # a CR at the very end may be the first half of a CRLF: it waits for the next bytes
                held = b"\r" if data.endswith(b"\r") else b""
                data = data[:len(data) - len(held)].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                end = data.rfind(b"\n\n")
                if end < 0:
                    self._tail = data + held
                    continue
                self._tail = data[end + 2:] + held
                return data[:end + 2]
            if self._tail:
                data = self._tail + data
            end = data.rfind(b"\n\n")
            if end < 0:
                self._tail = data
                continue
            self._tail = data[end + 2:]
            return data[:end + 2]

    def close(self) -> None:
        """Drop the connection (the upstream sees the client leave and aborts the request)."""
        self.conn.close()

    def release(self) -> None:
        conn = self.conn
        conn.response = None  # type: ignore[assignment]  # no answer being read
        if self.complete and self.keep_alive and self._error is None and not conn.closed:
            conn.pool._idle(conn)
        else:
            conn.close()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class UpstreamPool:
    """Keep-alive connections per upstream (scheme, host, port); unlimited, like the aiohttp connector it replaced:
    the per-model queue is what bounds concurrency."""

    def __init__(self) -> None:
        self._idle_conns: dict[tuple, list[_Connection]] = {}
        self._targets: dict[str, tuple] = {}
        self._ssl: ssl.SSLContext | None = None

    def _target(self, base_url: str) -> tuple:
        t = self._targets.get(base_url)
        if t is None:
            u = urlsplit(base_url)
            tls = u.scheme == "https"
            port = u.port or (443 if tls else 80)
            host_header = str(u.hostname) if u.port is None else f"{u.hostname}:{u.port}"
            t = self._targets[base_url] = ((u.scheme, u.hostname, port), host_header.encode(), u.path.rstrip("/"))
        return t

    def _idle(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle_conns.setdefault(conn.key, []).append(conn)

    def _reuse(self, key: tuple) -> _Connection | None:
        conns = self._idle_conns.get(key)
        horizon = time.monotonic() - IDLE_S
        while conns:
            conn = conns.pop()
            if not conn.closed and conn.idle_since > horizon and not conn.transport.is_closing():
                return conn
            conn.close()
        return None

    async def _connect(self, key: tuple, timeout_s: float) -> _Connection:
        scheme, host, port = key
        kwargs = {}
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            kwargs = {"ssl": self._ssl, "server_hostname": host}
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(self, key, loop), host, port, **kwargs)
        except TimeoutError:
            raise UpstreamConnectTimeout() from None
        except OSError as e:  # refused, unreachable, name not resolved, TLS failure
            raise UpstreamUnreachable(e.errno, e.strerror or str(e)) from None
        return conn

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str],
                   connect_timeout_s: float) -> UpstreamResponse:
        """Send one POST and wait for the answer's status and headers."""
        return await self.request(b"POST ", base_url, path, body, headers, connect_timeout_s)

    async def get(self, base_url: str, path: str, connect_timeout_s: float) -> UpstreamResponse:
        return await self.request(b"GET ", base_url, path, b"", {}, connect_timeout_s)

    async def request(self, method: bytes, base_url: str, path: str, body: bytes, headers: dict[str, str],
                      connect_timeout_s: float) -> UpstreamResponse:
        key, host, prefix = self._target(base_url)
        head = [method, prefix.encode(), path.encode(), b" HTTP/1.1\r\nHost: ", host,
                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        for name, value in headers.items():
            head += (name.encode(), b": ", value.encode(), b"\r\n")
        head.append(b"\r\n")
        request = b"".join(head) + body
        conn = self._reuse(key) or await self._connect(key, connect_timeout_s)
        response = conn.response = UpstreamResponse(conn)
        conn.transport.write(request)
        try:
            await response.head
            return response
        except BaseException:
            # Never sent again, not even on a kept-alive connection that closed before any answer: the upstream
            # may have read it, and generation is neither idempotent nor free (RFC 9110 9.2.2).
            conn.close()
            raise

    def close(self) -> None:
        for conns in self._idle_conns.values():
            for conn in conns:
                conn.close()
        self._idle_conns.clear()
