"""Upstream I/O on one aiohttp session: /tokenize, /health, and the relay of admitted requests."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
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
    def __init__(self, session: aiohttp.ClientSession):
        self.session = session

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
    Only a batch that mentions a usage object is split and parsed; every other byte passes untouched."""
    done = b"data: [DONE]" in batch
    if b'"usage":{' not in batch and b'"usage": {' not in batch:
        return batch, None, done
    kept, usage = [], None
    for event in batch.split(b"\n\n"):
        if not event:
            continue
        if usage is None and (b'"usage":{' in event or b'"usage": {' in event):
            try:
                chunk = orjson.loads(event[event.index(b"{"):])
            except (ValueError, orjson.JSONDecodeError):
                chunk = {}
            usage = chunk.get("usage") or None
            if strip_usage and usage and not chunk.get("choices"):
                continue  # the usage-only chunk the gateway asked for and the client did not
        kept.append(event)
    return (b"\n\n".join(kept) + b"\n\n" if kept else b""), usage, done


async def complete_events(content: aiohttp.StreamReader):
    """Upstream bytes regrouped so that every yielded batch ends on an SSE event boundary."""
    tail = b""
    async for data in content.iter_any():
        data = tail + data if tail else data
        end = data.rfind(b"\n\n")
        if end < 0:
            tail = data
            continue
        tail = data[end + 2:]
        yield data[:end + 2]
    if tail.strip():
        yield tail + b"\n\n"


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
        a = self.admitted
        relay = asyncio.ensure_future(self._relay(send))
        listener = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait((relay, listener), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not relay.done():  # the client left (or the server is stopping): stop the upstream work now
                relay.cancel()
                a.gateway.metrics.client_disconnects.labels(a.target.name).inc()
            listener.cancel()
            await asyncio.gather(relay, listener, return_exceptions=True)

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

    async def _open(self) -> aiohttp.ClientResponse:
        a = self.admitted
        gw, target, backend = a.gateway, a.target, a.slot.backend
        timeouts = target.limits.timeouts
        headers = {**JSON_HEADERS, "X-Request-Id": a.request_id}  # the engine's logs and response id carry it
        if target.spec.api_key:
            headers["Authorization"] = f"Bearer {target.spec.api_key}"
        try:
            return await gw.upstream.session.post(
                backend.url + PATHS[a.req.kind], data=a.upstream_body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, connect=timeouts.connect_s, sock_connect=timeouts.connect_s))
        except aiohttp.ClientConnectorError as e:
            checked = gw.health_checker is not None and not target.spec.external
            eject(backend, restore_after=None if checked else EJECT_S)
            raise GatewayError(502, f"upstream {target.name} unreachable: {e.strerror or e}",
                               code="upstream_unreachable", reason="upstream_unreachable") from None
        except (aiohttp.ServerTimeoutError, aiohttp.ConnectionTimeoutError):
            raise GatewayError(504, f"upstream {target.name} did not accept the connection within "
                                    f"{timeouts.connect_s:g} s", code="upstream_timeout",
                               reason="upstream_timeout") from None

    async def _relay_whole(self, resp: aiohttp.ClientResponse, send) -> None:
        data = await resp.read()
        self.usage = _usage(data)
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._headers(b"application/json", {"content-length": len(data)})})
        self.sent_head = True
        await send({"type": "http.response.body", "body": data})

    async def _relay_stream(self, resp: aiohttp.ClientResponse, send, started: float) -> None:
        """Nothing is sent before the first event, so a TTFT timeout is still a real 504."""
        a = self.admitted
        events = complete_events(resp.content)
        try:
            async with asyncio.timeout(a.target.limits.timeouts.ttft_s):
                batch = await anext(events)
        except TimeoutError:
            raise GatewayError(504, f"no first token from {a.target.name} within "
                                    f"{a.target.limits.timeouts.ttft_s:g} s", code="upstream_timeout",
                               reason="ttft_timeout") from None
        self.ttft = time.monotonic() - started
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._headers(b"text/event-stream", {"cache-control": "no-cache"})})
        self.sent_head = True
        done, strip = False, not a.req.client_wants_usage
        while True:
            out, usage, seen_done = scan_stream(batch, strip)
            self.usage, done = usage or self.usage, done or seen_done
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            try:
                batch = await anext(events)
            except StopAsyncIteration:
                break
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
        m.requests.labels(name, str(status)).inc()
        m.latency.labels(name).observe(now - a.arrived)
        m.queue_wait.labels(name).observe(a.slot.queued_s)
        prompt = completion = None
        if ttft is not None and a.req.stream:
            m.ttft.labels(name).observe(ttft)
            a.target.degrade.observe_ttft(ttft)
        if usage:
            prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
            m.prompt_tokens.labels(name).inc(prompt)
            m.completion_tokens.labels(name).inc(completion)
        if gw.settings.log_requests:
            log_request(gw.request_log, request_id=a.request_id, key_id=a.caller.key_id, model=a.route.name,
                        served_by=name, status=status, error=error.message if error else None,
                        stream=a.req.stream, queue_time=rounded(a.slot.queued_s),
                        upstream_time=rounded(now - started), ttft=rounded(ttft), prompt_tokens=prompt,
                        completion_tokens=completion, counted_input_tokens=a.input_tokens,
                        max_tokens=a.max_tokens, degraded=a.degraded)
        if usage and a.scopes:
            await gw.limiter.settle(a.scopes, int(usage.get("total_tokens") or (prompt or 0) + (completion or 0)))


def _usage(data: bytes) -> dict | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("usage") if isinstance(parsed, dict) else None
