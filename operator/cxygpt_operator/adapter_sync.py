"""One pass of a model's adapter loop: read what each engine pod has loaded, plan, make the calls, write
status.adapters."""
from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from . import engines
from .adapters import Adapter, Engine, Failure, Memory, blocked_adapters, gate_condition, parse_adapters, plan
from .kube import Kube
from .manifests import Owner, selector_labels
from .resolve import NameClaim, check_source

ADAPTERS_STATUS = "adapters"
MAX_CALLS_PER_PASS = 8      # loads and unloads one pass makes (each bounded in time); the rest the next pass
BUSY_RECHECK_S = 2.0        # while loads are under way or engines lack adapters
IDLE_RECHECK_S = 30.0       # every adapter where it should be: a slow look for what no event shows


@dataclass(frozen=True)
class Pass:
    status: list[dict] | None       # status.adapters (None: none)
    calls: int                      # loads and unloads made
    delay: float | None
    failed: list[tuple[str, str, str]]     # (adapter, reason, message) newly Failed, for Events


def adapter_claims(body: dict) -> dict[str, NameClaim]:
    """The claims of a ModelDeployment on its adapters' names (for the index of every model's adapters): ordered by
    its creation, then uid."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    claim = NameClaim(meta.get("creationTimestamp") or "~", meta.get("uid") or "", meta.get("namespace") or "",
                      meta.get("name") or "")
    names = [a.get("name") for a in spec.get("adapters") or [] if isinstance(a, dict)]
    return {n: claim for n in names[:16] if isinstance(n, str)}


def conflicts(adapters: Sequence[Adapter], me: NameClaim, base_claims: Mapping[str, Collection[NameClaim]],
              adapter_index: Mapping[str, Collection[NameClaim]]) -> tuple[dict[str, str], dict[str, str]]:
    """(adapter name → the other model whose served name it is, → the older model whose adapter it is)."""
    bases, others = {}, {}
    for a in adapters:
        if holder := next((c for c in base_claims.get(a.name, ()) if c.uid != me.uid), None):
            bases[a.name] = holder.ref
        older = [c for c in adapter_index.get(a.name, ()) if c.uid != me.uid and c < me]
        if older:
            others[a.name] = min(older).ref
    return bases, others


def _adapters(spec: dict) -> tuple[Adapter, ...]:
    """spec.adapters, or none when they cannot be used (the reconcile loop reports the spec as InvalidSpec)."""
    try:
        found = parse_adapters(spec.get("adapters"), ((spec.get("model") or {}).get("name") or ""))
        for a in found:
            check_source("spec.adapters", a.source)
        return found
    except ValueError:
        return ()


async def sync(body: dict, *, kube: Kube, session: aiohttp.ClientSession, port: int, memory: Memory,
               base_claims: Mapping[str, Collection[NameClaim]], adapter_index: Mapping[str, Collection[NameClaim]],
               written: list[dict] | None, counted: Callable[[str, bool], None] = lambda action, ok: None) -> Pass:
    """One pass: every running engine pod of the model asked for its adapters, the plan's calls made, the status
    as the engines show it after them (written when it changed; `written` is the one this loop wrote last); each
    call's action and success go to `counted`."""
    meta, spec = body["metadata"], body.get("spec") or {}
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    adapters = _adapters(spec)
    before = written if written is not None else (body.get("status") or {}).get(ADAPTERS_STATUS)
    if not adapters:
        if before:
            await asyncio.to_thread(kube.patch_status, owner.namespace, owner.name, {ADAPTERS_STATUS: None})
        return Pass(None, 0, None, [])
    model = spec.get("model") or {}
    me = adapter_claims(body).get(adapters[0].name) or NameClaim("~", owner.uid, owner.namespace, owner.name)
    bases, others = conflicts(adapters, me, base_claims, adapter_index)
    offline = bool((model.get("cache") or {}).get("enabled")) or str(model.get("source", "")).startswith("pvc://")
    blocked = blocked_adapters(adapters, base_names=bases, other_adapters=others, offline=offline)
    pods = await asyncio.to_thread(kube.list_pods, owner.namespace, selector_labels(owner))
    published = engines.slice_urls(await asyncio.to_thread(kube.list_endpoint_slices, owner.namespace, owner.name))
    urls = {p["metadata"]["uid"]: (p["metadata"]["name"], url) for p in pods
            if (url := engines.base_url(p, port, published)) is not None}

    async def look(uid: str) -> Engine:
        name, url = urls[uid]
        try:
            return Engine(uid, name, await engines.loaded_adapters(session, url))
        except engines.EngineUnreachable:
            return Engine(uid, name, None)

    seen = list(await asyncio.gather(*(look(uid) for uid in sorted(urls))))
    memory.keep_only(seen, adapters)
    step = plan(adapters, seen, memory.failures, blocked, now=time.monotonic(), max_calls=MAX_CALLS_PER_PASS)
    made = len(step.calls)
    if step.calls:
        async def act(pod_uid: str) -> None:
            # one engine's calls in turn (its engine loop runs them one by one anyway), engines at once
            for c in (c for c in step.calls if c.pod_uid == pod_uid):
                why = await engines.call(session, urls[pod_uid][1], c.action, c.name, c.path, c.inplace)
                counted(c.action, why is None)
                if c.action == "load":
                    if why is None:
                        memory.failures.pop((c.pod_uid, c.name, c.path), None)
                    else:
                        memory.failures[(c.pod_uid, c.name, c.path)] = Failure(why, time.monotonic())
        await asyncio.gather(*(act(uid) for uid in sorted({c.pod_uid for c in step.calls})))
        seen = list(await asyncio.gather(*(look(uid) for uid in sorted(urls))))
        step = plan(adapters, seen, memory.failures, blocked, now=time.monotonic(), max_calls=MAX_CALLS_PER_PASS)
    now = datetime.datetime.now(datetime.UTC)
    for pod in pods:
        if condition := gate_condition(pod, pod["metadata"]["uid"] in step.complete, now):
            await asyncio.to_thread(kube.set_pod_condition, owner.namespace, pod["metadata"]["name"], condition)
    if step.status != before:
        await asyncio.to_thread(kube.patch_status, owner.namespace, owner.name, {ADAPTERS_STATUS: step.status})
    shown = {s["name"]: s for s in before or []}
    failed = [(s["name"], s["reason"], s["message"]) for s in step.status if s["phase"] == "Failed"
              and (shown.get(s["name"], {}).get("phase") != "Failed" or shown[s["name"]].get("reason") != s["reason"])]
    busy = not step.settled or any(s["phase"] == "Loading" for s in step.status)
    return Pass(step.status, made, BUSY_RECHECK_S if busy else IDLE_RECHECK_S, failed)
