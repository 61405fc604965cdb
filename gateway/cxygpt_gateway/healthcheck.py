"""Health checking of static backends: /health of every replica each interval marks it routable or not."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .registry import Registry
    from .upstream import Upstream

log = logging.getLogger("cxygpt.gateway")


class HealthChecker:
    """Static backends: /health of every replica each interval; the registry's routable view follows."""

    def __init__(self, registry: "Registry", upstream: "Upstream", interval_s: float):
        self.registry, self.upstream, self.interval_s = registry, upstream, interval_s

    async def check_once(self) -> None:
        backends = [(r.queue, b) for r in self.registry.routes.values() if not r.spec.external
                    for b in r.queue.backends.values()]
        results = await asyncio.gather(*(self.upstream.healthy(b.url) for _, b in backends))
        for (queue, backend), ok in zip(backends, results):
            if backend.healthy != ok:
                log.info("upstream %s is %s", backend.url, "healthy" if ok else "unhealthy")
            queue.mark(backend, ok)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_once()
