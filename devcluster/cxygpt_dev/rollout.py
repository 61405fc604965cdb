"""The Deployment controller's decisions, pure: pods × desired state → which pods to start and which to terminate."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PodView:
    name: str
    template_hash: str
    ready: bool
    terminating: bool = False


@dataclass(frozen=True)
class Strategy:
    recreate: bool = False
    max_surge: int = 1
    max_unavailable: int = 0


@dataclass(frozen=True)
class Step:
    start: int = 0  # new pods (of the current template) to create
    terminate: tuple[str, ...] = ()  # pods to drain and stop
    refused: int = 0  # pods the controller wanted but the capacity refused


def _resolve(value, desired: int, round_up: bool, default: str) -> int:
    """An int or a percentage of the desired replicas (surge rounds up, unavailable down, as Kubernetes does)."""
    value = default if value is None else value
    if isinstance(value, str) and value.endswith("%"):
        share = desired * int(value[:-1]) / 100
        return math.ceil(share) if round_up else math.floor(share)
    return int(value)


def strategy_of(deployment_spec: dict) -> Strategy:
    strategy = deployment_spec.get("strategy") or {}
    if strategy.get("type") == "Recreate":
        return Strategy(recreate=True, max_surge=0, max_unavailable=0)
    desired = deployment_spec.get("replicas", 1)
    rolling = strategy.get("rollingUpdate") or {}
    surge = _resolve(rolling.get("maxSurge"), desired, True, "25%")
    unavailable = _resolve(rolling.get("maxUnavailable"), desired, False, "25%")
    if surge == 0 and unavailable == 0:  # the API server refuses this; a rollout could never move
        surge = 1
    return Strategy(max_surge=surge, max_unavailable=unavailable)


def _unready_first(pods: list[PodView]) -> list[PodView]:
    """Which pods go first: not-ready ones (they serve nothing), then the newest names last in, first out."""
    return sorted(pods, key=lambda p: (p.ready, p.name))


def rollout_step(pods: list[PodView], desired: int, template_hash: str, strategy: Strategy,
                 capacity: int) -> Step:
    """One reconcile of a Deployment: scale-down drains extra pods, scale-up adds pods, a changed template rolls
    out within maxSurge/maxUnavailable (with 1/0: a new pod, Ready, then one old pod terminated). `capacity` is
    how many more pods this machine may run."""
    live = [p for p in pods if not p.terminating]
    new = [p for p in live if p.template_hash == template_hash]
    old = [p for p in live if p.template_hash != template_hash]
    if strategy.recreate:
        if old:
            return Step(terminate=tuple(p.name for p in old))
        if any(p.terminating for p in pods):
            return Step()  # Recreate starts the new pods only once every old one is gone
        wanted = max(0, desired - len(new))
        return Step(start=min(wanted, capacity), refused=max(0, wanted - capacity),
                    terminate=tuple(p.name for p in _unready_first(new)[:max(0, len(new) - desired)]))
    # new pods beyond `desired` (a scale-down) go, not-ready ones first
    extra = _unready_first(new)[:max(0, len(new) - desired)]
    kept = [p for p in new if p not in extra]
    # old pods that are not ready count against nobody's availability: they go at once; ready ones only while
    # enough pods stay ready (maxUnavailable)
    terminate = [p for p in old if not p.ready]
    ready_old = [p for p in old if p.ready]
    available = sum(p.ready for p in kept) + len(ready_old)
    removable = max(0, available - (desired - strategy.max_unavailable))
    terminate += ready_old[:removable] + extra
    remaining = len(live) - len(terminate)
    wanted = max(0, min(desired - len(kept), desired + strategy.max_surge - remaining))
    return Step(start=min(wanted, capacity), terminate=tuple(p.name for p in terminate),
                refused=max(0, wanted - capacity))
