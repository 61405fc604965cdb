"""Scale from zero: a request for a model at zero replicas wakes it at once, through the discovery source (the
ModelDeployment's scale subresource); one wake per model in flight, and none again within a few seconds."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .base import ScaleTarget

log = logging.getLogger("cxygpt.gateway")
# how soon the same gateway wakes a model again while it still looks asleep (the watch may lag the write)
REPEAT_S = 10.0


class Waker:
    def __init__(self, discovery, *, clock: Callable[[], float] = time.monotonic,
                 on_result: Callable[[str, str], None] = lambda model, result: None):
        self.discovery, self.clock, self.on_result = discovery, clock, on_result
        self.sent: dict[tuple[str, str], float] = {}
        self.tasks: set[asyncio.Task] = set()

    @property
    def can_wake(self) -> bool:
        return hasattr(self.discovery, "wake")

    def wake(self, model: str, target: ScaleTarget | None) -> bool:
        """Asks for 0 -> 1 when `target` is at zero and was not asked for lately; never waits. Whether it asked."""
        if target is None or target.replicas != 0 or not self.can_wake:
            return False
        key, now = (target.namespace, target.name), self.clock()
        if now - self.sent.get(key, float("-inf")) < REPEAT_S:
            return False
        self.sent[key] = now
        task = asyncio.create_task(self._wake(model, target))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _wake(self, model: str, target: ScaleTarget) -> None:
        result = await self.discovery.wake(target)
        kind = result.split(":", 1)[0]
        self.on_result(model, kind)
        if kind == "failed":  # tried again by a request REPEAT_S later
            log.warning("model %s: waking %s/%s from zero failed: %s", model, target.namespace, target.name, result)
        else:
            log.info("model %s: %s/%s %s", model, target.namespace, target.name,
                     "woken from zero (spec.replicas 0 -> 1)" if kind == "woken" else "already awake")

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
