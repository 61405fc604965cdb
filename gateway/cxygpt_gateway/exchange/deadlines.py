"""Timeouts of the relay path: every deadline of an event loop kept on one loop timer."""
from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref
from collections.abc import Callable
from typing import Literal

# the loop's timers count whole milliseconds: an entry due within one is due now
RESOLUTION_S = 0.001
# cancelled entries are swept out once they outnumber the live ones by this many
SWEEP_SLACK = 64


class Deadlines:
    """`call_at(when, callback)` and `cancel(entry)` for one event loop, on a single loop timer aimed at the
    earliest entry. Arming and cancelling a uvloop timer costs 2.2–2.5 µs, a heap entry ~0.3 µs (measured,
    BENCHMARKS.md), and nearly every deadline is cancelled long before it is due (a request ends in milliseconds,
    its timeouts are seconds): a cancelled entry is only marked, and dropped when it comes to the top or when
    the cancelled ones outnumber the live ones."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._heap: list[list] = []  # [when, sequence, callback or None once cancelled or called]
        self._sequence = itertools.count()
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        return self._live

    def call_at(self, when: float, callback: Callable[[], None]) -> list:
        """Call `callback` (which must not raise) at loop time `when`; the entry is what `cancel` takes."""
        entry = [when, next(self._sequence), callback]
        heapq.heappush(self._heap, entry)
        self._live += 1
        if when < self._timer_at:
            self._aim(when)
        return entry

    def cancel(self, entry: list) -> None:
        """Idempotent; too late once the callback was called."""
        if entry[2] is None:
            return
        entry[2] = None
        self._live -= 1
        if len(self._heap) > SWEEP_SLACK + 2 * self._live:
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)

    def _aim(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self.loop.call_at(when, self._fire), when

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        heap, due = self._heap, self.loop.time() + RESOLUTION_S
        try:
            while heap and (heap[0][2] is None or heap[0][0] <= due):
                entry = heapq.heappop(heap)
                callback, entry[2] = entry[2], None
                if callback is not None:
                    self._live -= 1
                    callback()
        finally:
            if heap:  # the top may be a cancelled entry: the timer then fires early, finds nothing, aims again
                self._aim(heap[0][0])


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = weakref.WeakKeyDictionary()


def deadlines_of(loop: asyncio.AbstractEventLoop) -> Deadlines:
    found = _BY_LOOP.get(loop)
    if found is None:
        found = _BY_LOOP[loop] = Deadlines(loop)
    return found


class Deadline:
    """`with Deadline(deadlines, seconds):` — like `asyncio.timeout`, for the current task of a known loop: a
    region that ends in TimeoutError when `seconds` pass. asyncio.timeout asks for the running loop twice, and
    every such ask is a getpid() system call (CPython 3.11's fork check), expensive where system calls are; and
    it arms a loop timer of its own (measured, BENCHMARKS.md)."""
    __slots__ = ("deadlines", "seconds", "task", "_entry", "_fired", "_cancelling")

    def __init__(self, deadlines: Deadlines, seconds: float):
        self.deadlines, self.seconds = deadlines, seconds
        self._fired = False

    def __enter__(self) -> Deadline:
        loop = self.deadlines.loop
        self.task: asyncio.Task = asyncio.current_task(loop)  # type: ignore[assignment]  # inside a task
        self._cancelling = self.task.cancelling()
        self._entry = self.deadlines.call_at(loop.time() + self.seconds, self._fire)
        return self

    def _fire(self) -> None:
        self._fired = True
        self.task.cancel()

    def __exit__(self, kind, error, tb) -> Literal[False]:
        self.deadlines.cancel(self._entry)
        # our own cancel (and no one else's) becomes the timeout; any other cancel goes on
        if self._fired and kind is asyncio.CancelledError and self.task.uncancel() <= self._cancelling:
            raise TimeoutError() from None
        return False
