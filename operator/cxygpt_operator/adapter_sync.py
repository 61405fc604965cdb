"""One pass of a model's adapter loop: read what each engine pod has loaded, plan, make the calls, write
status.adapters."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import aiohttp
from kubernetes.client.rest import ApiException

from . import adapter_cache, engines
from .adapters import (
    Adapter,
    Blocked,
    Engine,
    Failure,
    Memory,
    blocked_adapters,
    gate_condition,
    loaded_summary,
    parse_adapters,
    plan,
)
from .cache import cache_key, parse_cache
from .kube import Kube, api_message
from .manifests import Owner, selector_labels
from .resolve import NameClaim, check_source

ADAPTERS_STATUS = "adapters"
LOADED_STATUS = "adaptersLoaded"
MAX_CALLS_PER_PASS = 8      # loads and unloads one pass makes (each bounded in time); the rest the next pass
BUSY_RECHECK_S = 2.0        # while loads are under way or engines lack adapters
IDLE_RECHECK_S = 30.0       # every adapter where it should be: a slow look for what no event shows
REFUSED = (400, 403, 413, 422)  # the API server's refusals that asking again will not change (a quota, a policy)


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


async def downloads(kube: Kube, owner: Owner, spec: dict, adapters: Sequence[Adapter], loader: adapter_cache.Loader
                    ) -> tuple[Sequence[Adapter], dict[str, Blocked], dict[str, str]] | None:
    """Hub adapters through the adapter cache of a model whose engines use the model cache: its claim (made by the
    reconcile loop before the engines) and a download Job per adapter revision made, the Jobs of adapters no
    longer asked for deleted → (the adapters, each downloaded one with its files' path; the failed downloads; the
    running ones: name → what they say); None without the cache."""
    model = spec.get("model") or {}
    if not (model.get("cache") or {}).get("enabled") or not cache_key(str(model.get("source") or "")):
        return None
    try:
        cache = parse_cache(model.get("cache"))
    except ValueError as e:  # the reconcile loop reports the spec
        return adapters, {a.name: Blocked("InvalidSpec", str(e)) for a in adapters if not a.claim}, {}
    ns = owner.namespace
    deployment = await asyncio.to_thread(kube.get_deployment, ns, owner.name)
    template = ((deployment or {}).get("spec") or {}).get("template") or {}
    claim = adapter_cache.claim_name(owner.name, owner.uid)
    hub = {a.name: key for a in adapters if not a.claim and (key := cache_key(a.source))}
    if adapter_cache.mounted_claim(template.get("spec") or {}) != claim:
        if deployment is None:  # the reconcile loop makes the claim, then the engines (after the weights' download)
            return adapters, {}, {n: "waiting for the engines (and their adapter cache)" for n in hub}
        # engines without it: the API server refused the claim (a quota). A dry run says why, and whether it would
        # take it now (the reconcile loop makes it then, and the engines' next rollout mounts it); never made here,
        # where it could take a quota's last claim before the weights' one
        try:
            await asyncio.to_thread(kube.create_claim, adapter_cache.build_claim(
                claim, ns, owner.name, owner.uid, cache, loader.size), dry_run=True)
        except ApiException as e:
            if e.status not in (*REFUSED, 409):
                raise
            if e.status != 409:
                why = Blocked("AdapterCacheRejected", f"the API server refused the adapter cache {claim}: "
                              f"{api_message(e)}")
                return adapters, {n: why for n in hub}, {}
        return adapters, {}, {n: f"waiting for engines that mount the adapter cache {claim}" for n in hub}
    try:
        jobs = {j["metadata"]["name"]: j for j in await asyncio.to_thread(
            kube.list_jobs, ns, {adapter_cache.ADAPTER_CACHE_LABEL: claim})}
        wanted = {adapter_cache.job_name(claim, key) for key in hub.values()}
        for stale in sorted(set(jobs) - wanted):  # its files stay on the claim: asked for again, it checks them
            await asyncio.to_thread(kube.delete, "Job", ns, stale)
        for key in sorted(set(hub.values()), key=lambda k: k.describe):
            made = adapter_cache.job_name(claim, key)
            if made not in jobs:
                jobs[made] = await asyncio.to_thread(kube.create_job, adapter_cache.build_job(
                    key, claim, ns, owner.name, owner.uid, cache, loader, template_spec=template.get("spec") or {},
                    engine_labels=selector_labels(owner)))
    except ApiException as e:
        if e.status == 409:  # made meanwhile (an earlier pass's answer was lost): the next pass reads it
            return adapters, {}, {n: f"creating the download of {k.describe}" for n, k in hub.items()}
        if e.status not in REFUSED:
            raise
        why = Blocked("AdapterCacheRejected", f"the API server refused a download Job of the adapter cache {claim}: "
                      f"{api_message(e)}")
        return adapters, {n: why for n in hub}, {}
    out, failed, running = [], {}, {}
    for a in adapters:
        key = hub.get(a.name)
        if key is None:
            out.append(a)
            continue
        job = jobs[adapter_cache.job_name(claim, key)]
        done = adapter_cache.download_state(key, job, [])
        if done.phase != "Ready":  # its pods tell why it waits or failed
            pods = await asyncio.to_thread(kube.list_pods, ns, {adapter_cache.DOWNLOAD_LABEL: job["metadata"]["name"]})
            done = adapter_cache.download_state(key, job, pods)
        if done.phase == "Ready":
            a = dataclasses.replace(a, cached=adapter_cache.files_dir(claim, key))
        elif done.phase == "Failed":
            failed[a.name] = Blocked(done.reason, done.message)
        else:
            running[a.name] = done.message
        out.append(a)
    return tuple(out), failed, running


async def sync(body: dict, *, kube: Kube, session: aiohttp.ClientSession, port: int, memory: Memory,
               base_claims: Mapping[str, Collection[NameClaim]], adapter_index: Mapping[str, Collection[NameClaim]],
               written: list[dict] | None, loader: adapter_cache.Loader,
               counted: Callable[[str, bool], None] = lambda action, ok: None) -> Pass:
    """One pass: every running engine pod of the model asked for its adapters, the plan's calls made, the status
    as the engines show it after them (written when it changed; `written` is the one this loop wrote last); each
    call's action and success go to `counted`."""
    meta, spec = body["metadata"], body.get("spec") or {}
    owner = Owner(meta["name"], meta["namespace"], meta["uid"])
    adapters = _adapters(spec)
    before = written if written is not None else (body.get("status") or {}).get(ADAPTERS_STATUS)
    if not adapters:
        if before:
            await asyncio.to_thread(kube.patch_status, owner.namespace, owner.name,
                                    {ADAPTERS_STATUS: None, LOADED_STATUS: None})
        return Pass(None, 0, None, [])
    model = spec.get("model") or {}
    me = adapter_claims(body).get(adapters[0].name) or NameClaim("~", owner.uid, owner.namespace, owner.name)
    bases, others = conflicts(adapters, me, base_claims, adapter_index)
    offline = bool((model.get("cache") or {}).get("enabled")) or str(model.get("source", "")).startswith("pvc://")
    cached = await downloads(kube, owner, spec, adapters, loader)
    found, failed_downloads, waiting = cached if cached is not None else (adapters, {}, {})
    adapters = tuple(found)
    blocked = {**failed_downloads, **blocked_adapters(adapters, base_names=bases, other_adapters=others,
                                                      offline=offline, cache=cached is not None)}
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
    step = plan(adapters, seen, memory.failures, blocked, now=time.monotonic(), max_calls=MAX_CALLS_PER_PASS,
                waiting=waiting)
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
        step = plan(adapters, seen, memory.failures, blocked, now=time.monotonic(), max_calls=MAX_CALLS_PER_PASS,
                waiting=waiting)
    now = datetime.datetime.now(datetime.UTC)
    for pod in pods:
        if condition := gate_condition(pod, pod["metadata"]["uid"] in step.complete, now):
            await asyncio.to_thread(kube.set_pod_condition, owner.namespace, pod["metadata"]["name"], condition)
    # the summary is written with the list; once more only for a status written before it existed (the body's, when
    # this loop has written nothing yet: what it wrote, the body may not show yet)
    if step.status != before or written is None and LOADED_STATUS not in (body.get("status") or {}):
        await asyncio.to_thread(kube.patch_status, owner.namespace, owner.name,
                                {ADAPTERS_STATUS: step.status, LOADED_STATUS: loaded_summary(step.status)})
    shown = {s["name"]: s for s in before or []}
    failed = [(s["name"], s["reason"], s["message"]) for s in step.status if s["phase"] == "Failed"
              and (shown.get(s["name"], {}).get("phase") != "Failed" or shown[s["name"]].get("reason") != s["reason"])]
    busy = not step.settled or any(s["phase"] == "Loading" for s in step.status)
    return Pass(step.status, made, BUSY_RECHECK_S if busy else IDLE_RECHECK_S, failed)
