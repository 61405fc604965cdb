"""Health checking of static backends: /health of every replica each interval marks it routable or not."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..routing.registry import Registry
    from .client import EngineClient

log = logging.getLogger("cxygpt.gateway")


class HealthChecker:
    """Static backends: /health of every replica each interval; the registry's routable view follows."""

    def __init__(self, registry: Registry, engines: EngineClient, interval_s: float):
        self.registry, self.engines, self.interval_s = registry, engines, interval_s

    async def check_once(self) -> None:
        backends = [(r.queue, b) for r in self.registry.routes.values() if not r.spec.external
                    for b in r.queue.backends.values()]
        results = await asyncio.gather(*(self.engines.healthy(b.url) for _, b in backends))
        for (queue, backend), ok in zip(backends, results):
            if backend.healthy != ok:
                log.info("upstream %s is %s", backend.url, "healthy" if ok else "unhealthy")
            queue.mark(backend, ok)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_once()
