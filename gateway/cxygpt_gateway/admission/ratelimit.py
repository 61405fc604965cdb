"""QPS and tokens-per-minute limits, global and per key: in memory, or shared through Redis (`limits` library)."""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, cast

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import Storage as AsyncStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from limits.storage import storage_from_string

from ..errors import GatewayError

log = logging.getLogger("cxygpt.gateway")
NAMESPACE = "cxygpt"
TOKEN_WINDOW_S = 60
NEVER = float("-inf")


@dataclass(frozen=True)
class Rate:
    """Limits of one scope; None means unlimited."""
    qps: float | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class Window:
    amount: int
    period_s: int


def request_window(qps: float) -> Window:
    """A fractional rate (2.5/s) as a whole number of requests over a longer window (25 per 10 s)."""
    if float(qps).is_integer():
        return Window(int(qps), 1)
    return Window(max(1, round(qps * 10)), 10)


@dataclass(frozen=True)
class Scope:
    """Made once per model and per key (not per request), its windows with it."""
    key: str            # counter identifier, e.g. "model:qwen3-14b" or "key:team-a"
    description: str    # for the 429 message, e.g. "model qwen3-14b"
    rate: Rate

    @cached_property
    def requests(self) -> Window | None:
        return None if self.rate.qps is None else request_window(self.rate.qps)

    @cached_property
    def tokens(self) -> Window | None:
        return None if self.rate.tpm is None else Window(self.rate.tpm, TOKEN_WINDOW_S)


class Windows(Protocol):
    """Counters: requests on a moving window (a refused request costs nothing); tokens on a fixed window where a
    request reserves what it may use (input + max_tokens x n) on admission, and settles when it ends: the
    unused part comes back (only to the window it was taken from), what it used beyond is charged anyway."""

    async def requests_free(self, key: str, w: Window) -> bool: ...
    async def take_request(self, key: str, w: Window) -> bool: ...
    async def reserve_tokens(self, key: str, w: Window, cost: int) -> float | None:
        """Take `cost` if it fits in what is left: the window it was taken from (its id), else None, taking nothing."""
    async def adjust_tokens(self, key: str, w: Window, delta: int, window: float | None) -> None:
        """Charge `delta` (> 0) to the current window; give `-delta` back (< 0) only to `window`, if still current."""
    async def requests_retry_after(self, key: str, w: Window) -> float: ...
    async def tokens_retry_after(self, key: str, w: Window) -> float: ...


class LocalWindows:
    """One process's counters on an injectable clock. (The `limits` library's memory storage hands its expiry
    sweep to a thread on most hits: measured at ~15 % of the gateway's CPU under load.)"""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, list[float]] = {}  # key → [window start, tokens charged]

    def _recent(self, key: str, w: Window) -> deque[float]:
        stamps = self._requests.get(key)
        if stamps is None or stamps.maxlen != w.amount:
            stamps = self._requests[key] = deque(stamps or (), maxlen=w.amount)
        horizon = self.clock() - w.period_s
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        return stamps

    async def requests_free(self, key: str, w: Window) -> bool:
        return len(self._recent(key, w)) < w.amount

    async def take_request(self, key: str, w: Window) -> bool:
        stamps = self._recent(key, w)
        if len(stamps) >= w.amount:
            return False
        stamps.append(self.clock())
        return True

    def _token_window(self, key: str, w: Window) -> list[float]:
        now = self.clock()
        window = self._tokens.get(key)
        if window is None or now >= window[0] + w.period_s:
            window = self._tokens[key] = [now, 0]
        return window

    async def reserve_tokens(self, key: str, w: Window, cost: int) -> float | None:
        window = self._token_window(key, w)
        if window[1] + cost > w.amount:
            return None
        window[1] += cost
        return window[0]

    async def adjust_tokens(self, key: str, w: Window, delta: int, window: float | None) -> None:
        if delta > 0:
            self._token_window(key, w)[1] += delta
        elif delta < 0:
            current = self._token_window(key, w)
            if current[0] == window:
                current[1] = max(0, current[1] + delta)

    async def requests_retry_after(self, key: str, w: Window) -> float:
        stamps = self._recent(key, w)
        return stamps[0] + w.period_s - self.clock() if len(stamps) >= w.amount else 0.0

    async def tokens_retry_after(self, key: str, w: Window) -> float:
        return self._token_window(key, w)[0] + w.period_s - self.clock()


class SharedWindows:
    """The same counters in Redis through the `limits` library, so every gateway replica enforces one limit."""

    def __init__(self, redis_url: str):
        uri = redis_url if redis_url.startswith("async+") else "async+" + redis_url
        # short socket timeouts: a dead Redis must cost milliseconds before failing open, not seconds
        # an async+ URI gives the asyncio storage (storage_from_string's type is every storage's)
        self.storage = cast(AsyncStorage, storage_from_string(uri, implementation="redispy", wrap_exceptions=True,
                                                              socket_timeout=0.5, socket_connect_timeout=0.5))
        self._requests = MovingWindowRateLimiter(self.storage)
        self._tokens = FixedWindowRateLimiter(self.storage)

    @staticmethod
    def _item(w: Window) -> RateLimitItem:
        if w.period_s == TOKEN_WINDOW_S:
            return RateLimitItemPerMinute(w.amount, namespace=NAMESPACE)
        return RateLimitItemPerSecond(w.amount, w.period_s, namespace=NAMESPACE)

    async def requests_free(self, key: str, w: Window) -> bool:
        return await self._requests.test(self._item(w), key)

    async def take_request(self, key: str, w: Window) -> bool:
        return await self._requests.hit(self._item(w), key)

    async def reserve_tokens(self, key: str, w: Window, cost: int) -> float | None:
        # incr first, then undo when over: atomic per replica's call, so concurrent reservations cannot both fit
        item = self._item(w)
        counter = item.key_for(key)
        if await self.storage.incr(counter, item.get_expiry(), amount=cost) > w.amount:
            await self.storage.incr(counter, item.get_expiry(), amount=-cost)
            return None
        return await self.storage.get_expiry(counter)

    async def adjust_tokens(self, key: str, w: Window, delta: int, window: float | None) -> None:
        item = self._item(w)
        counter = item.key_for(key)
        if delta > 0:
            await self.storage.incr(counter, item.get_expiry(), amount=delta)
        elif delta < 0 and window is not None and abs(await self.storage.get_expiry(counter) - window) < 0.5:
            if await self.storage.incr(counter, item.get_expiry(), amount=delta) < 0:  # raced the window's end
                await self.storage.clear(counter)

    async def requests_retry_after(self, key: str, w: Window) -> float:
        return (await self._requests.get_window_stats(self._item(w), key)).reset_time - time.time()

    async def tokens_retry_after(self, key: str, w: Window) -> float:
        return (await self._tokens.get_window_stats(self._item(w), key)).reset_time - time.time()


def open_windows(redis_url: str | None) -> Windows:
    return SharedWindows(redis_url) if redis_url else LocalWindows()


@dataclass
class Reservation:
    """Tokens a request holds in each token budget it is charged to, until it settles."""
    tokens: int
    held: list[tuple[Scope, Window, float | None]] = field(default_factory=list)  # scope, budget, taken from


class RateLimiter:
    """Requests are checked and counted on arrival. Tokens: once its input is counted, the request reserves its
    input + max_tokens x n in every token budget, or is refused (a spent budget too); when it ends it is charged
    what it used and the rest comes back. So concurrent requests cannot slip
    past a limit together, and one request cannot spend more than it reserved. Counter failures fail open, counted
    by `on_storage_error`; after one, the counters are left alone for a pause so a black-holed Redis does not slow
    every request."""

    def __init__(self, windows: Windows, *, clock: Callable[[], float] = time.monotonic,
                 on_storage_error: Callable[[], None] = lambda: None, retry_storage_after_s: float = 2.0):
        self.windows, self.clock, self.on_storage_error = windows, clock, on_storage_error
        self.retry_storage_after_s = retry_storage_after_s
        self._storage_down_until = NEVER

    async def admit(self, scopes: list[Scope]) -> None:
        """Count one request in every scope with a request rate, or raise a 429 with Retry-After from the limiting
        window."""
        if self.clock() < self._storage_down_until:
            self.on_storage_error()
            return
        w = self.windows
        try:
            limited = [(s, window) for s in scopes if (window := s.requests) is not None]
            for scope, window in limited:  # test all first: a refusal by one scope costs the others nothing
                if not await w.requests_free(scope.key, window):
                    raise _limited(scope, f"{scope.rate.qps:g} requests per second",
                                   await w.requests_retry_after(scope.key, window))
            for scope, window in limited:
                if not await w.take_request(scope.key, window):  # another replica took the last one
                    raise _limited(scope, f"{scope.rate.qps:g} requests per second",
                                   await w.requests_retry_after(scope.key, window))
        except GatewayError:
            raise
        except Exception as e:  # the counters are unreachable: serving beats refusing everyone
            self._storage_failed(e)

    async def reserve(self, scopes: list[Scope], tokens: int) -> Reservation:
        """Hold `tokens` in every token budget of `scopes`, or none of them and a 429: one that the whole minute's
        budget cannot hold says so (retrying will not help; a smaller max_tokens or n will)."""
        reservation = Reservation(tokens)
        budgets = [(s, window) for s in scopes if (window := s.tokens) is not None]
        if not budgets:
            return reservation
        if self._storage_down_until > NEVER and self.clock() < self._storage_down_until:
            self.on_storage_error()
            return reservation
        for scope, budget in budgets:
            if tokens > budget.amount:
                raise GatewayError(429, f"this request may use {tokens} tokens (its input plus max_tokens x n), "
                                        f"over the whole limit of {scope.rate.tpm} tokens per minute for "
                                        f"{scope.description}: lower max_tokens or n", code="tokens_exceed_limit",
                                   reason="tokens_exceed_limit", retry_after=TOKEN_WINDOW_S)
        w = self.windows
        try:
            for scope, budget in budgets:
                taken_from = await w.reserve_tokens(scope.key, budget, tokens)
                if taken_from is None:
                    await self.settle(reservation, 0)  # give back what the other budgets held
                    raise _limited(scope, f"{scope.rate.tpm} tokens per minute (this request may use {tokens})",
                                   await w.tokens_retry_after(scope.key, budget))
                reservation.held.append((scope, budget, taken_from))
        except GatewayError:
            raise
        except Exception as e:
            self._storage_failed(e)
        return reservation

    async def settle(self, reservation: Reservation, used: int | None) -> None:
        """Charge what the request used (None: not known, the reservation stands) and give the rest back."""
        if used is None or not reservation.held or (
                self._storage_down_until > NEVER and self.clock() < self._storage_down_until):
            return
        delta, held = used - reservation.tokens, reservation.held
        reservation.held = []  # settled once
        if delta == 0:
            return
        try:
            for scope, budget, taken_from in held:
                await self.windows.adjust_tokens(scope.key, budget, delta, taken_from)
        except Exception as e:
            self._storage_failed(e)

    def _storage_failed(self, error: Exception) -> None:
        self.on_storage_error()
        self._storage_down_until = self.clock() + self.retry_storage_after_s
        log.warning("rate limit storage failed, admitting without limits for %g s: %s",
                    self.retry_storage_after_s, error)


def _limited(scope: Scope, what: str, retry_after: float) -> GatewayError:
    retry_after = max(retry_after, 1.0)
    return GatewayError(429, f"rate limit of {what} for {scope.description} reached; "
                             f"retry in {int(-(-retry_after // 1))} s",
                        code="rate_limit_exceeded", reason="rate_limit", retry_after=retry_after)
