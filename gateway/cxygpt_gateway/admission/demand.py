"""Per-model demand for the autoscaler: requests in flight + waiting, averaged over a sliding window of samples."""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable

# Samples per window: a 10 s window is sampled every 0.25 s (40 samples a model), never more often than that.
SAMPLES_PER_WINDOW = 40
MIN_SAMPLE_PERIOD_S = 0.25
# A request that came and went between two samples still says the model was asked for within the window.
ARRIVAL_FLOOR = 0.01


def sample_period(window_s: float) -> float:
    return max(window_s / SAMPLES_PER_WINDOW, MIN_SAMPLE_PERIOD_S)


class DemandWindow:
    """The mean of the in-flight + waiting samples of the last `window_s` (pure, on an injectable clock): the
    average number of requests the model held over the window, so steady traffic of short requests counts by its
    concurrency, as the replicas feel it. Any arrival within the window keeps it above zero."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.window_s, self.clock = window_s, clock
        self.samples: deque[tuple[float, float]] = deque()
        self.last_arrival: float | None = None

    def arrived(self) -> None:
        self.last_arrival = self.clock()

    def sample(self, level: float) -> None:
        now = self.clock()
        self.samples.append((now, level))
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self.samples and self.samples[0][0] <= now - self.window_s:
            self.samples.popleft()

    def value(self) -> float:
        now = self.clock()
        self._expire(now)
        mean = sum(level for _, level in self.samples) / len(self.samples) if self.samples else 0.0
        if self.last_arrival is not None and self.last_arrival > now - self.window_s:
            mean = max(mean, ARRIVAL_FLOOR)
        return mean


async def sample_demand(routes: Callable[[], Iterable], period_s: float) -> None:
    """Samples every route's queue (in flight + waiting) into its demand window, until cancelled."""
    while True:
        for route in list(routes()):
            route.demand.sample(route.queue.in_flight + route.queue.waiting)
        await asyncio.sleep(period_s)
