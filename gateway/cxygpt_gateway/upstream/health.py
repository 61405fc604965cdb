"""Health checking of static backends: /health of every replica each interval marks it routable or not."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..routing.registry import Registry
    from .client import EngineClient

log = logging.getLogger("cxygpt.gateway")


# a replica found down is checked again after this, doubling up to the interval: one that comes up a moment after
# the gateway (its engine still loading) serves within a fraction of a second, not at the next round
FIRST_RETRY_S = 0.25


class HealthChecker:
    """Static backends: /health of every replica each interval, and of those found down sooner (FIRST_RETRY_S,
    doubling); the registry's routable view follows."""

    def __init__(self, registry: Registry, engines: EngineClient, interval_s: float):
        self.registry, self.engines, self.interval_s = registry, engines, interval_s

    def _backends(self, down_only: bool = False):
        return [(r.queue, b) for r in self.registry.routes.values() if not r.spec.external
                for b in r.queue.backends.values() if not (down_only and b.healthy)]

    async def check_once(self, down_only: bool = False) -> None:
        backends = self._backends(down_only)
        results = await asyncio.gather(*(self.engines.healthy(b.url) for _, b in backends))
        for (queue, backend), ok in zip(backends, results):
            if backend.healthy != ok:
                log.info("upstream %s is %s", backend.url, "healthy" if ok else "unhealthy")
            queue.mark(backend, ok)

    async def run(self) -> None:
        retry, since_all = FIRST_RETRY_S, 0.0
        while True:
            left = self.interval_s - since_all
            wait = min(retry, left) if self._backends(down_only=True) else left
            await asyncio.sleep(wait)
            since_all += wait
            if since_all >= self.interval_s - 1e-9:
                await self.check_once()
                retry, since_all = FIRST_RETRY_S, 0.0
            else:
                await self.check_once(down_only=True)
                retry = min(retry * 2, self.interval_s)
