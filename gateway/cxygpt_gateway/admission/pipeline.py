"""Admission: auth → body → model → schema → rate → input tokens → (wake, demand) → tokens reserved → queue."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson

from ..errors import GatewayError
from ..exchange.port import ClientLeft, Exchange, body_too_large
from ..routing.keys import RouteKey, for_adapter, route_key
from ..routing.policies import load
from ..routing.registry import Registry, no_ready_replica
from .auth import Caller, KeyStore
from .ratelimit import RateLimiter, Reservation, Scope
from .request import (
    ESTIMATE_BYTES_PER_TOKEN,
    INPUT_PARAM,
    Kind,
    OpenAIRequest,
    cannot_exceed,
    decode,
    echo,
    estimate_tokens,
    model_name,
    prompt_bytes,
    token_id_count,
    tokenize_payloads,
    validate,
)

if TYPE_CHECKING:
    from prometheus_client import Counter

    from ..discovery.base import ScaleTarget
    from ..routing.registry import ModelRoute
    from ..settings import GatewaySettings
    from .queue import Slot


class Tokenizer(Protocol):
    async def tokenize_all(self, base_url: str, payloads: list[dict], timeout_s: float) -> list[int] | None: ...


class Waker(Protocol):
    def wake(self, model: str, target: ScaleTarget | None) -> bool: ...


@dataclass
class Admitted:
    """Everything the relay needs; it owns `slot` and must release it."""
    request_id: str
    caller: Caller
    route: ModelRoute            # the model the client asked for
    target: ModelRoute           # the model that serves it (a fallback when needed)
    req: OpenAIRequest
    upstream_body: bytes
    reservation: Reservation       # the tokens it holds in its budgets until it settles
    degraded: bool
    input_tokens: int | None       # None: certainly within the limit, not counted
    max_tokens: int
    slot: Slot
    arrived: float


# the request headers admission reads (lower case, as servers hand them over)
SESSION_HEADER = b"x-session-id"
READ_HEADERS = (b"x-request-id", b"authorization", b"content-length", SESSION_HEADER)


def read_headers(headers: list[tuple[bytes, bytes]]) -> dict[bytes, str]:
    """The headers admission needs, in one pass over the raw list (the first of a repeated name wins)."""
    found: dict[bytes, str] = {}
    for name, value in headers:
        if name in READ_HEADERS and name not in found:
            found[name] = value.decode("latin-1")
    return found


def _rate_scopes(route: ModelRoute, target: ModelRoute, caller: Caller) -> list[Scope]:
    """The budgets a request is charged to: the model asked for, the model that does the work (a fallback's own
    limits hold for the traffic others send it) and the caller's key."""
    if target is route:  # nearly always: no list built for the rest
        return [] if route.mode == "single" else [route.scope, caller.scope]  # one user: nothing to share
    scopes = [r.scope for r in (route, target) if r.mode != "single"]
    return [*scopes, caller.scope] if scopes else []


def not_relayable(error: orjson.JSONEncodeError) -> GatewayError:
    """JSON that decodes but cannot be encoded again (nested deeper than the encoder's 255 levels) is the client's
    error, said as such."""
    return GatewayError(400, f"request body cannot be relayed: {error} (JSON nested deeper than 255 levels?)",
                        code="invalid_request", reason="invalid_request")


def _output_cap(target: ModelRoute, caller: Caller, degraded: bool, requested: int | None) -> int:
    """min(requested, the model's cap — the degraded one while degraded — and the tier's cap)."""
    cap = target.limits.degraded_max_output_tokens if degraded else target.limits.max_output_tokens
    if caller.tier.max_output_tokens:
        cap = min(cap, caller.tier.max_output_tokens)
    return min(requested or cap, cap)


def adapter_not_loaded(target: ModelRoute, waited_s: float) -> GatewayError:
    return GatewayError(503, f"adapter {target.name} of model {target.parent} is not loaded on any ready replica "
                             f"(waited {waited_s:g} s: it may be loading, or failed to load); retry later",
                        code="adapter_not_loaded", reason="adapter_not_loaded", retry_after=5)


async def _wait_in_line(ex: Exchange, target: ModelRoute, priority: int, key: RouteKey | None,
                        cold_start_s: float, adapter_wait_s: float) -> Slot:
    """The next free slot, within the queue timeout (the cold-start timeout while the model has no replica that
    could ever free one: it is starting from zero; `adapter_wait_s` while none that is ready has the adapter asked
    for loaded: it may be loading); a client that leaves meanwhile leaves the line at once."""
    cold = not target.queue.routable()
    wait_s = cold_start_s if cold else target.limits.timeouts.queue_s
    unloaded = target.adapter is not None and not cold and not target.queue.serving(target.adapter)
    if unloaded:
        wait_s = min(wait_s, adapter_wait_s)
    try:
        with ex.watched():
            with ex.deadline(wait_s):
                return await target.queue.wait(priority, key, target.adapter)
    except ClientLeft:
        raise GatewayError(499, "client closed the request while it waited in the queue",
                           code="client_closed_request", reason="client_gone_while_queued") from None
    except TimeoutError:
        if unloaded and target.adapter is not None and not target.queue.serving(target.adapter):
            raise adapter_not_loaded(target, wait_s) from None
        if cold and not target.queue.routable():
            why = target.spec.unavailable.message if target.spec.unavailable else "no replica is ready"
            raise GatewayError(503, f"model {target.name} got no ready replica within {wait_s:g} s of this request "
                                    f"(the cold-start timeout): {why}", code="cold_start_timeout",
                               reason="cold_start_timeout", retry_after=30) from None
        raise GatewayError(503, f"waited {wait_s:g} s in the queue of model {target.name} without a free slot",
                           code="queue_timeout", reason="queue_timeout",
                           retry_after=target.queue.retry_after()) from None


# refusals for capacity: what the degradation monitor counts as shed
SHED_REASONS = frozenset({"queue_full", "queue_timeout"})


def _routing_key(target: ModelRoute, req: OpenAIRequest, session: str | None) -> RouteKey | None:
    """The request's home on the model's hash ring and its prefix chain (an adapter's own: the engines cache each
    adapter's prefixes apart); none for a policy without them, or a single replica."""
    queue = target.queue
    if not queue.router.uses_key or len(queue.backends) < 2:
        return None
    key = route_key(req.kind, req.body, session)
    return key if target.adapter is None else for_adapter(key, target.adapter)


async def _take_slot(ex: Exchange, target: ModelRoute, priority: int, key: RouteKey | None,
                     cold_start_s: float, adapter_wait_s: float) -> Slot:
    """A slot now or after a wait in line; each outcome is an arrival for the degradation monitor."""
    try:
        slot = target.queue.try_take(key, target.adapter) or await _wait_in_line(ex, target, priority, key,
                                                                                  cold_start_s, adapter_wait_s)
    except GatewayError as e:
        if target.degrade_enabled and e.reason in SHED_REASONS:
            target.degrade.observe_arrival(shed=True)
        raise
    if target.degrade_enabled:
        target.degrade.observe_arrival(shed=False)
    return slot


def _reserved_tokens(req: OpenAIRequest, input_tokens: int | None, max_tokens: int) -> int:
    """What a request may use, held against the token budgets: every prompt's input (counted: the longest, for each;
    not counted: the body's bytes at the estimate's rate) and every choice's output (prompts x n sequences)."""
    given = input_tokens * req.prompts if input_tokens is not None else req.raw_size // ESTIMATE_BYTES_PER_TOKEN
    return given + max_tokens * req.n * req.prompts


class Admission:
    """Admits one request at a time: what it reads of the request, in order, and what it decides (the module's
    docstring); the parts it takes are the few it uses."""

    def __init__(self, settings: GatewaySettings, keys: KeyStore, registry: Registry, limiter: RateLimiter,
                 tokenizer: Tokenizer, waker: Waker, tokenize_calls: Counter):
        self.settings, self.keys, self.registry, self.limiter = settings, keys, registry, limiter
        self.tokenizer, self.waker, self.tokenize_calls = tokenizer, waker, tokenize_calls

    async def count_input(self, req: OpenAIRequest, target: ModelRoute, limit: int) -> int | None:
        """Exact from the upstream's /tokenize for the prompts that might be over `limit` (the longest counts), skipped
        when none can be; the documented estimate when the upstream cannot count (or has no replica yet)."""
        ids = token_id_count(req)
        if ids is not None:
            return ids
        mode = self.settings.tokenize
        margin = self.settings.tokenize_skip_margin
        if mode == "auto" and cannot_exceed(req, limit, margin):
            return None
        if mode == "never" or target.spec.external:
            return estimate_tokens(req)
        backends = target.queue.routable()
        if not backends:
            return estimate_tokens(req)
        payloads = tokenize_payloads(req, target.tokenizer_name)
        if mode == "auto" and len(payloads) > 1:  # only the prompts that could be over it are counted
            payloads = [p for p in payloads if prompt_bytes(p) + margin > limit]
            if not payloads:
                return None
        self.tokenize_calls.labels(target.name).inc(len(payloads))
        counts = await self.tokenizer.tokenize_all(min(backends, key=load).url, payloads,
                                                   target.limits.timeouts.connect_s)
        return max(counts) if counts is not None else estimate_tokens(req)

    def _fallback(self, route: ModelRoute) -> ModelRoute | None:
        """The model that serves for `route` when it cannot: its fallbackModel, when ready, of the same task, and
        accepting fallbacks from the route's namespace (its owner's say: spec.acceptFallbackFrom)."""
        fb = self.registry.get(route.spec.fallback) if route.spec.fallback else None
        usable = (fb is not None and fb is not route and fb.spec.task == route.spec.task and fb.routable()
                  and fb.spec.accepts_fallback_from(route.spec.namespace))
        return fb if usable else None

    def _upstream_body(self, req: OpenAIRequest, target: ModelRoute, max_tokens: int, degraded: bool) -> bytes:
        body = dict(req.body)
        body["model"] = target.spec.served_name
        if not req.generates:
            try:
                return orjson.dumps(body)
            except orjson.JSONEncodeError as e:
                raise not_relayable(e) from None
        if req.kind == "responses":  # its streams end with the usage in response.completed: nothing to ask for
            body["max_output_tokens"] = max_tokens
        else:
            body["max_tokens"] = max_tokens
            if "max_completion_tokens" in body:
                body["max_completion_tokens"] = max_tokens
            if req.stream:  # always ask for usage so tokens are counted exactly; stripped again if not wanted
                body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        if degraded:
            s = self.settings
            for param, cap in (("temperature", s.degraded_temperature_max), ("top_p", s.degraded_top_p_max)):
                if cap is not None:
                    given = body.get(param)
                    body[param] = min(1.0 if given is None else given, cap)  # unset means the engine's 1.0
        try:
            return orjson.dumps(body)
        except orjson.JSONEncodeError as e:
            raise not_relayable(e) from None

    async def _admit_input(self, req: OpenAIRequest, route: ModelRoute, target: ModelRoute,
                           degraded: bool) -> tuple[ModelRoute, int | None]:
        """The model that can take this input and its count: the target, else the fallback; else 413, or 503 for
        an input that is only too long for a degraded model."""
        limit = target.limits.max_input_tokens
        long_limit = int(limit * self.settings.degraded_long_input_fraction) if degraded else limit
        input_tokens = await self.count_input(req, target, long_limit)
        if input_tokens is None or input_tokens <= long_limit:
            return target, input_tokens
        fb = self._fallback(route) if target is route else None
        fb_tokens = await self.count_input(req, fb, fb.limits.max_input_tokens) if fb else None
        if fb is not None and (fb_tokens is None or fb_tokens <= fb.limits.max_input_tokens):
            return fb, fb_tokens
        if input_tokens <= limit:
            raise GatewayError(503, f"model {route.name} is degraded under load: inputs over {long_limit} tokens "
                                    f"are refused until it recovers (this one has {input_tokens})",
                               code="degraded_input_too_long", reason="degraded_long_input",
                               retry_after=max(route.limits.degrade.recover_s, 1))
        raise GatewayError(413, f"input is {input_tokens} tokens, over the limit of {limit} tokens "
                                f"for model {target.name}", code="context_length_exceeded",
                           param=INPUT_PARAM[req.kind], reason="input_too_long")

    async def _unknown_model(self, caller: Caller, name: str) -> GatewayError:
        """A name nobody serves: 404, quoting the name cut short; the caller's own request rate is charged (a flood of
        unknown names is a flood still)."""
        if caller.scope.requests is not None:
            await self.limiter.admit([caller.scope])
        removed = self.registry.removed_adapter(name)
        if removed is not None:
            return removed
        why = self.registry.reserved.get(name)
        if why is not None:
            return no_ready_replica(name, why)
        return GatewayError(404, f"model {echo(name)} does not exist or is not served here; see GET /v1/models",
                            code="model_not_found", param="model", reason="unknown_model")

    async def admit(self, ex: Exchange, kind: Kind) -> Admitted:
        """The request admitted (a slot taken, tokens reserved), or a GatewayError saying why not."""
        arrived = time.monotonic()
        headers = read_headers(ex.headers)
        request_id = headers.get(b"x-request-id", "")
        # a caller's id is kept for tracing, within reason (it is echoed in a response header)
        if not (0 < len(request_id) <= 128 and request_id.isascii() and request_id.isprintable()):
            request_id = f"{random.getrandbits(64):016x}"  # unique enough, and no system call (os.urandom is one)
        ex.request_id = request_id
        caller = self.keys.authenticate(headers.get(b"authorization"))
        ex.key_id = caller.key_id
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise body_too_large(limit, declared)  # answered before a byte of the body is read
        raw = await ex.read_body(limit)
        body = decode(raw)
        name = model_name(body)
        route = self.registry.get(name)
        if route is None:
            raise await self._unknown_model(caller, name)
        ex.model = route.name
        req = validate(body, kind, len(raw), max_n=route.limits.max_n, max_batch=route.limits.max_batch)
        if (kind == "embeddings") != (route.spec.task == "embed"):
            raise GatewayError(400, f"model {route.name} " + ("serves embeddings only: use POST /v1/embeddings"
                                                              if route.spec.task == "embed" else
                                                              "does not serve embeddings (it generates text)"),
                               code="model_not_supported", param="model", reason="wrong_task")
        degraded = route.is_degraded()
        ex.degraded = degraded

        # an autoscaled model with no ready replica is woken (from zero) and the request waits for it, unless a fallback
        # serves; both only once the request has passed the rate limits and the length check (so a refused request
        # wakes no GPU and counts as no demand)
        target, cold = route, False
        if not route.routable():
            cold = route.spec.scale_from_zero is not None
            fallback = self._fallback(route)
            if fallback is None and not cold:
                raise no_ready_replica(route.name, route.spec.unavailable)
            target = fallback or route
        scopes = _rate_scopes(route, target, caller)
        if scopes:
            await self.limiter.admit(scopes)

        counted_on = target
        target, input_tokens = await self._admit_input(req, route, target, degraded)
        if target is not counted_on:  # the input was too long for the model: its fallback's limits hold too
            scopes = _rate_scopes(route, target, caller)
            if target.mode != "single":
                await self.limiter.admit([target.scope])
        route.demand.arrived()
        if cold:
            self.waker.wake(route.name, route.spec.scale_from_zero)
        target_degraded = degraded if target is route else target.is_degraded()
        max_tokens = _output_cap(target, caller, target_degraded, req.requested_max_tokens) if req.generates else 0
        upstream_body = self._upstream_body(req, target, max_tokens, target_degraded)
        reservation = await self.limiter.reserve(scopes, _reserved_tokens(req, input_tokens, max_tokens))

        key = _routing_key(target, req, headers.get(SESSION_HEADER))
        try:
            slot = await _take_slot(ex, target, caller.tier.priority, key, self.settings.cold_start_timeout_s,
                                    self.settings.adapter_wait_s)
        except GatewayError:
            await self.limiter.settle(reservation, 0)  # nothing reached an engine: every token comes back
            raise
        return Admitted(request_id=request_id, caller=caller, route=route, target=target, req=req,
                        upstream_body=upstream_body, reservation=reservation, degraded=degraded,
                        input_tokens=input_tokens, max_tokens=max_tokens, slot=slot, arrived=arrived)
