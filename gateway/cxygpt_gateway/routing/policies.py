"""Which replica a request goes to (pure): the longest cached prefix with bounded loads, least load, or round
robin; a request for a LoRA adapter only to replicas that have it loaded, by prefix where it is active first."""
from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, cast

from .index import CHUNKS_PER_REPLICA, PrefixIndex
from .keys import RouteKey
from .ring import Ring

Policy = Literal["prefix", "least-load", "round-robin"]
POLICIES: tuple[Policy, ...] = ("prefix", "least-load", "round-robin")
DEFAULT_EPSILON = 0.25
MAX_EPSILON = 4.0
# how a request reached its replica (the routed metric's `choice`)
AFFINITY, SPILL, OTHER = "affinity", "spill", "other"


class Replica(Protocol):
    """What routing reads of a replica: this gateway's requests in flight on it, and the engine's own load. Its
    load is `outstanding + others`: the slots are the engine's, whoever fills them."""
    url: str
    outstanding: int
    healthy: bool
    others: int         # requests the engine holds that are not this gateway's (as last read), 0 when unknown
    waiting: int        # the engine's waiting requests (vllm:num_requests_waiting), 0 when unknown
    kv_usage: float     # the engine's KV-cache usage 0..1 (vllm:kv_cache_usage_perc), 0 when unknown
    adapters: frozenset[str] | None  # the LoRA adapters loaded there (its /v1/models), None when never read
    lora_active: frozenset[str]      # adapters with requests running or waiting (vllm:lora_requests_info)
    max_lora: int                    # adapters one batch may run (its max_lora label), 0 when unknown
    own_adapters: dict[str, int]     # this gateway's requests in flight there, per adapter


R = TypeVar("R", bound=Replica)


@dataclass(frozen=True)
class Routing:
    policy: Policy = "least-load"
    epsilon: float = DEFAULT_EPSILON


DEFAULT_ROUTING = Routing()


def resolve(policy: str | None, epsilon: float | None, mode: str) -> Routing:
    """The routing in force: an unset policy is `prefix` for a multi-user model, `least-load` for one user."""
    chosen = cast(Policy, policy or ("prefix" if mode == "multi" else "least-load"))
    return Routing(chosen, DEFAULT_EPSILON if epsilon is None else epsilon)


def load(r: Replica) -> int:
    """The requests on the replica: this gateway's in flight and the others' it last read from the engine."""
    return r.outstanding + r.others


def load_rank(r: Replica) -> tuple[int, int, float]:
    """Fewest in flight, then fewest waiting in the engine, then the lowest KV-cache usage."""
    return load(r), r.waiting, r.kv_usage


def serves(r: Replica, adapter: str | None) -> bool:
    """Whether the replica can take a request for `adapter` (None: the base model): it has it loaded, or its
    adapters were never read (the engine says no if it has not)."""
    return adapter is None or r.adapters is None or adapter in r.adapters


def adapter_rank(r: Replica, adapter: str) -> int:
    """0: the adapter is active there (running or waiting in the engine, or this gateway's requests of it are in
    flight there): no wait for an adapter slot; 1: a free adapter slot (fewer active than max_lora, or max_lora
    unknown); 2: every slot taken by other adapters, so vLLM's scheduler holds the request until one of them has no
    request running (the LoRA-affinity scorer of the Gateway API Inference Extension ranks alike)."""
    own = {name for name, n in r.own_adapters.items() if n}
    if adapter in own or adapter in r.lora_active:
        return 0
    return 1 if not r.max_lora or len(own | r.lora_active) < r.max_lora else 2


def load_bound(epsilon: float, in_flight: int, replicas: int) -> int:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): a replica takes the request
    only if it then holds at most ⌈(1 + ε) × the mean in flight⌉, the mean counting the request being placed.
    The least loaded replica always fits, so the bound never leaves a request without a place."""
    return math.ceil((1 + epsilon) * (in_flight + 1) / replicas - 1e-9)


def _prefix(routing: Routing, healthy: list[R], key: RouteKey, ring: Ring,
            index: PrefixIndex | None = None, adapter: str | None = None) -> tuple[list[R], R]:
    """(the order, the first choice). Within the load bound: the replicas that hold more of the request's prefix
    than its home key covers (as far as this gateway sent it there: a conversation or a document the load bound
    sent elsewhere before), the longest first, then the rest, each in the ring's order from the key's home; beyond
    the bound, by load. The first choice: the one holding the longest part, or the home (the first healthy replica
    on the ring, alike in every gateway). What every request of a home shares (a tenant's system prompt) moves
    nothing: the home keeps its requests together, and gateways that have seen different requests still agree.
    For an adapter, the replicas where it is active come first, then those with a free adapter slot (adapter_rank),
    each in that order: a request that would wait for an adapter slot loses more than a cached prefix saves; and
    where it is active the load bound does not hold (only the replica's slots): spilling it to a replica where it
    is not would make a third adapter wait there for one of the batch's."""
    by_url = {r.url: r for r in healthy}
    walk = [by_url[url] for url in ring.walk(key.home) if url in by_url]
    if len(walk) < len(healthy):  # a replica the ring was not built with: after the others
        on_ring = set(ring.urls)
        walk += [r for r in healthy if r.url not in on_ring]
    if index is not None and len(key.chain) > key.identity:
        held = {url: depth for url, depth in index.depths(key.chain, by_url).items() if depth > key.identity}
        if held:  # the deepest first, stable: equals keep the ring's order
            walk.sort(key=lambda r: -held.get(r.url, 0))
    ranks: dict[str, int] = {}
    if adapter is not None:
        ranks = {r.url: adapter_rank(r, adapter) for r in walk}
        walk.sort(key=lambda r: ranks[r.url])
    # the bound balances this gateway's own requests: another gateway's, read up to an interval ago, would move a
    # conversation off its home at low load for a request that has ended (every gateway balancing its share
    # balances the sum); the engine's slots count everybody's (pick)
    bound = load_bound(routing.epsilon, sum(r.outstanding for r in healthy), len(healthy))
    within = [r for r in walk if r.outstanding < bound or ranks.get(r.url) == 0]
    return within + sorted((r for r in walk if r not in within), key=load_rank), walk[0]


def order(routing: Routing, replicas: Collection[R], key: RouteKey | None = None, *, ring: Ring | None = None,
          turn: int = 0, index: PrefixIndex | None = None, adapter: str | None = None) -> list[R]:
    """The healthy replicas in the order the policy offers them the request (the queue takes the first one with
    a free slot; a failover the next):
    - `prefix`: from the key's home along the hash ring, skipping (to the end, by load) those that would go
      above the load bound; a request without a key is ordered by load;
    - `least-load`: by load_rank; equals keep the replicas' given order;
    - `round-robin`: the replicas' given order, rotated by `turn`.
    `ring` is the ring of the replicas' URLs (built here when not given), `index` where prefixes were sent. For
    an `adapter`, only the replicas that serve it, and by prefix (with a key) those where it is active first."""
    healthy = [r for r in replicas if r.healthy and serves(r, adapter)]
    if not healthy:
        return []
    if routing.policy == "round-robin":
        at = turn % len(healthy)
        return healthy[at:] + healthy[:at]
    if routing.policy == "prefix" and key is not None:
        return _prefix(routing, healthy, key, ring or Ring(r.url for r in replicas), index, adapter)[0]
    return sorted(healthy, key=load_rank)


class Router:
    """A model's routing with what it keeps between requests: the ring of its replicas, where it sent which
    prefixes (prefix) and round robin's turn. `pick` is the first replica of `order` with a free slot, and how it
    got there; `placed` records where a request went."""
    __slots__ = ("routing", "ring", "turn", "index")

    def __init__(self, routing: Routing = DEFAULT_ROUTING, urls: Iterable[str] = ()):
        self.routing, self.turn = routing, 0
        urls = sorted(set(urls))
        self.ring = Ring(urls) if routing.policy == "prefix" else None
        self.index = PrefixIndex(CHUNKS_PER_REPLICA * max(len(urls), 1)) if self.ring is not None else None

    @property
    def uses_key(self) -> bool:
        return self.ring is not None

    def set_replicas(self, urls: Iterable[str]) -> None:
        if self.ring is not None and self.index is not None:
            urls = sorted(set(urls))
            if tuple(urls) != self.ring.urls:
                for gone in set(self.ring.urls) - set(urls):
                    self.index.forget(gone)
                self.ring = Ring(urls)
                self.index.capacity = CHUNKS_PER_REPLICA * max(len(urls), 1)

    def placed(self, key: RouteKey | None, url: str) -> None:
        """A request of `key` went to `url`: its prefix will be cached there."""
        if key is not None and key.chain and self.index is not None:
            self.index.record(key.chain, url)

    def pick(self, key: RouteKey | None, replicas: Collection[R], limit: int,
             exclude: tuple = (), share: int = 0, adapter: str | None = None) -> tuple[R | None, str]:
        """The first healthy replica in the policy's order with a free slot, not in `exclude`; (None, "") when
        none has one. A slot is free while the replica's load is under `limit` (prefix: its key's home within
        the load bound, under `limit` + ⌊ε × limit⌋), or while this gateway's own requests there are fewer than
        `share` (its part of the engine's slots, which it may always use: a freed slot goes first to the gateway
        that freed it, the others learn of it at their next read, so without a share a gateway whose line fell
        behind would stay behind). The choice: `affinity` when it is the policy's first choice, `spill`
        when the load bound or a full replica moved the request on, `other` for a failover (`exclude` given).
        For an `adapter`, only the replicas that serve it (`serves`)."""
        home_limit = limit
        if adapter is not None:
            replicas = [r for r in replicas if serves(r, adapter)]
        if self.ring is None or key is None:
            if self.routing.policy != "round-robin":
                return self._least_load(replicas, limit, exclude, share)
            ranked = order(self.routing, replicas, turn=self.turn)
            first = ranked[0] if ranked else None
        else:
            healthy = [r for r in replicas if r.healthy]
            if not healthy:
                return None, ""
            ranked, first = _prefix(self.routing, healthy, key, self.ring, self.index, adapter)
            if adapter is not None and not exclude:
                # a replica whose adapter slots other adapters hold would make the request wait there until one of
                # them has no request running (under load: long); it waits in the queue for a replica where it runs
                # or can run instead (measured in BENCHMARKS.md, "LoRA adapters"). A failover takes any replica.
                ranked = [r for r in ranked if adapter_rank(r, adapter) < 2] or ranked
            if ranked[0] is first:
                # the first choice, within the load bound, may hold ⌊ε × limit⌋ more than its slots: those few
                # wait in its engine, where their prefix is cached, rather than a free replica computing it all
                # again (measured in BENCHMARKS.md, "Fleet")
                home_limit += math.floor(self.routing.epsilon * limit)
        for at, r in enumerate(ranked):
            if (load(r) < (home_limit if at == 0 else limit) or r.outstanding < share) and r not in exclude:
                if self.routing.policy == "round-robin":
                    self.turn += at + 1
                return r, OTHER if exclude else AFFINITY if r is first else SPILL
        return None, ""

    @staticmethod
    def _least_load(replicas: Collection[R], limit: int, exclude: tuple,
                    share: int) -> tuple[R | None, str]:
        """order()'s first free replica for least-load, in one pass and no list (the relay's hot path)."""
        best, fewest = None, 0
        for r in replicas:
            n = r.outstanding + r.others
            if n >= limit and r.outstanding >= share or best is not None and n > fewest or not r.healthy \
                    or r in exclude:
                continue
            if best is None or n < fewest or r.waiting < best.waiting or r.waiting == best.waiting \
                    and r.kv_usage < best.kv_usage:
                best, fewest = r, n
        if best is None:
            return None, ""
        return best, OTHER if exclude else AFFINITY
