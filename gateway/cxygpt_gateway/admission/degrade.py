"""Automatic degradation: entered when p95 TTFT, queue depth or the share shed stays high for a hold time; left with
hysteresis."""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from cxygpt_profiles.table import DegradeThresholds

# leaving needs the signals clearly below the entry thresholds, so the state does not flap at the edge
RECOVER_RATIO = 0.8
# the p95 is taken over at most this many recent samples: bounded work per request at any request rate
MAX_SAMPLES = 512
# a shed share is judged from this many arrivals in the window on: one refusal in three arrivals is not a trend
MIN_ARRIVALS = 20


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]


class DegradeMonitor:
    """Pure state machine over TTFT samples, queue-depth observations and arrivals (shed for capacity or not),
    on an injectable clock. `update()` is called on the request path and on reads of the state, so nothing polls.

    The shed share is the signal of an overload that admission control absorbs: rejecting the excess keeps the
    admitted requests' TTFT and the queue low, so neither of the other two signals sees it."""

    def __init__(self, thresholds: DegradeThresholds, *, window_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[bool, str], None] = lambda degraded, why: None):
        self.thresholds, self.window_s, self.clock, self.on_change = thresholds, window_s, clock, on_change
        self.degraded = False
        self.reason = ""
        self._ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)
        self._p95: float | None = None
        self._p95_stale = False
        self._queue_depth = 0
        self._arrivals: deque[tuple[float, bool]] = deque()
        self._shed = 0  # how many of _arrivals were shed
        self._above_since: float | None = None
        self._below_since: float | None = None

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.append((self.clock(), seconds * 1000.0))
        self._p95_stale = True

    def observe_queue_depth(self, depth: int) -> None:
        self._queue_depth = depth

    def observe_arrival(self, shed: bool) -> None:
        """An arrival that got a slot (False) or was refused for capacity: queue full or queue timeout (True)."""
        if len(self._arrivals) == MAX_SAMPLES:
            self._shed -= self._arrivals.popleft()[1]
        self._arrivals.append((self.clock(), shed))
        self._shed += shed

    def shed_share(self) -> float | None:
        """The share of the window's arrivals shed for capacity; None before MIN_ARRIVALS arrivals."""
        horizon = self.clock() - self.window_s
        while self._arrivals and self._arrivals[0][0] < horizon:
            self._shed -= self._arrivals.popleft()[1]
        return self._shed / len(self._arrivals) if len(self._arrivals) >= MIN_ARRIVALS else None

    def p95_ttft_ms(self) -> float | None:
        horizon = self.clock() - self.window_s
        while self._ttft and self._ttft[0][0] < horizon:
            self._ttft.popleft()
            self._p95_stale = True
        if self._p95_stale:  # sorted again only when a sample came or went
            self._p95 = p95([v for _, v in self._ttft]) if self._ttft else None
            self._p95_stale = False
        return self._p95

    def update(self) -> bool:
        now = self.clock()
        ttft = self.p95_ttft_ms()
        t = self.thresholds
        ttft_high = ttft is not None and ttft > t.p95_ttft_ms
        queue_high = self._queue_depth > t.queue_depth
        shed = self.shed_share()
        shed_high = shed is not None and shed > t.shed_share
        if not self.degraded:
            if ttft_high or queue_high or shed_high:
                self._above_since = now if self._above_since is None else self._above_since
                if now - self._above_since >= t.hold_s:
                    why = (f"p95 TTFT {ttft:.0f} ms > {t.p95_ttft_ms:g} ms" if ttft_high
                           else f"queue depth {self._queue_depth} > {t.queue_depth}" if queue_high
                           else f"{shed:.0%} of arrivals shed for capacity > {t.shed_share:.0%}")
                    self._switch(True, f"{why} for {t.hold_s:g} s")
            else:
                self._above_since = None
        else:
            calm = ((ttft is None or ttft < t.p95_ttft_ms * RECOVER_RATIO)
                    and self._queue_depth < t.queue_depth * RECOVER_RATIO
                    and (shed is None or shed < t.shed_share * RECOVER_RATIO))
            if calm:
                self._below_since = now if self._below_since is None else self._below_since
                if now - self._below_since >= t.recover_s:
                    self._switch(False, f"p95 TTFT, queue depth and share shed below {RECOVER_RATIO:.0%} of "
                                        f"thresholds for {t.recover_s:g} s")
            else:
                self._below_since = None
        return self.degraded

    def _switch(self, degraded: bool, why: str) -> None:
        self.degraded, self.reason = degraded, why
        self._above_since = self._below_since = None
        self.on_change(degraded, why)
