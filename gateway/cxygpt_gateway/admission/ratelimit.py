"""QPS and tokens-per-minute limits, global and per key, on the `limits` library (memory or Redis storage)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, Storage
from limits.storage import storage_from_string
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from ..errors import GatewayError

log = logging.getLogger("cxygpt.gateway")
NAMESPACE = "cxygpt"


@dataclass(frozen=True)
class Rate:
    """Limits of one scope; None means unlimited."""
    qps: float | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class Scope:
    key: str            # storage identifier, e.g. "model:qwen3-14b" or "key:team-a"
    description: str    # for the 429 message, e.g. "model qwen3-14b"
    rate: Rate


def qps_item(qps: float) -> RateLimitItem:
    """A fractional rate (2.5/s) as a whole number of requests over a longer window (25 per 10 s)."""
    if float(qps).is_integer():
        return RateLimitItemPerSecond(int(qps), namespace=NAMESPACE)
    return RateLimitItemPerSecond(max(1, round(qps * 10)), 10, namespace=NAMESPACE)


def tpm_item(tpm: int) -> RateLimitItem:
    return RateLimitItemPerMinute(tpm, namespace=NAMESPACE)


def open_storage(redis_url: str | None) -> Storage:
    """Shared Redis storage when configured (so all gateway replicas enforce one limit), else memory."""
    if not redis_url:
        return MemoryStorage()
    uri = redis_url if redis_url.startswith("async+") else "async+" + redis_url
    # short socket timeouts: a dead Redis must cost milliseconds before failing open, not seconds
    return storage_from_string(uri, implementation="redispy", wrap_exceptions=True,
                               socket_timeout=0.5, socket_connect_timeout=0.5)


class RateLimiter:
    """Requests are checked and counted on arrival (moving window: a rejected request costs nothing);
    tokens are checked on arrival (is any budget left?) and settled after the response with the exact
    usage (fixed window that records overshoot, so a long answer is paid in full).
    Storage failures fail open and are counted through `on_storage_error`."""

    def __init__(self, storage: Storage, *, clock: Callable[[], float] = time.time,
                 on_storage_error: Callable[[], None] = lambda: None):
        self.storage, self.clock, self.on_storage_error = storage, clock, on_storage_error
        self._requests = MovingWindowRateLimiter(storage)
        self._tokens = FixedWindowRateLimiter(storage)

    async def admit(self, scopes: list[Scope]) -> None:
        """Count one request in every scope or raise a 429 with Retry-After from the limiter's window."""
        try:
            for scope in scopes:
                if scope.rate.tpm is not None:
                    item = tpm_item(scope.rate.tpm)
                    if not await self._tokens.test(item, scope.key):
                        raise await self._limited(self._tokens, item, scope, f"{scope.rate.tpm} tokens per minute")
            for scope in scopes:
                if scope.rate.qps is not None:
                    item = qps_item(scope.rate.qps)
                    if not await self._requests.test(item, scope.key):
                        raise await self._limited(self._requests, item, scope, f"{scope.rate.qps:g} requests per second")
            for scope in scopes:
                if scope.rate.qps is not None:
                    item = qps_item(scope.rate.qps)
                    # another replica may have taken the last slot since test()
                    if not await self._requests.hit(item, scope.key):
                        raise await self._limited(self._requests, item, scope, f"{scope.rate.qps:g} requests per second")
        except GatewayError:
            raise
        except Exception as e:  # the storage is down: serving beats refusing everyone
            self._storage_failed(e)

    async def settle(self, scopes: list[Scope], tokens: int) -> None:
        """Charge the tokens a finished request used to every scope with a token budget."""
        if tokens <= 0:
            return
        try:
            for scope in scopes:
                if scope.rate.tpm is not None:
                    await self._tokens.hit(tpm_item(scope.rate.tpm), scope.key, cost=tokens)
        except Exception as e:
            self._storage_failed(e)

    async def _limited(self, limiter, item: RateLimitItem, scope: Scope, what: str) -> GatewayError:
        stats = await limiter.get_window_stats(item, scope.key)
        retry_after = max(stats.reset_time - self.clock(), 1.0)
        return GatewayError(429, f"rate limit of {what} for {scope.description} reached; "
                                 f"retry in {int(-(-retry_after // 1))} s",
                            code="rate_limit_exceeded", reason="rate_limit", retry_after=retry_after)

    def _storage_failed(self, error: Exception) -> None:
        self.on_storage_error()
        log.warning("rate limit storage failed, admitting without limits: %s", error)
