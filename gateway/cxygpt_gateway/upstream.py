"""Upstream I/O: /tokenize and /health on an aiohttp session, the relay of admitted requests on a lean HTTP/1.1 pool."""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import httptools
import orjson
from starlette.responses import Response

from .errors import GatewayError
from .logs import log_request, rounded

if TYPE_CHECKING:
    from .admission.pipeline import Admitted
    from .admission.queue import Backend
    from .routing import Registry

log = logging.getLogger("cxygpt.gateway")
JSON_HEADERS = {"Content-Type": "application/json"}
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# how long a replica that refused connections stays out of rotation when nothing re-checks it
EJECT_S = 5.0


class Upstream:
    """`session` (aiohttp) for /tokenize and /health; `pool` for the relay itself."""

    def __init__(self, session: aiohttp.ClientSession, pool: "UpstreamPool | None" = None):
        self.session = session
        self.pool = pool or UpstreamPool()

    async def tokenize(self, base_url: str, payload: dict, timeout_s: float) -> int | None:
        """The upstream's exact count, or None when it cannot say (old server, error, timeout)."""
        try:
            async with self.session.post(base_url + "/tokenize", data=orjson.dumps(payload), headers=JSON_HEADERS,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status != 200:
                    return None
                return int(orjson.loads(await r.read())["count"])
        except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError):
            return None

    async def healthy(self, base_url: str, timeout_s: float = 2.0) -> bool:
        try:
            async with self.session.get(base_url + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False


class HealthChecker:
    """Static backends: /health of every replica each interval; the registry's routable view follows."""

    def __init__(self, registry: "Registry", upstream: Upstream, interval_s: float):
        self.registry, self.upstream, self.interval_s = registry, upstream, interval_s

    async def check_once(self) -> None:
        backends = [b for r in self.registry.routes.values() if not r.spec.external
                    for b in r.queue.backends.values()]
        results = await asyncio.gather(*(self.upstream.healthy(b.url) for b in backends))
        for backend, ok in zip(backends, results):
            if backend.healthy != ok:
                log.info("upstream %s is %s", backend.url, "healthy" if ok else "unhealthy")
            backend.healthy = ok

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_once()


def eject(backend: "Backend", *, restore_after: float | None) -> None:
    """Take a replica that refused us out of rotation; one no health check watches comes back after a pause."""
    if backend.healthy:
        log.warning("upstream %s unreachable, out of rotation", backend.url)
    backend.healthy = False
    if restore_after is not None:
        asyncio.get_running_loop().call_later(restore_after, setattr, backend, "healthy", True)


def scan_stream(batch: bytes, strip_usage: bool) -> tuple[bytes, dict | None, bool]:
    """(bytes to forward, usage if this batch carried it, [DONE] seen) for a batch of complete SSE events.
    Only the event that carries a usage object is parsed (and cut out when `strip_usage` and it is the
    usage-only chunk); every other byte passes untouched."""
    done = b"data: [DONE]" in batch
    found = [i for i in (batch.find(b'"usage":{'), batch.find(b'"usage": {')) if i >= 0]
    if not found:
        return batch, None, done
    at = min(found)
    start = batch.rfind(b"\n\n", 0, at)
    start = 0 if start < 0 else start + 2
    end = batch.find(b"\n\n", at)
    end = len(batch) if end < 0 else end + 2
    event = batch[start:end]
    try:
        chunk = orjson.loads(event[event.index(b"{"):])
    except (ValueError, orjson.JSONDecodeError):
        chunk = {}
    usage = (chunk.get("usage") or None) if isinstance(chunk, dict) else None
    if strip_usage and usage and not chunk.get("choices"):  # the usage-only chunk the gateway asked for
        return batch[:start] + batch[end:], usage, done
    return batch, usage, done


def upstream_error(status: int, body: bytes) -> GatewayError:
    """The upstream's own 4xx (e.g. vLLM's 400 for a context overflow) keeps its status and message;
    5xx becomes 502."""
    try:
        parsed = orjson.loads(body)
        err = parsed.get("error", parsed) if isinstance(parsed, dict) else {}
        message = err.get("message") if isinstance(err, dict) else None
    except (ValueError, orjson.JSONDecodeError):
        message = None
    message = message or body[:200].decode(errors="replace") or f"HTTP {status}"
    if 400 <= status < 500:
        return GatewayError(status, message, code="upstream_rejected", reason="upstream_rejected")
    return GatewayError(502, f"upstream failed with HTTP {status}: {message}", code="upstream_error",
                        reason="upstream_error")


async def _wait_for_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class RelayResponse(Response):
    """Sends an admitted request upstream and relays the answer. Errors before the first byte are real HTTP
    errors (504/502/upstream 4xx); after it, a final SSE error event. A client that goes away cancels the
    upstream request at once. Always: slot released, tokens settled, metrics and one log line."""

    def __init__(self, admitted: "Admitted"):
        self.admitted = admitted
        self.background = None
        self.status_code = 200
        self.sent_head = False
        self.usage: dict | None = None
        self.ttft: float | None = None

    async def __call__(self, scope, receive, send) -> None:
        """The relay runs in this task; a listener task cancels it when the client leaves (one task per request
        less than relaying in a task of its own: measured)."""
        task = asyncio.current_task()
        self._relaying, self._client_left = True, False

        def client_left(listener: asyncio.Task) -> None:
            if self._relaying and not listener.cancelled():
                self._client_left = True
                task.cancel()

        listener = asyncio.ensure_future(_wait_for_disconnect(receive))
        listener.add_done_callback(client_left)
        try:
            await self._relay(send)
        except asyncio.CancelledError:
            if not self._client_left:  # the server is stopping
                raise
            task.uncancel()
        finally:
            self._relaying = False
            listener.cancel()
        if self._client_left:
            child(self.admitted.gateway.metrics.client_disconnects, self.admitted.target.name).inc()
            try:  # a cancel asked for just as the relay finished is still pending: take it here
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                task.uncancel()

    def _headers(self, content_type: bytes, extra: dict | None = None) -> list[tuple[bytes, bytes]]:
        a = self.admitted
        headers = [(b"content-type", content_type), (b"x-request-id", a.request_id.encode()),
                   (b"x-cxygpt-model", a.target.name.encode()), (b"x-cxygpt-max-tokens", str(a.max_tokens).encode()),
                   (b"x-cxygpt-degraded", b"1" if a.degraded else b"0")]
        if a.target is not a.route:
            headers.append((b"x-cxygpt-fallback-from", a.route.name.encode()))
        for k, v in (extra or {}).items():
            headers.append((k.lower().encode(), str(v).encode()))
        return headers

    async def _relay(self, send) -> None:
        a = self.admitted
        target, timeouts = a.target, a.target.limits.timeouts
        started = time.monotonic()
        status, error, resp = 500, None, None
        try:
            async with asyncio.timeout(timeouts.total_s):
                resp = await self._open()
                async with resp:
                    if resp.status != 200:
                        raise upstream_error(resp.status, await resp.read())
                    await (self._relay_stream(resp, send, started) if a.req.stream else self._relay_whole(resp, send))
                    status = 200
        except TimeoutError:
            error = GatewayError(504, f"{target.name} did not finish within {timeouts.total_s:g} s",
                                 code="upstream_timeout", reason="total_timeout")
        except GatewayError as e:
            error = e
        except (aiohttp.ClientError, ConnectionError) as e:
            error = GatewayError(502, f"upstream {target.name} failed: {e.__class__.__name__}: {e}",
                                 code="upstream_error", reason="upstream_broken")
        except Exception as e:  # a gateway bug must still end in an answer, and be visible
            log.exception("relay of %s failed", a.request_id)
            error = GatewayError(502, f"gateway failed to relay the request: {e.__class__.__name__}",
                                 code="gateway_error", reason="gateway_error")
        except asyncio.CancelledError:
            status = 499  # the client closed the connection: nothing left to send
            if resp is not None:
                resp.close()  # drop the upstream connection so the engine aborts the request now
            raise
        finally:
            a.slot.release()
            if error is not None:
                status = await self._send_error(send, error, self.sent_head)
            await self._account(status, started, error)

    async def _open(self) -> "UpstreamResponse":
        a = self.admitted
        gw, target, backend = a.gateway, a.target, a.slot.backend
        timeouts = target.limits.timeouts
        headers = {**JSON_HEADERS, "X-Request-Id": a.request_id}  # the engine's logs and response id carry it
        if target.spec.api_key:
            headers["Authorization"] = f"Bearer {target.spec.api_key}"
        try:
            return await gw.upstream.pool.post(backend.url, PATHS[a.req.kind], a.upstream_body, headers,
                                               timeouts.connect_s)
        except UpstreamUnreachable as e:
            checked = gw.health_checker is not None and not target.spec.external
            eject(backend, restore_after=None if checked else EJECT_S)
            raise GatewayError(502, f"upstream {target.name} unreachable: {e.strerror or e}",
                               code="upstream_unreachable", reason="upstream_unreachable") from None
        except UpstreamConnectTimeout:
            raise GatewayError(504, f"upstream {target.name} did not accept the connection within "
                                    f"{timeouts.connect_s:g} s", code="upstream_timeout",
                               reason="upstream_timeout") from None

    async def _relay_whole(self, resp: "UpstreamResponse", send) -> None:
        data = await resp.read()
        self.usage = _usage(data)
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._headers(b"application/json", {"content-length": len(data)})})
        self.sent_head = True
        await send({"type": "http.response.body", "body": data})

    async def _relay_stream(self, resp: "UpstreamResponse", send, started: float) -> None:
        """Nothing is sent before the first event, so a TTFT timeout is still a real 504."""
        a = self.admitted
        try:
            async with asyncio.timeout(a.target.limits.timeouts.ttft_s):
                batch = await resp.events()
        except TimeoutError:
            raise GatewayError(504, f"no first token from {a.target.name} within "
                                    f"{a.target.limits.timeouts.ttft_s:g} s", code="upstream_timeout",
                               reason="ttft_timeout") from None
        if batch is None:
            raise GatewayError(502, f"upstream {a.target.name} ended the stream before its first event",
                               code="upstream_error", reason="upstream_stream_broken")
        self.ttft = time.monotonic() - started
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._headers(b"text/event-stream", {"cache-control": "no-cache"})})
        self.sent_head = True
        done, strip = False, not a.req.client_wants_usage
        while batch is not None:
            out, usage, seen_done = scan_stream(batch, strip)
            self.usage, done = usage or self.usage, done or seen_done
            if done and resp.complete:  # the upstream has ended too: this batch ends the answer, in one write
                await send({"type": "http.response.body", "body": out, "more_body": False})
                return
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            batch = await resp.events()
        if not done:
            raise GatewayError(502, f"upstream {a.target.name} ended the stream early", code="upstream_error",
                               reason="upstream_stream_broken")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_error(self, send, error: GatewayError, sent_head: bool) -> int:
        a = self.admitted
        a.gateway.metrics.upstream_errors.labels(a.target.name, error.reason).inc()
        try:
            if sent_head:
                await send({"type": "http.response.body", "body": error.sse_event(), "more_body": False})
                return 200
            body = error.body()
            await send({"type": "http.response.start", "status": error.status,
                        "headers": self._headers(b"application/json", {**error.headers, "content-length": len(body)})})
            await send({"type": "http.response.body", "body": body})
        except OSError:
            pass  # the client is gone as well
        return error.status

    async def _account(self, status: int, started: float, error: GatewayError | None) -> None:
        a = self.admitted
        usage, ttft = self.usage, self.ttft
        gw, name = a.gateway, a.target.name
        m = gw.metrics
        now = time.monotonic()
        child(m.requests, name, str(status)).inc()
        child(m.latency, name).observe(now - a.arrived)
        child(m.queue_wait, name).observe(a.slot.queued_s)
        prompt = completion = None
        if ttft is not None and a.req.stream:
            child(m.ttft, name).observe(ttft)
            a.target.degrade.observe_ttft(ttft)
        if usage:
            prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
            child(m.prompt_tokens, name).inc(prompt)
            child(m.completion_tokens, name).inc(completion)
        if gw.settings.log_requests:
            log_request(gw.request_log, request_id=a.request_id, key_id=a.caller.key_id, model=a.route.name,
                        served_by=name, status=status, error=error.message if error else None,
                        stream=a.req.stream, queue_time=rounded(a.slot.queued_s),
                        upstream_time=rounded(now - started), ttft=rounded(ttft), prompt_tokens=prompt,
                        completion_tokens=completion, counted_input_tokens=a.input_tokens,
                        max_tokens=a.max_tokens, degraded=a.degraded)
        if usage and a.scopes:
            await gw.limiter.settle(a.scopes, int(usage.get("total_tokens") or (prompt or 0) + (completion or 0)))


_CHILDREN: dict[tuple, object] = {}


def child(metric, *labels: str):
    """`metric.labels(*labels)`, remembered: prometheus_client validates and locks on every labels() call."""
    key = (metric, labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


def _usage(data: bytes) -> dict | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("usage") if isinstance(parsed, dict) else None


# --- the relay's HTTP/1.1 client ---------------------------------------------------------------------------
# aiohttp's client spent ~30 % of the gateway's CPU per relayed request (request/response objects, timeout
# and header machinery, a write per part); this one keeps a pool of keep-alive connections per upstream,
# writes each request in one piece and parses answers with httptools (measured, BENCHMARKS.md).

class UpstreamUnreachable(ConnectionError):
    """No connection could be opened (refused, no route, name not resolved)."""


class UpstreamConnectTimeout(Exception):
    """The connection was not accepted within the connect timeout."""


# an idle connection older than this is not reused: servers close idle keep-alive connections (vLLM after 5 s)
IDLE_S = 4.0
# buffered but unread upstream bytes above which reading pauses (a slow client must not fill our memory)
HIGH_WATER = 1 << 18


class _Connection(asyncio.Protocol):
    __slots__ = ("pool", "key", "parser", "transport", "response", "closed", "idle_since", "_paused")

    def __init__(self, pool: "UpstreamPool", key: tuple):
        self.pool, self.key = pool, key
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
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
        r.received = True
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
    __slots__ = ("conn", "status", "head", "received", "until_close", "complete", "keep_alive", "buffered",
                 "_chunks", "_waiter", "_error", "_tail")

    def __init__(self, conn: _Connection):
        self.conn, self.status, self.received, self.until_close = conn, 0, False, True
        self.head = asyncio.get_running_loop().create_future()
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
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self.buffered = 0
        self.conn.resume()
        return data

    async def read(self) -> bytes:
        parts = []
        while (data := await self._more()) is not None:
            parts.append(data)
        return b"".join(parts)

    async def events(self) -> bytes | None:
        """The next run of complete SSE events (ending on a blank line) that arrived; None at the end (an
        unterminated last event is completed)."""
        while True:
            data = await self._more()
            if data is None:
                tail, self._tail = self._tail, b""
                return tail + b"\n\n" if tail.strip() else None
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
        conn.response = None
        if self.complete and self.keep_alive and self._error is None and not conn.closed:
            conn.pool._idle(conn)
        else:
            conn.close()

    async def __aenter__(self) -> "UpstreamResponse":
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()


class UpstreamPool:
    """Keep-alive connections per upstream (scheme, host, port); unlimited, like the aiohttp connector it replaced:
    the per-model queue is what bounds concurrency."""

    def __init__(self):
        self._idle_conns: dict[tuple, list[_Connection]] = {}
        self._targets: dict[str, tuple] = {}
        self._ssl: ssl.SSLContext | None = None

    def _target(self, base_url: str) -> tuple:
        t = self._targets.get(base_url)
        if t is None:
            u = urlsplit(base_url)
            tls = u.scheme == "https"
            port = u.port or (443 if tls else 80)
            host_header = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
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
            if not conn.closed and conn.idle_since > horizon:
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
            async with asyncio.timeout(timeout_s):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: _Connection(self, key), host, port, **kwargs)
        except TimeoutError:
            raise UpstreamConnectTimeout() from None
        except OSError as e:  # refused, unreachable, name not resolved, TLS failure
            raise UpstreamUnreachable(e.errno, e.strerror or str(e)) from None
        return conn

    async def post(self, base_url: str, path: str, body: bytes, headers: dict[str, str],
                   connect_timeout_s: float) -> UpstreamResponse:
        """Send one POST and wait for the answer's status and headers."""
        key, host, prefix = self._target(base_url)
        head = [b"POST ", prefix.encode(), path.encode(), b" HTTP/1.1\r\nHost: ", host,
                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        for name, value in headers.items():
            head += (name.encode(), b": ", value.encode(), b"\r\n")
        head.append(b"\r\n")
        request = b"".join(head) + body
        while True:
            conn = self._reuse(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key, connect_timeout_s)
            response = conn.response = UpstreamResponse(conn)
            conn.transport.write(request)
            try:
                await response.head
                return response
            except ConnectionError:
                conn.close()
                if reused and not response.received:
                    continue  # a kept-alive connection the upstream had closed: once more on a new one
                raise
            except BaseException:
                conn.close()
                raise

    def close(self) -> None:
        for conns in self._idle_conns.values():
            for conn in conns:
                conn.close()
        self._idle_conns.clear()
