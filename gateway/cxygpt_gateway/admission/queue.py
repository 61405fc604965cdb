"""Bounded per-model wait queue in front of backends with a concurrency cap each, offered in the routing's order (a
LoRA adapter's requests, in the same line, only to the replicas that have it loaded)."""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Iterable

from ..errors import GatewayError
from ..routing.keys import RouteKey
from ..routing.policies import AFFINITY, DEFAULT_ROUTING, SPILL, Router, Routing, serves

# A slot that frees on a replica which is not the head of the line's first choice goes to the first of the next
# LOOKAHEAD waiters (of the head's priority) whose first choice it is: their prefixes are cached there, and a full
# fleet would otherwise hand every freed slot to whoever is first and lose the affinity routing built. The head is
# passed over at most MAX_PASSES times, so nobody waits more than that many freed slots longer than strict FIFO.
LOOKAHEAD = 8
MAX_PASSES = 4


class Backend:
    """One upstream replica: the requests it is serving for this gateway, and the engine's own load as last read
    from its /metrics (0 when unknown): what others hold there, its waiting requests and KV-cache usage; and its
    LoRA adapters: loaded (its /v1/models; None until read), active and the batch's limit (vllm:lora_requests_info),
    this gateway's requests in flight per adapter."""
    __slots__ = ("url", "outstanding", "healthy", "others", "waiting", "kv_usage", "adapters", "lora_active",
                 "max_lora", "own_adapters")

    def __init__(self, url: str):
        self.url, self.outstanding, self.healthy = url, 0, True
        self.others, self.waiting, self.kv_usage = 0, 0, 0.0
        self.adapters: frozenset[str] | None = None
        self.lora_active: frozenset[str] = frozenset()
        self.max_lora = 0
        self.own_adapters: dict[str, int] = {}

    def __repr__(self):
        return f"Backend({self.url!r}, outstanding={self.outstanding}, healthy={self.healthy})"


class Slot:
    """The right to send one request to `backend`; release it exactly once (idempotent). `key` is the request's
    routing key (a failover goes on in its order), `choice` how the routing placed it, `adapter` the LoRA adapter it
    asks for (None: the base model)."""
    __slots__ = ("queue", "backend", "started", "queued_s", "key", "choice", "adapter", "_released")

    def __init__(self, queue: ModelQueue, backend: Backend, started: float, queued_s: float,
                 key: RouteKey | None = None, choice: str = "affinity", adapter: str | None = None):
        self.queue, self.backend, self.started, self.queued_s = queue, backend, started, queued_s
        self.key, self.choice, self.adapter, self._released = key, choice, adapter, False

    def release(self, served: bool = True) -> None:
        """`served=False`: the replica never got the request, so its time says nothing of the service rate."""
        if not self._released:
            self._released = True
            self.queue._release(self, served)


class _Waiter:
    __slots__ = ("future", "key", "adapter", "cancelled", "passes")

    def __init__(self, future: asyncio.Future, key: RouteKey | None, adapter: str | None = None):
        self.future, self.key, self.adapter, self.cancelled, self.passes = future, key, adapter, False, 0

    @property
    def gone(self) -> bool:
        """Left the line (cancelled), or was handed a slot from behind the head (still in the heap until it
        reaches the top)."""
        return self.cancelled or self.future.done()


class ModelQueue:
    """FIFO within a priority (lower first); waiting is bounded by `queue_size` and overflow fails at once;
    a freed slot is handed straight to the next waiter (futures, no polling). A request takes the first replica
    in its routing order that has a free slot; the head of the line, when a slot frees, its best free one, unless
    that is not its first choice and a waiter close behind has it first (LOOKAHEAD, MAX_PASSES). A waiter for a LoRA
    adapter whose replicas are all full holds up nobody: the first waiter behind it that can go, goes."""

    def __init__(self, *, queue_size: int, max_concurrency: int, routing: Routing = DEFAULT_ROUTING,
                 clock: Callable[[], float] = time.monotonic, gateways: int = 1):
        self.queue_size, self.max_concurrency, self.clock = queue_size, max_concurrency, clock
        self.gateways = gateways  # the gateway replicas that share the engines' slots
        self.backends: dict[str, Backend] = {}
        self.router = Router(routing)
        self._heap: list[tuple[int, int, _Waiter]] = []
        self._seq = itertools.count()
        self.waiting = 0
        self.adapter_waiting: dict[str, int] = {}  # waiters per adapter (a removed adapter drains: registry)
        self.service_s_ewma = 1.0  # seed for Retry-After before any request finished
        self.hold_empty = False    # with no routable replica, wait in line (a cold start) instead of a 503

    def set_backends(self, urls: Iterable[str]) -> None:
        """Replace the replica set; requests in flight on a removed replica finish and release normally."""
        urls = list(dict.fromkeys(urls))
        self.backends = {u: self.backends.get(u) or Backend(u) for u in urls}
        self.router.set_replicas(urls)
        self.dispatch()

    def set_routing(self, routing: Routing) -> None:
        if routing != self.router.routing:
            self.router = Router(routing, self.backends)
            self.dispatch()

    def set_limits(self, *, queue_size: int, max_concurrency: int) -> None:
        self.queue_size, self.max_concurrency = queue_size, max_concurrency
        self.dispatch()

    def set_gateways(self, gateways: int) -> None:
        if gateways != self.gateways:
            self.gateways = gateways
            self.dispatch()  # a larger share may let a waiter go now

    @property
    def share(self) -> int:
        """This gateway's part of each replica's slots, which it may always use: ⌈max_concurrency / gateways⌉."""
        return -(-self.max_concurrency // self.gateways)

    @property
    def in_flight(self) -> int:
        return sum(b.outstanding for b in self.backends.values())

    def mark(self, backend: Backend, healthy: bool) -> None:
        """A replica's health as checked; one that is back (or a new one) serves those waiting at once."""
        backend.healthy = healthy
        if healthy:
            self.dispatch()

    def routable(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.healthy]

    def serving(self, adapter: str) -> list[Backend]:
        """The healthy replicas that may take a request for `adapter`: it is loaded there, or their adapters were
        never read (as routing takes them: policies.serves)."""
        return [b for b in self.backends.values() if b.healthy and serves(b, adapter)]

    def adapter_requests(self, adapter: str) -> int:
        """This gateway's requests of `adapter` in flight or waiting in line."""
        return self.adapter_waiting.get(adapter, 0) + sum(b.own_adapters.get(adapter, 0)
                                                          for b in self.backends.values())

    def take_other(self, tried: tuple[Backend, ...], queued_s: float = 0.0,
                   key: RouteKey | None = None, adapter: str | None = None) -> Slot | None:
        """For a request none of which reached the replicas it `tried`: a free slot on the next one in its order,
        ahead of those waiting (it was admitted before them), or None."""
        backend, choice = self.router.pick(key, self.backends.values(), self.max_concurrency, tried, self.share,
                                           adapter)
        if backend is None:
            return None
        self._taken(key, backend, adapter)
        return Slot(self, backend, self.clock(), queued_s, key, choice, adapter)

    def _taken(self, key: RouteKey | None, backend: Backend, adapter: str | None) -> None:
        backend.outstanding += 1
        if adapter is not None:
            backend.own_adapters[adapter] = backend.own_adapters.get(adapter, 0) + 1
        self.router.placed(key, backend.url)

    def retry_after(self) -> float:
        """Seconds until a place is likely free: the queue ahead drained at the observed service rate."""
        capacity = max(len(self.routable()) * self.max_concurrency, 1)
        return max(1.0, self.service_s_ewma * (self.waiting + 1) / capacity)

    def try_take(self, key: RouteKey | None = None, adapter: str | None = None) -> Slot | None:
        """A slot now; None when the caller must wait in line; 503 when nothing is routable or the line is full."""
        if not self.waiting:  # never overtake those waiting
            backend, choice = self.router.pick(key, self.backends.values(), self.max_concurrency, share=self.share,
                                               adapter=adapter)
            if backend is not None:
                self._taken(key, backend, adapter)
                return Slot(self, backend, self.clock(), 0.0, key, choice, adapter)
        if not self.routable() and not self.hold_empty:
            raise GatewayError(503, "no ready replica for this model right now", code="no_ready_replica",
                               reason="no_ready_replica", retry_after=5)
        if self.waiting >= self.queue_size:
            raise GatewayError(503, f"queue full ({self.waiting} waiting, {self.in_flight} in flight); retry later",
                               code="queue_full", reason="queue_full", retry_after=self.retry_after())
        return None

    async def wait(self, priority: int = 0, key: RouteKey | None = None, adapter: str | None = None) -> Slot:
        """Wait in line for the next free slot. The caller bounds the wait (asyncio.timeout); a cancelled wait
        leaves the line."""
        arrived = self.clock()
        waiter = _Waiter(asyncio.get_running_loop().create_future(), key, adapter)
        heapq.heappush(self._heap, (priority, next(self._seq), waiter))
        self.waiting += 1
        if adapter is not None:
            self.adapter_waiting[adapter] = self.adapter_waiting.get(adapter, 0) + 1
        if self.adapter_waiting:
            self.dispatch()  # those ahead may be waiting for their adapters' replicas while this one's has room
        try:
            backend, choice = await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # handed a slot in the same instant the wait was cancelled: give it on
                slot = Slot(self, waiter.future.result()[0], arrived, 0.0, adapter=adapter)
                slot.release(served=False)
            else:
                waiter.cancelled = True
                self.waiting -= 1
            raise
        finally:
            if adapter is not None:
                left = self.adapter_waiting[adapter] - 1
                if left:
                    self.adapter_waiting[adapter] = left
                else:
                    del self.adapter_waiting[adapter]
        now = self.clock()
        return Slot(self, backend, now, now - arrived, key, choice, adapter)

    def _release(self, slot: Slot, served: bool) -> None:
        backend = slot.backend
        backend.outstanding -= 1
        if slot.adapter is not None:
            left = backend.own_adapters[slot.adapter] - 1
            if left:
                backend.own_adapters[slot.adapter] = left
            else:
                del backend.own_adapters[slot.adapter]
        if served:
            self.service_s_ewma += 0.2 * ((self.clock() - slot.started) - self.service_s_ewma)
        self.dispatch()

    def close(self, make_error: Callable[[], Exception]) -> None:
        """The model is gone, or lost its route: everyone waiting gets an answer now (`make_error()` each), not
        at the end of their queue timeout."""
        while self._heap:
            _, _, waiter = heapq.heappop(self._heap)
            if not waiter.cancelled and not waiter.future.done():
                self.waiting -= 1
                waiter.future.set_exception(make_error())

    def dispatch(self) -> None:
        """The head of the line takes its best free replica, until none is free. Every healthy replica is in the
        order of every request for the base model, so when such a head finds no free slot nobody behind it would; a
        waiter behind it overtakes only to take a replica that is its own first choice and not the head's. A head
        asking for an adapter sees only the replicas that have it: when none of them is free, the first waiter
        behind it that has a free replica takes it (_first_placeable)."""
        while self._heap:
            priority, _, waiter = self._heap[0]
            if waiter.gone:
                heapq.heappop(self._heap)
                continue  # left the line; a cancelled future whose task has not run yet is counted out by wait()
            backend, choice = self.router.pick(waiter.key, self.backends.values(), self.max_concurrency,
                                               share=self.share, adapter=waiter.adapter)
            taker = waiter
            if backend is None:
                if waiter.adapter is None or not (placed := self._first_placeable()):
                    return
                taker, backend, choice = placed
            elif choice == SPILL and waiter.passes < MAX_PASSES:
                taker = self._first_at_home(backend, priority) or waiter
                if taker is not waiter:
                    waiter.passes += 1
                    choice = AFFINITY
            if taker is waiter:
                heapq.heappop(self._heap)
            self.waiting -= 1
            self._taken(taker.key, backend, taker.adapter)
            taker.future.set_result((backend, choice))

    def _first_placeable(self) -> tuple[_Waiter, Backend, str] | None:
        """Behind a head that waits for its adapter's replicas: the first waiter, in the line's order, with a free
        replica in its own order. One try per adapter (and one for the base model, after which every replica is
        full): a line of n waiters costs at most n picks."""
        tried: set[str | None] = set()
        for _, _, w in sorted(self._heap)[1:]:
            if w.gone or w.adapter in tried:
                continue
            backend, choice = self.router.pick(w.key, self.backends.values(), self.max_concurrency,
                                               share=self.share, adapter=w.adapter)
            if backend is not None:
                return w, backend, choice
            if w.adapter is None:
                return None
            tried.add(w.adapter)
        return None

    def _first_at_home(self, backend: Backend, priority: int) -> _Waiter | None:
        """Of the LOOKAHEAD waiters behind the head with its priority, the first whose first choice is `backend`."""
        for p, _, w in heapq.nsmallest(LOOKAHEAD + 1, self._heap)[1:]:
            if p != priority:
                break
            if w.key is None or w.gone:
                continue
            if self.router.pick(w.key, self.backends.values(), self.max_concurrency, share=self.share,
                                adapter=w.adapter) == (backend, AFFINITY):
                return w
        return None
