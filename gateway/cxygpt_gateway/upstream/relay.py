"""The relay of admitted requests to their engines: the answer streamed back, failures answered, all accounted."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import orjson

from ..admission.pipeline import Admitted
from ..admission.request import PATHS
from ..errors import GatewayError
from ..exchange.port import ClientLeft, Exchange
from ..logs import RequestLog, rounded
from ..routing.policies import OTHER
from .client import JSON_HEADERS
from .pool import AnswerTooLarge, UpstreamConnectTimeout, UpstreamPool, UpstreamResponse, UpstreamUnreachable

if TYPE_CHECKING:
    from ..admission.queue import Backend, ModelQueue, Slot
    from ..admission.ratelimit import RateLimiter
    from ..metrics import GatewayMetrics
    from ..routing.keys import RouteKey
    from ..routing.registry import ModelRoute

log = logging.getLogger("cxygpt.gateway")
# the events that end a Responses API stream (it has no [DONE])
RESPONSE_ENDS = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')
# how long a replica that refused connections stays out of rotation when nothing re-checks it
EJECT_S = 5.0
# a request none of which reached its replica goes back in line ahead of every tier (they are 0 and up)
FAILOVER_PRIORITY = -1
# failures that mean no engine read the request: it used no tokens
UNSENT_REASONS = frozenset({"replica_unreachable", "adapter_not_loaded"})
# how much of an upstream's error message is relayed (an engine may quote the prompt in it)
UPSTREAM_MESSAGE_CHARS = 1000


async def _drain(resp: UpstreamResponse) -> None:
    """Read a refusal to its end (its connection is then reused), or drop its connection."""
    async with resp:
        try:
            await resp.read(1 << 16)
        except (AnswerTooLarge, ConnectionError):
            resp.close()


def eject(queue: ModelQueue, backend: Backend, *, restore_after: float | None) -> None:
    """Take a replica that refused us out of rotation; one no health check watches comes back after a pause."""
    if backend.healthy:
        log.warning("upstream %s unreachable, out of rotation", backend.url)
    queue.mark(backend, False)
    if restore_after is not None:
        asyncio.get_running_loop().call_later(restore_after, queue.mark, backend, True)


def _last_usage_object(batch: bytes) -> int:
    """Where the last `"usage": {` of the batch starts, or -1; searched from the end, where the usage chunk is
    (chunks with `"usage": null` are passed over)."""
    end = len(batch)
    while (at := batch.rfind(b'"usage":', 0, end)) >= 0:
        if batch[at + 8:at + 10].lstrip()[:1] == b"{":
            return at
        end = at
    return -1


def _ends_responses_stream(batch: bytes) -> bool:
    last = batch[batch.rfind(b"\n\n", 0, len(batch) - 2) + 2:]
    return any(end in last for end in RESPONSE_ENDS)


def scan_stream(batch: bytes, strip_usage: bool, responses: bool = False) -> tuple[bytes, dict | None, bool]:
    """(bytes to forward, usage if this batch carried it, the stream's end seen) for a batch of complete SSE
    events. Only the last event that carries a usage object is parsed (and cut out when `strip_usage` and it is
    the usage-only chunk); every other byte passes untouched. A Responses API stream carries its usage inside
    the final response.completed event and ends there."""
    # the terminator is the stream's last event
    done = _ends_responses_stream(batch) if responses else b"data: [DONE]" in batch[-64:]
    at = _last_usage_object(batch)
    if at < 0:
        return batch, None, done
    start = batch.rfind(b"\n\n", 0, at)
    start = 0 if start < 0 else start + 2
    end = batch.find(b"\n\n", at)
    end = len(batch) if end < 0 else end + 2
    event = batch[start:end]
    try:
        chunk = orjson.loads(event[event.index(b"{"):])
    except (ValueError, orjson.JSONDecodeError):
        chunk = {}
    if not isinstance(chunk, dict):
        return batch, None, done
    usage = chunk.get("usage") or (chunk.get("response") or {}).get("usage") or None
    if strip_usage and usage and not chunk.get("choices"):  # the usage-only chunk the gateway asked for
        return batch[:start] + batch[end:], usage, done
    return batch, usage, done


def upstream_error(status: int, body: bytes) -> GatewayError:
    """The upstream's own 4xx (e.g. vLLM's 400 for a context overflow) keeps its status and message;
    401/403 (the engine refused the gateway) and 5xx become 502."""
    try:
        parsed = orjson.loads(body)
        err = parsed.get("error", parsed) if isinstance(parsed, dict) else {}
        message = err.get("message") if isinstance(err, dict) else None
    except (ValueError, orjson.JSONDecodeError):
        message = None
    message = str(message or body[:200].decode(errors="replace") or f"HTTP {status}")
    if len(message) > UPSTREAM_MESSAGE_CHARS:
        message = f"{message[:UPSTREAM_MESSAGE_CHARS]}... ({len(message)} characters)"
    if status in (401, 403):  # the engine refused the gateway, not the caller: a 401 here means the caller's key
        return GatewayError(502, f"upstream refused the gateway's request with HTTP {status}: {message}",
                            code="upstream_error", reason="upstream_auth")
    if 400 <= status < 500:
        return GatewayError(status, message, code="upstream_rejected", reason="upstream_rejected")
    return GatewayError(502, f"upstream failed with HTTP {status}: {message}", code="upstream_error",
                        reason="upstream_error")


def _usage(data: bytes) -> dict | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("usage") if isinstance(parsed, dict) else None


_CHILDREN: dict[tuple, object] = {}


def child(metric, *labels: str):
    """`metric.labels(*labels)`, remembered: prometheus_client validates and locks on every labels() call."""
    key = (metric, labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


class Relayer:
    """What every relay uses: the engines' connection pool, the metrics, the request log, the limiter that settles
    each request's tokens, and whether a health check restores a replica taken out of rotation."""

    def __init__(self, pool: UpstreamPool, metrics: GatewayMetrics, request_log: RequestLog,
                 limiter: RateLimiter, *, health_checked: bool):
        self.pool, self.metrics, self.request_log, self.limiter = pool, metrics, request_log, limiter
        self.health_checked = health_checked

    async def relay(self, admitted: Admitted, ex: Exchange) -> None:
        await Relay(self, admitted, ex).run()


class Relay:
    """Sends an admitted request upstream and relays the answer. Errors before the first byte are real HTTP
    errors (504/502/upstream 4xx); after it, a final SSE error event. A client that goes away cancels the
    upstream request at once. Always: slot released, tokens settled, metrics and one log line."""
    __slots__ = ("up", "admitted", "ex", "sent_head", "usage", "ttft")

    def __init__(self, up: Relayer, admitted: Admitted, ex: Exchange):
        self.up, self.admitted, self.ex = up, admitted, ex
        self.sent_head = False
        self.usage: dict | None = None
        self.ttft: float | None = None

    async def run(self) -> None:
        """Only the exchange itself is watched: a client seen leaving after its answer ended is no cancel."""
        a = self.admitted
        started = time.monotonic()
        status, error = 499, None
        try:
            with self.ex.watched():
                status, error = await self._relay(started)
        except ClientLeft:
            child(self.up.metrics.client_disconnects, a.target.name).inc()
        finally:
            a.slot.release()
            await self._account(status, started, error)

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

    async def _relay(self, started: float) -> tuple[int, GatewayError | None]:
        a = self.admitted
        target, timeouts = a.target, a.target.limits.timeouts
        error, resp = None, None
        try:
            with self.ex.deadline(timeouts.total_s):
                resp = await self._open()
                async with resp:
                    if resp.status != 200:
                        raise upstream_error(resp.status, await resp.read())
                    await (self._relay_stream(resp, started) if a.req.stream else self._relay_whole(resp))
                    return 200, None
        except TimeoutError:
            error = GatewayError(504, f"{target.name} did not finish within {timeouts.total_s:g} s",
                                 code="upstream_timeout", reason="total_timeout")
        except GatewayError as e:
            error = e
        except ConnectionError as e:
            error = GatewayError(502, f"upstream {target.name} failed: {e.__class__.__name__}: {e}",
                                 code="upstream_error", reason="upstream_broken")
        except Exception as e:  # a gateway bug must still end in an answer, and be visible
            log.exception("relay of %s failed", a.request_id)
            error = GatewayError(502, f"gateway failed to relay the request: {e.__class__.__name__}",
                                 code="gateway_error", reason="gateway_error")
        except asyncio.CancelledError:
            if resp is not None:
                resp.close()  # drop the upstream connection so the engine aborts the request now
            raise
        a.slot.release()  # the engine is done with it; the client may be slow to take the error
        return await self._send_error(error), error

    async def _open(self) -> UpstreamResponse:
        """The answer's head from the slot's replica; a replica that nothing of the request reached (connection
        refused or not accepted in time) is taken out of rotation and the next free one is tried; so is the next
        replica with the adapter for an adapter's request that the engine refused with a 404 (no such model there)."""
        a = self.admitted
        up, target = self.up, a.target
        timeouts = target.limits.timeouts
        # the engine's logs and response id carry the request id
        headers = {**JSON_HEADERS, "X-Request-Id": a.request_id}
        if target.spec.api_key:
            headers["Authorization"] = f"Bearer {target.spec.api_key}"
        tried: tuple[Backend, ...] = ()
        while True:
            backend, adapter, missing = a.slot.backend, a.slot.adapter, False
            try:
                resp = await up.pool.post(backend.url, PATHS[a.req.kind], a.upstream_body, headers,
                                          timeouts.connect_s)
                if resp.status != 404 or adapter is None:
                    return resp
                # the engine has not got the adapter (unloaded since its /v1/models was read): vLLM refuses an
                # unknown model before any work, so the request goes to a replica that has it, not back as a 404
                await _drain(resp)
                failure, missing = f"does not have adapter {adapter} loaded", True
                if backend.adapters is not None:
                    backend.adapters -= {adapter}
            except UpstreamUnreachable as e:
                failure = f"unreachable: {e.strerror or e}"
            except UpstreamConnectTimeout:
                failure = f"did not accept the connection within {timeouts.connect_s:g} s"
            if not missing:
                checked = up.health_checked and not target.spec.external  # a health check restores it
                eject(target.queue, backend, restore_after=None if checked else EJECT_S)
            tried += (backend,)
            queued_s, key = a.slot.queued_s, a.slot.key
            # the next in the request's order
            other = target.queue.take_other(tried, queued_s=queued_s, key=key, adapter=a.slot.adapter)
            a.slot.release(served=False)
            if other is None:
                if adapter is not None and not any(b not in tried for b in target.queue.serving(adapter)):
                    raise GatewayError(503, f"adapter {adapter} of model {target.parent}: replica {backend.url} "
                                            f"{failure}, and no other ready replica has it; nothing of the request "
                                            "was done, so it is safe to retry", code="adapter_not_loaded",
                                       reason="adapter_not_loaded", retry_after=5)
                if not target.queue.routable():
                    raise GatewayError(503, f"model {target.name}: replica {backend.url} {failure}, and no other "
                                            "replica is left; nothing of the request was sent, so it is safe to retry",
                                       code="no_ready_replica", reason="replica_unreachable", retry_after=1)
                other = await self._wait_ahead(target, key, a.slot.adapter,
                                               failure=f"replica {backend.url} {failure}")
                other.queued_s += queued_s
                other.choice = OTHER
            a.slot = other
            child(up.metrics.failovers, target.name).inc()

    async def _wait_ahead(self, target: ModelRoute, key: RouteKey | None, adapter: str | None,
                          failure: str) -> Slot:
        """Back in line, ahead of everyone (this request was admitted before them), for the next free replica."""
        queue_s = target.limits.timeouts.queue_s
        try:
            with self.ex.deadline(queue_s):
                return await target.queue.wait(FAILOVER_PRIORITY, key, adapter)
        except TimeoutError:
            raise GatewayError(503, f"model {target.name}: {failure}, and no other replica was free within "
                                    f"{queue_s:g} s; nothing of the request was sent, so it is safe to retry",
                               code="queue_timeout", reason="replica_unreachable",
                               retry_after=target.queue.retry_after()) from None

    async def _relay_whole(self, resp: UpstreamResponse) -> None:
        data = await resp.read()
        self.usage = _usage(data)
        self.sent_head = True
        await self.ex.respond(200, self._headers(b"application/json"), data)

    async def _relay_stream(self, resp: UpstreamResponse, started: float) -> None:
        """Nothing is sent before the first event, so a TTFT timeout is still a real 504."""
        a = self.admitted
        try:
            with self.ex.deadline(a.target.limits.timeouts.ttft_s):
                batch = await resp.events()
        except TimeoutError:
            raise GatewayError(504, f"no first token from {a.target.name} within "
                                    f"{a.target.limits.timeouts.ttft_s:g} s", code="upstream_timeout",
                               reason="ttft_timeout") from None
        if batch is None:
            raise GatewayError(502, f"upstream {a.target.name} ended the stream before its first event",
                               code="upstream_error", reason="upstream_stream_broken")
        self.ttft = time.monotonic() - started
        headers = self._headers(b"text/event-stream", {"cache-control": "no-cache"})
        responses = a.req.kind == "responses"
        done, strip = False, not a.req.client_wants_usage and not responses
        while batch is not None:
            out, usage, seen_done = scan_stream(batch, strip, responses)
            self.usage, done = usage or self.usage, done or seen_done
            last = done and resp.complete  # the upstream has ended too: this batch ends the answer, in one write
            if not self.sent_head:
                self.sent_head = True
                await self.ex.respond(200, headers, out, more=not last)
            elif out or last:
                await self.ex.write(out, more=not last)
            if last:
                return
            batch = await resp.events()
        if not done:
            raise GatewayError(502, f"upstream {a.target.name} ended the stream early", code="upstream_error",
                               reason="upstream_stream_broken")
        await self.ex.write(b"", more=False)

    async def _send_error(self, error: GatewayError) -> int:
        a, ex = self.admitted, self.ex
        self.up.metrics.upstream_errors.labels(a.target.name, error.reason).inc()
        try:
            if self.sent_head:
                await ex.write(error.sse_event(responses=a.req.kind == "responses"), more=False)
                return 200
            await ex.respond(error.status, self._headers(b"application/json", error.headers), error.body())
        except OSError:
            pass  # the client is gone as well
        return error.status

    async def _account(self, status: int, started: float, error: GatewayError | None) -> None:
        a = self.admitted
        usage, ttft = self.usage, self.ttft
        up, name = self.up, a.target.name
        m = up.metrics
        now = time.monotonic()
        child(m.requests, name, str(status)).inc()
        child(m.latency, name).observe(now - a.arrived)
        child(m.queue_wait, name).observe(a.slot.queued_s)
        child(m.routed, name, a.target.queue.router.routing.policy, a.slot.choice).inc()
        prompt = completion = None
        if ttft is not None and a.req.stream:
            child(m.ttft, name).observe(ttft)
            a.target.degrade.observe_ttft(ttft)
        if usage:  # chat/completions/embeddings name them prompt/completion, the Responses API input/output
            prompt = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
            completion = usage.get("completion_tokens") or usage.get("output_tokens") or 0
            child(m.prompt_tokens, name).inc(prompt)
            child(m.completion_tokens, name).inc(completion)
        up.request_log.write(request_id=a.request_id, key_id=a.caller.key_id, model=a.route.name, served_by=name,
                             status=status, error=error.message if error else None, stream=a.req.stream,
                             queue_time=rounded(a.slot.queued_s), upstream_time=rounded(now - started),
                             ttft=rounded(ttft), prompt_tokens=prompt, completion_tokens=completion,
                             counted_input_tokens=a.input_tokens, max_tokens=a.max_tokens, degraded=a.degraded)
        # what it used settles its reservation; unknown (cut off mid-answer), the reservation stands; nothing sent
        # (no replica took it), every token comes back
        used = int(usage.get("total_tokens") or (prompt or 0) + (completion or 0)) if usage else None
        if used is None and error is not None and error.reason in UNSENT_REASONS:
            used = 0
        await up.limiter.settle(a.reservation, used)
