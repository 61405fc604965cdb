"""One reconcile of a ModelDeployment: resolve, compare, apply what changed, write status if it changed."""
from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from kubernetes.client.rest import ApiException

from cxygpt_profiles import ModelCatalog, NoFit, ProfileTable, Selection

from . import adapter_cache
from .adapter_sync import ADAPTERS_STATUS, LOADED_STATUS
from .autoscaling.policy import AUTOSCALING_STATUS
from .cache import (
    CACHE_LABEL,
    CONTAINER,
    MADE_FOR_ANNOTATION,
    RETAIN_ANNOTATION,
    REVISION_ANNOTATION,
    SOURCE_ANNOTATION,
    STATE_ANNOTATION,
    USERS_ANNOTATION,
    CacheKey,
    CacheState,
    CacheUser,
    build_claim,
    cache_key,
    cache_state,
    claim_differences,
    claim_metadata,
    claim_size,
    default_size,
    fills,
    metadata_differs,
    progress_from_log,
    record,
    recorded,
)
from .kube import Kube, api_message
from .manifests import (
    CONFIG_HASH,
    EngineImages,
    Owner,
    build_cache_job,
    build_deployment,
    build_network_policy,
    build_service,
    claims_of,
    engine_cache,
    selector_labels,
)
from .nodes import NodeGpus
from .placement import PodSettings
from .resolve import (
    ModelSpec,
    NameClaim,
    SpecError,
    candidates,
    name_claim,
    name_owner,
    parse_spec,
    resolve,
    schedulable_replicas,
)
from .status import build_failed_status, build_status

# Pending models are re-evaluated on every node change; this slow retry is only a safety net.
PENDING_RETRY_S = 600
# A rejected Deployment may be let through later by a fixed admission policy, which sends us no event.
REJECTED_RETRY_S = 300
# Answers that mean the API server refused this object (not: try again, or our credentials)
REJECTION_STATUSES = (400, 413, 422)
# While a cache downloads its progress is read from the loader's log (which sends no events): this often.
CACHE_PROGRESS_S = 5
# While a cache waits for a volume, a node or a StorageClass (events of those do not wake a model): this often.
CACHE_PENDING_S = 15
LOG_TAIL_LINES = 20
Log = logging.Logger | logging.LoggerAdapter
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
OTHER_LOOPS_STATUS = (AUTOSCALING_STATUS, ADAPTERS_STATUS, LOADED_STATUS)  # status the model's other loops write


class NotYet(Exception):
    """No GPU fits yet: the model's loop tries again after `delay`; carries the status that was written. (A plain
    exception: the loop, not kopf, acts on it.)"""

    def __init__(self, message: str, *, delay: float, status: dict):
        super().__init__(message)
        self.delay, self.status = delay, status


class CannotRun(Exception):
    """Only a spec change (or, after `retry` seconds, maybe the cluster) can help; carries the status written."""

    def __init__(self, message: str, *, status: dict, retry: float | None = None):
        super().__init__(message)
        self.status, self.retry = status, retry


@dataclass
class Context:
    table: ProfileTable
    catalog: ModelCatalog
    kube: Kube
    images: EngineImages
    network_policy: bool = True
    metrics_namespaces: tuple[str, ...] = field(default=())
    gateway_namespaces: tuple[str, ...] = field(default=())
    hf_endpoint: str | None = None  # where downloads go (a Hub mirror), for the cache's Jobs and the engines
    engine_defaults: PodSettings = field(default_factory=PodSettings)  # the engines' pod settings spec.engine overrides


@dataclass(frozen=True)
class Cache:
    """This reconcile's view of the model's cache; `note`: how its claim differs from the spec, when it does."""
    key: CacheKey
    state: CacheState
    size: str | None
    note: str | None = None


def recheck_after(status: dict) -> float | None:
    """When to reconcile again with no event: while the cache downloads or waits; None otherwise."""
    phase = (status.get("cache") or {}).get("phase")
    return CACHE_PROGRESS_S if phase == "Downloading" else CACHE_PENDING_S if phase == "Pending" else None


def as_written(body: dict, written: dict | None) -> dict:
    """The body to decide on: with its status as this operator last wrote (or kept) it, when it has. A wake-up can
    come before the watch event of that write, and deciding on the older status would move the conditions'
    lastTransitionTime and write the status again for nothing. status.autoscaling and status.adapters stay the
    body's (the autoscaler's and the adapter loop's, never written here)."""
    if written is None:
        return body
    status = body.get("status") or {}
    others = {k: status[k] for k in OTHER_LOOPS_STATUS if k in status}
    return {**body, "status": {**others, **written}}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owned_by(obj: dict, owner: Owner) -> bool:
    return any(ref.get("uid") == owner.uid for ref in obj.get("metadata", {}).get("ownerReferences") or [])


def status_patch(previous: dict, desired: dict) -> dict:
    """A merge patch turning `previous` into `desired` (null removes keys that are gone)."""
    return {**{k: None for k in previous if k not in desired}, **desired}


async def _apply_if_changed(current: dict | None, desired: dict, apply, logger) -> dict:
    """The object as stored: unchanged, or as the apply answered (status included)."""
    if current is not None:
        annotations = current.get("metadata", {}).get("annotations") or {}
        if annotations.get(CONFIG_HASH) == desired["metadata"]["annotations"][CONFIG_HASH] and \
                (current.get("spec") or {}).get("replicas") == desired["spec"].get("replicas"):
            return current
    logger.info("applying %s %s (config %s)", desired["kind"], desired["metadata"]["name"],
                desired["metadata"]["annotations"][CONFIG_HASH])
    return await asyncio.to_thread(apply, desired)


async def _fail(ctx: Context, owner: Owner, previous: dict, reason: str, message: str, **kw) -> CannotRun:
    status = build_failed_status(owner, previous, reason, message, now=_now(), **kw)
    await _write_status(ctx, owner, previous, status)
    return CannotRun(message, status=status)


async def _storage_problem(ctx: Context, storage_class: str | None) -> tuple[str, str] | None:
    """Why a Pending claim will get no volume: its StorageClass does not exist, or it names none and the
    cluster has no default."""
    if storage_class:
        if await asyncio.to_thread(ctx.kube.storage_class, storage_class) is None:
            return ("StorageClassNotFound", f'storageclass.storage.k8s.io "{storage_class}" not found '
                    "(spec.model.cache.storageClassName): no volume can be provisioned for the cache")
        return None
    classes = await asyncio.to_thread(ctx.kube.storage_classes)
    if not any((c.get("metadata", {}).get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION) == "true"
               for c in classes):
        return ("NoDefaultStorageClass", "the cluster has no default StorageClass and the cache names none: "
                "set spec.model.cache.storageClassName")
    return None


def _claim_note(key: CacheKey, namespace: str, pvc: dict, differences: list[str]) -> str:
    """How a claim made with other settings than the spec's is moved to them."""
    made_for = ((pvc.get("metadata") or {}).get("annotations") or {}).get(MADE_FOR_ANNOTATION)
    made = f"with {made_for}'s spec.model.cache" if made_for else "earlier"
    if (pvc.get("status") or {}).get("phase") == "Bound":
        why = "a Bound claim keeps them"
    else:
        why = "it is replaced while Pending only for the model it was made for"
    return (f"the claim {key.claim} was made {made}: {'; '.join(differences)} ({why}). To move the cache: scale its "
            f"models to 0 replicas, then kubectl -n {namespace} delete pvc,job -l {CACHE_LABEL}={key.claim}; it is "
            "made again with these settings and downloaded anew")


async def _replace_pending_claim(ctx: Context, owner: Owner, key: CacheKey, pvc: dict, users: list[CacheUser],
                                 differences: list[str], logger: Log) -> Cache | None:
    """A claim still Pending that was made for this model (or for one that no longer uses it) and differs from its
    spec (e.g. a StorageClass that did not exist) is deleted with its Job, to be made again with the spec's
    settings; None when it is kept."""
    md = pvc.get("metadata") or {}
    made_for = (md.get("annotations") or {}).get(MADE_FOR_ANNOTATION)
    mine = made_for is None or made_for == owner.name or made_for not in {u.name for u in users}
    if (pvc.get("status") or {}).get("phase") == "Bound" or md.get("deletionTimestamp") or not mine:
        return None
    logger.info("replacing the cache claim %s, still Pending with %s", key.claim, "; ".join(differences))
    await asyncio.to_thread(ctx.kube.delete, "Job", owner.namespace, key.claim)
    await asyncio.to_thread(ctx.kube.delete, "PersistentVolumeClaim", owner.namespace, key.claim)
    return Cache(key, CacheState("Pending", "ClaimReplaced", f"the claim {key.claim} was still Pending with "
                                 f"{'; '.join(differences)}: deleted, to be made again with the spec's settings"),
                 None)


async def _cache(ctx: Context, owner: Owner, spec: ModelSpec, sel: Selection, users: list[CacheUser],
                 logger: Log) -> Cache | None:
    """The model's cache: its claim and download Job made (once) and their users and owners kept up to date,
    its state read from them; None when the model has no managed cache."""
    key = engine_cache(spec, sel)
    if key is None:
        return None
    ns = owner.namespace
    size = spec.cache.size or default_size(sel.fit.weights_mib if sel.fit else None, ctx.table.cache)
    me = CacheUser(owner.name, owner.uid, spec.cache.retain)
    everyone = sorted({u for u in users if u.name != owner.name} | {me})
    metadata = claim_metadata(key, everyone)
    pvc = await asyncio.to_thread(ctx.kube.get_claim, ns, key.claim)
    note = None
    if pvc is not None and (differences := claim_differences(pvc, spec.cache)):
        replaced = await _replace_pending_claim(ctx, owner, key, pvc, everyone, differences, logger)
        if replaced is not None:
            return replaced
        note = _claim_note(key, ns, pvc, differences)
    if pvc is None:
        if size is None:
            return Cache(key, CacheState("Failed", "CacheSizeUnknown", f"{key.repo} has no weight estimate (not in "
                                         "the model catalog, no spec.model.facts): set spec.model.cache.size"), None)
        try:
            pvc = await asyncio.to_thread(ctx.kube.create_claim,
                                          build_claim(key, ns, spec.cache, size, everyone, made_for=owner.name))
            logger.info("created the cache claim %s for %s (%s)", key.claim, key.describe, size)
        except ApiException as e:
            if e.status in (*REJECTION_STATUSES, 403):  # e.g. over a ResourceQuota
                return Cache(key, CacheState("Failed", "ClaimRejected", f"the API server refused the claim "
                                             f"{key.claim}: {api_message(e)}"), size)
            if e.status != 409:
                raise
            pvc = await asyncio.to_thread(ctx.kube.get_claim, ns, key.claim)  # another user made it meanwhile
            if pvc is None:  # and it is gone again: the next reconcile makes it
                return Cache(key, CacheState("Pending", "CreatingClaim", f"creating the claim {key.claim}"), size)
    elif metadata_differs(pvc, metadata):
        pvc = await asyncio.to_thread(ctx.kube.patch_metadata, "PersistentVolumeClaim", ns, key.claim, metadata)
    size = claim_size(pvc)  # the size it was made with (perhaps by another user)
    job = await asyncio.to_thread(ctx.kube.get_job, ns, key.claim)
    if job is not None and metadata_differs(job, metadata):
        job = await asyncio.to_thread(ctx.kube.patch_metadata, "Job", ns, key.claim, metadata)
    if recorded(pvc) or (pvc.get("metadata") or {}).get("deletionTimestamp"):
        return Cache(key, cache_state(key, pvc, job, []), size, note)
    if job is not None and not fills(job, pvc):  # the claim was deleted and made again: its Job filled the old one
        await asyncio.to_thread(ctx.kube.delete, "Job", ns, key.claim)
        logger.info("deleted the download Job %s: it filled an earlier claim of that name", key.claim)
        return Cache(key, cache_state(key, pvc, job, []), size, note)
    if job is None:
        try:
            job = await asyncio.to_thread(ctx.kube.create_job, build_cache_job(
                key, ns, spec, sel, size, everyone, ctx.table, ctx.images, ctx.hf_endpoint,
                claim_uid=pvc["metadata"]["uid"]))
            logger.info("created the download Job %s for %s", key.claim, key.describe)
        except ApiException as e:
            if e.status == 409:
                job = await asyncio.to_thread(ctx.kube.get_job, ns, key.claim)
            elif e.status in (*REJECTION_STATUSES, 403):
                return Cache(key, CacheState("Failed", "JobRejected", f"the API server refused the download Job "
                                             f"{key.claim}: {api_message(e)}"), size)
            else:
                raise
    pods = await asyncio.to_thread(ctx.kube.list_pods, ns, {CACHE_LABEL: key.claim})
    problem, events = None, []
    if (pvc.get("status") or {}).get("phase") != "Bound":
        problem = await _storage_problem(ctx, (pvc.get("spec") or {}).get("storageClassName"))
        if problem is None:
            events = await asyncio.to_thread(ctx.kube.events_of, ns, "PersistentVolumeClaim", key.claim)
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"
               and not p.get("metadata", {}).get("deletionTimestamp")]
    progress = None
    if running:
        newest = max(running, key=lambda p: p["metadata"].get("creationTimestamp") or "")
        progress = progress_from_log(await asyncio.to_thread(
            ctx.kube.pod_log, ns, newest["metadata"]["name"], CONTAINER, LOG_TAIL_LINES))
    state = cache_state(key, pvc, job, pods, storage_problem=problem, claim_events=events, progress=progress)
    if state.ready:  # recorded on the claim: what it holds outlives the Job, its pods and this operator
        value = record({"revision": state.revision, "bytes": state.bytes_total, "files": state.files})
        await asyncio.to_thread(ctx.kube.patch_metadata, "PersistentVolumeClaim", ns, key.claim,
                                {"annotations": {STATE_ANNOTATION: value}})
        logger.info("cache %s is Ready: %s", key.claim, state.message)
    return Cache(key, state, size, note)


async def _adapter_cache(ctx: Context, owner: Owner, spec: ModelSpec, logger: Log) -> str | None:
    """The model's adapter cache, made before the engines that mount it; None when the API server refuses it (the
    engines then start without it: an adapter never keeps the base from serving; the adapter loop shows why)."""
    claim = adapter_cache.claim_name(owner.name, owner.uid)
    if await asyncio.to_thread(ctx.kube.get_claim, owner.namespace, claim) is not None:
        return claim
    try:
        await asyncio.to_thread(ctx.kube.create_claim, adapter_cache.build_claim(
            claim, owner.namespace, owner.name, owner.uid, spec.cache, ctx.table.lora.cache_size))
        logger.info("created the adapter cache claim %s (%s)", claim, ctx.table.lora.cache_size)
    except ApiException as e:
        if e.status in (*REJECTION_STATUSES, 403):
            logger.warning("the API server refused the adapter cache claim %s: %s", claim, api_message(e))
            return None
        if e.status != 409:
            raise
    return claim


async def _release_stale(ctx: Context, owner: Owner, current: str | None, mounted: set[str],
                         cache_users: dict[str, list[CacheUser]], logger) -> None:
    """Caches that name this model as a user but that it no longer uses (its source, revision or cache setting
    changed) and that its engines no longer mount."""
    for pvc in await asyncio.to_thread(ctx.kube.list_claims, owner.namespace, {"app.kubernetes.io/component":
                                                                               "model-cache"}):
        md = pvc.get("metadata") or {}
        users = ((md.get("annotations") or {}).get(USERS_ANNOTATION) or "").split(",")
        mine = owner.name in users or any(r.get("uid") == owner.uid for r in md.get("ownerReferences") or [])
        if mine and md.get("name") not in (current, *mounted) and not md.get("deletionTimestamp"):
            await _release(ctx, owner, pvc, cache_users.get(md["name"], []), logger)


async def _release(ctx: Context, owner: Owner, pvc: dict, users: list[CacheUser], logger) -> None:
    """This model leaves a cache's users and owners; the last user of a cache that is not retained deletes it (and
    its Job)."""
    claim = pvc["metadata"]["name"]
    annotations = pvc.get("metadata", {}).get("annotations") or {}
    if not annotations.get(SOURCE_ANNOTATION):
        return  # not a cache the operator made
    key = cache_key(f"{annotations[SOURCE_ANNOTATION]}@{annotations.get(REVISION_ANNOTATION) or 'main'}")
    if key is None:
        return  # a source the operator never caches
    # the users this operator knows of, and those the claim still names whose owner reference Kubernetes keeps
    # (one that just started using it may not be known here yet; the garbage collector drops a deleted one's)
    listed = set((annotations.get(USERS_ANNOTATION) or "").split(","))
    owners = [CacheUser(r["name"], r["uid"]) for r in pvc["metadata"].get("ownerReferences") or []
              if r.get("name") in listed]
    others = sorted({u for u in (*users, *owners) if u.name != owner.name})
    retained = annotations.get(RETAIN_ANNOTATION) == "true"
    if not others and not retained:
        logger.info("deleting the cache %s: its last user no longer uses it", claim)
        await asyncio.to_thread(ctx.kube.delete, "Job", owner.namespace, claim)
        await asyncio.to_thread(ctx.kube.delete, "PersistentVolumeClaim", owner.namespace, claim)
        return
    metadata = claim_metadata(key, others)
    if retained:  # kept whoever uses it now: no owners
        metadata["annotations"][RETAIN_ANNOTATION], metadata["ownerReferences"] = "true", []
    for kind in ("PersistentVolumeClaim", "Job"):
        try:
            await asyncio.to_thread(ctx.kube.patch_metadata, kind, owner.namespace, claim, metadata)
        except ApiException as e:
            if e.status != 404:
                raise


async def reconcile(body: dict, nodes: Sequence[NodeGpus], ctx: Context, logger: Log,
                    claims: Sequence[NameClaim] = (), cache_users: dict[str, list[CacheUser]] | None = None) -> dict:
    """Returns the status written (or kept). `claims` are every ModelDeployment's claim on this one's served
    name, `cache_users` the users of each cache claim in its namespace. Raises NotYet (a kopf.TemporaryError)
    when no GPU fits yet and CannotRun (a kopf.PermanentError) when only a spec change can help."""
    cache_users = cache_users or {}
    meta = body["metadata"]
    # status.autoscaling and status.adapters are the other loops': never written here, not even back from an older
    # snapshot
    previous = {k: v for k, v in (body.get("status") or {}).items() if k not in OTHER_LOOPS_STATUS}
    owner = Owner(meta["name"], meta["namespace"], meta["uid"], meta.get("generation") or 1)
    try:
        spec = parse_spec(body.get("spec") or {}, ctx.engine_defaults)
    except SpecError as e:
        raise await _fail(ctx, owner, previous, "InvalidSpec", str(e)) from None

    reads = {"Deployment": ctx.kube.get_deployment, "Service": ctx.kube.get_service,
             "NetworkPolicy": ctx.kube.get_network_policy}
    current = {kind: await asyncio.to_thread(read, owner.namespace, owner.name) for kind, read in reads.items()}
    policy = current["NetworkPolicy"]
    if not ctx.network_policy and policy is not None and not _owned_by(policy, owner):
        current["NetworkPolicy"] = None  # someone else's, and we make none: not ours to judge
    for obj in current.values():
        if obj is not None and not _owned_by(obj, owner):
            message = f"a {obj['kind']} named {owner.name} exists and is not owned by this ModelDeployment"
            raise await _fail(ctx, owner, previous, "ResourceConflict", message)

    holder = name_owner(list(claims))
    if holder is not None and holder.uid != owner.uid:
        for kind, obj in current.items():
            if obj is not None:
                logger.info("deleting %s %s: the served name belongs to %s", kind, owner.name, holder.ref)
                await asyncio.to_thread(ctx.kube.delete, kind, owner.namespace, owner.name)
        message = (f"spec.model.name {spec.served_name!r} is served by {holder.ref}, "
                   "which claimed that name first")
        raise await _fail(ctx, owner, previous, "ModelNameConflict", message, engines_removed=True)

    found = candidates(spec, nodes)
    try:
        outcome: Selection | NoFit = resolve(spec, found, ctx.table, ctx.catalog)
    except NoFit as e:
        outcome = e

    deployment, image, args, rejected, cache = current["Deployment"], None, None, None, None
    if isinstance(outcome, Selection):
        key = engine_cache(spec, outcome)
        cache = await _cache(ctx, owner, spec, outcome, cache_users.get(key.claim, []) if key else [], logger)
        adapters = await _adapter_cache(ctx, owner, spec, logger) if key is not None and spec.adapters else None
        desired = build_deployment(owner, spec, outcome, ctx.table, ctx.images, hf_endpoint=ctx.hf_endpoint,
                                   adapter_cache=adapters)
        container = desired["spec"]["template"]["spec"]["containers"][0]
        image, args = container["image"], container["args"]
        try:
            # no engine before its weights are there: an engine pod would hold its GPUs while it waits. Engines
            # already running (of another revision) keep serving until the new cache is Ready.
            if cache is None or cache.state.ready:
                deployment = await _apply_if_changed(deployment, desired, ctx.kube.apply_deployment, logger)
        except ApiException as e:
            if e.status not in REJECTION_STATUSES:
                raise
            rejected = api_message(e)
            logger.warning("the API server rejected the engine Deployment: %s", rejected)
        if cache is not None or previous.get("cache"):
            await _release_stale(ctx, owner, cache.key.claim if cache else None, claims_of(deployment), cache_users,
                                 logger)
        await _apply_if_changed(current["Service"], build_service(owner, spec, outcome, ctx.table),
                                ctx.kube.apply_service, logger)
        if ctx.network_policy:
            await _apply_if_changed(current["NetworkPolicy"],
                                    build_network_policy(owner, spec, outcome, ctx.table, ctx.metrics_namespaces,
                                                         ctx.gateway_namespaces),
                                    ctx.kube.apply_network_policy, logger)
    # With no profile fitting, running engines are left alone: a node that flaps must not take a model down.
    if not ctx.network_policy and current["NetworkPolicy"] is not None:
        await asyncio.to_thread(ctx.kube.delete, "NetworkPolicy", owner.namespace, owner.name)

    pods = await asyncio.to_thread(ctx.kube.list_pods, owner.namespace, selector_labels(owner)) \
        if deployment is not None else []
    # the simulator requests no GPUs: any number of its replicas can be scheduled
    schedulable = schedulable_replicas(outcome, found.gpus) \
        if isinstance(outcome, Selection) and spec.engine_kind == "vllm" else None
    status = build_status(owner, spec, outcome, table=ctx.table, deployment=deployment, image=image, args=args,
                          previous=previous, now=_now(), pods=pods, rejected=rejected, schedulable=schedulable,
                          cache=(cache.key, cache.state, cache.size) if cache else None,
                          cache_note=cache.note if cache else None)
    status["nameClaim"] = name_claim(body, _now())  # the owner's claim, kept while the name stays
    await _write_status(ctx, owner, previous, status)
    if rejected:
        raise CannotRun(f"DeploymentRejected: {rejected}", status=status, retry=REJECTED_RETRY_S)
    if isinstance(outcome, NoFit):
        if outcome.permanent:
            raise CannotRun(f"{outcome.reason}: {outcome.message}", status=status)
        raise NotYet(f"{outcome.reason}: {outcome.message}", delay=PENDING_RETRY_S, status=status)
    return status


async def _write_status(ctx: Context, owner: Owner, previous: dict, status: dict) -> None:
    if status != previous:
        await asyncio.to_thread(ctx.kube.patch_status, owner.namespace, owner.name, status_patch(previous, status))
