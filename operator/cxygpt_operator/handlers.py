"""kopf handlers: GPU node and model name indexes, wake-ups on node/Deployment/Pod/ModelDeployment events, one
reconcile loop per model."""
from __future__ import annotations

import asyncio
import copy
import logging
import os
from dataclasses import dataclass, field

import aiohttp
import kopf
import urllib3
from kubernetes.client.rest import ApiException

from . import GROUP, MANAGER, PLURAL, VERSION
from .adapter_cache import Loader
from .adapter_sync import adapter_claims, sync
from .adapters import Memory
from .autoscaling.policy import autoscaling_of
from .autoscaling.step import Scaler, autoscale, scale_target
from .cache import CACHE_LABEL, CacheUser, download_deadline_s
from .kube import api_message
from .manifests import MODEL_DEPLOYMENT_LABEL
from .metrics import OperatorMetrics
from .nodes import GPU_RESOURCE, NodeGpus, node_gpus
from .reconcile import CannotRun, Context, NotYet, as_written, recheck_after, reconcile
from .resolve import NameClaim, claimed_since
from .status import failure_of

# The `type: ignore[arg-type]` on kopf's decorators: kopf's handler protocols know neither the indexes it passes by
# name (gpu_nodes=..., model_names=...) nor that a namespaced object's namespace is a str.
RETRY_BACKOFF_S = (1, 2, 5, 10, 30, 60)
log = logging.getLogger("cxygpt.operator")


@dataclass
class Shared:
    """Operator-wide state (kopf gives each object a shallow copy of the memo; this object is shared)."""
    wakeups: dict = field(default_factory=dict)
    reconciled_generation: dict = field(default_factory=dict)
    inventory: list | None = None
    served_names: dict = field(default_factory=dict)  # (namespace, name) -> spec.model.name last seen
    # (namespace, name) -> the failure reason last reported: our status write may reach the body after the
    # next reconcile starts, so the body's status cannot tell a new failure from one already reported
    reported_failures: dict = field(default_factory=dict)
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    # (namespace, name) -> (the cache claim it uses, as a CacheUser): who shares each cache
    cache_claims: dict = field(default_factory=dict)
    scale_wakeups: dict = field(default_factory=dict)
    scaled_generation: dict = field(default_factory=dict)
    adapter_wakeups: dict = field(default_factory=dict)   # (namespace, name) -> its adapter loop's wake-up

    def wake(self, key) -> None:
        if key in self.wakeups:
            self.wakeups[key].set()

    def cache_users(self, namespace: str) -> dict[str, list[CacheUser]]:
        users: dict[str, list[CacheUser]] = {}
        for (ns, _), (claim, user) in self.cache_claims.items():
            if ns == namespace:
                users.setdefault(claim, []).append(user)
        return users

    def wake_cache_users(self, namespace: str, claims, but=None) -> None:
        for (ns, name), (claim, _) in list(self.cache_claims.items()):
            if ns == namespace and claim in claims and name != but:
                self.wake((ns, name))

    def cache_used(self, key, entry) -> None:
        """Records which cache a model uses (None: none); the other users of a cache that gained or lost a
        user are woken, so that each keeps the cache's users and owners up to date."""
        before = self.cache_claims.get(key)
        if entry == before:
            return
        if entry is None:
            self.cache_claims.pop(key, None)
        else:
            self.cache_claims[key] = entry
        self.wake_cache_users(key[0], {e[0] for e in (before, entry) if e}, but=key[1])


def cache_entry(body: dict, status: dict | None = None) -> tuple[str, CacheUser] | None:
    """(claim, user) for a model with a managed cache, from its status (or the one just written)."""
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    claim = ((status if status is not None else body.get("status") or {}).get("cache") or {}).get("claimName")
    cache = (spec.get("model") or {}).get("cache") or {}
    if not claim or not cache.get("enabled") or meta.get("deletionTimestamp"):
        return None
    return claim, CacheUser(meta.get("name", ""), meta.get("uid", ""), cache.get("retain") is True)


class ObjectLog(logging.LoggerAdapter):
    """Our own messages about one object: its namespace/name and the generation being reconciled go with each
    line as fields (logs.py renders them; kopf's per-object logger also reports every handler run)."""

    def __init__(self, logger: logging.Logger, fields: dict[str, object]):
        super().__init__(logger, fields)
        self.fields = fields

    def process(self, msg, kwargs):
        kwargs["extra"] = {**kwargs.get("extra", {}), "fields": dict(self.fields)}
        return msg, kwargs


@kopf.on.login()
def login(**kwargs):
    """Credentials read when the operator starts (not when the client library is imported); an explicit
    kubeconfig wins over the pod's service account, as in kube.api_client."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        return kopf.login_with_service_account(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    # kopf's bookkeeping lives under our API group, not kopf.zalando.org
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP,
                                                                            key="last-handled-configuration")
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


@kopf.index("nodes")
def gpu_nodes(body: kopf.Body, name: str, **_):
    found = node_gpus(dict(body))
    # an empty mapping, not None: kopf keeps an object's old entry when its indexer returns None, so a node
    # cordoned or turned NotReady would have stayed in the inventory
    return {name: tuple(found)} if found else {}


def _inventory(index) -> list[NodeGpus]:
    """Every node's GPUs of each kind (a node with MIG slices has a kind per slice profile)."""
    return sorted(kind for entries in index.values() for kinds in entries for kind in kinds)


@kopf.on.event("nodes")  # type: ignore[arg-type]
def node_changed(memo: kopf.Memo, gpu_nodes: kopf.Index, **_):
    shared: Shared = memo.shared
    inventory = _inventory(gpu_nodes)
    if inventory != shared.inventory:
        shared.inventory = inventory
        shared.metrics.observed.gpu_nodes = [n.gpus for n in inventory]
        log.info("GPU inventory: %s", ", ".join(
            f"{n.gpus.name}={n.gpus.count}x{n.gpus.memory_mib}MiB"
            f"{'' if n.gpus.resource == GPU_RESOURCE else f' ({n.gpus.resource})'}" for n in inventory) or "none")
        for key in list(shared.wakeups):
            shared.wake(key)


@kopf.index(GROUP, VERSION, PLURAL)  # type: ignore[arg-type]
def model_names(body: kopf.Body, meta, spec, namespace: str, name: str, **_):
    """Served name → the claims on it. A model being deleted claims nothing: its name passes to the next."""
    served = (spec.get("model") or {}).get("name")
    if not served or meta.get("deletionTimestamp"):
        return {}  # replaces this object's entries (None would keep the old ones)
    return {served: NameClaim(claimed_since(dict(body)), meta.get("uid") or "", namespace, name)}


@kopf.index(GROUP, VERSION, PLURAL)  # type: ignore[arg-type]
def adapter_names(body: kopf.Body, meta, **_):
    """Adapter name → the claims of the models that serve an adapter of that name (the older keeps it)."""
    return {} if meta.get("deletionTimestamp") else adapter_claims(dict(body))


@kopf.on.event("apps", "v1", "deployments", labels={"app.kubernetes.io/managed-by": MANAGER})  # type: ignore[arg-type]
def engine_deployment_changed(memo: kopf.Memo, namespace: str, labels, **_):
    owner = labels.get(MODEL_DEPLOYMENT_LABEL)
    if owner:
        memo.shared.wake((namespace, owner))


@kopf.on.event("", "v1", "pods", labels={"app.kubernetes.io/name": "cxygpt-engine"})  # type: ignore[arg-type]
def engine_pod_changed(memo: kopf.Memo, namespace: str, labels, **_):
    owner = labels.get("app.kubernetes.io/instance")
    if owner:
        memo.shared.wake((namespace, owner))
        # a pod that started, restarted or went: its adapters are looked at now
        if (namespace, owner) in memo.shared.adapter_wakeups:
            memo.shared.adapter_wakeups[(namespace, owner)].set()


@kopf.on.event("", "v1", "persistentvolumeclaims", labels={CACHE_LABEL: kopf.PRESENT})
@kopf.on.event("batch", "v1", "jobs", labels={CACHE_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={CACHE_LABEL: kopf.PRESENT})  # type: ignore[arg-type]
def cache_object_changed(memo: kopf.Memo, namespace: str, labels, **_):
    """A cache's claim, download Job or download pod changed: its users look again."""
    memo.shared.wake_cache_users(namespace, {labels.get(CACHE_LABEL)})


@kopf.on.event(GROUP, VERSION, PLURAL)  # type: ignore[arg-type]
def model_deployment_changed(memo: kopf.Memo, event, body, namespace: str, name: str, meta, spec, **_):
    # Status-only events (our own writes) keep the generation: they need no reconcile.
    shared: Shared = memo.shared
    key = (namespace, name)
    if meta.get("generation") != shared.reconciled_generation.get(key):
        shared.wake(key)
        # a spec change may add or remove adapters, here or (a name taken or freed) in another model
        for wake in list(shared.adapter_wakeups.values()):
            wake.set()
    # the spec or the count changed (a gateway woke the model, kubectl scale): the autoscaler looks at once
    if meta.get("generation") != shared.scaled_generation.get(key) and key in shared.scale_wakeups:
        shared.scale_wakeups[key].set()
    # A served name that appears, moves or goes (deleted, or being deleted) may change its owner: wake every
    # model that claims the old or the new name.
    gone = event.get("type") == "DELETED" or meta.get("deletionTimestamp")
    served = None if gone else (spec.get("model") or {}).get("name")
    before = shared.served_names.pop(key, None) if served is None else shared.served_names.get(key)
    if served is not None:
        shared.served_names[key] = served
    if event.get("type") in ("ADDED", "DELETED", None) or before != served:
        for other, other_name in list(shared.served_names.items()):
            if other != key and other_name in (before, served):
                shared.wake(other)
    shared.cache_used(key, None if gone else cache_entry(dict(body)))


def _report_failure(shared: Shared, key, body: dict, status: dict) -> None:
    """A failure the model did not show before: a Warning Event on it (kubectl describe) and a count. Before
    the first report, the stored status says what was shown (an operator restart reports nothing twice)."""
    before = shared.reported_failures[key] if key in shared.reported_failures else failure_of(body.get("status") or {})
    failure = failure_of(status)
    if failure and (before is None or before[0] != failure[0]):
        shared.metrics.failures.labels(failure[0]).inc()
        kopf.warn(body, reason=failure[0], message=failure[1])
    shared.reported_failures[key] = failure


def _report_cache(body: dict, status: dict) -> None:
    """A Normal Event when the model's cache starts downloading or turns Ready (failures are reported as
    Warnings with the Degraded reason). Decided from the stored status, so a restart reports nothing twice."""
    before = ((body.get("status") or {}).get("cache") or {})
    after = status.get("cache") or {}
    if after.get("phase") == before.get("phase") and after.get("claimName") == before.get("claimName"):
        return
    if after.get("phase") == "Downloading":
        kopf.info(body, reason="CacheDownloading", message=after.get("message", ""))
    elif after.get("phase") == "Ready":
        kopf.info(body, reason="CacheReady", message=f"{after.get('message', '')} (claim {after.get('claimName')})")


def _backoff(failures_before: int) -> float:
    return RETRY_BACKOFF_S[min(failures_before, len(RETRY_BACKOFF_S) - 1)]


async def _sleep(wake: asyncio.Event, stopped, timeout: float | None) -> None:
    waiters = {asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def follow(stopped, body: kopf.Body, wake: asyncio.Event, step, logger, what: str,
                 on_failure=lambda: None) -> None:
    """The loop of both daemons: a step on a snapshot of the body (the live one changes under us), then sleep until
    woken, stopped or the delay the step asks for (None: until woken). A step that fails on the API is retried with
    backoff; one that crashes (a bug) too, logged, so one model's bug never stops its loop for good."""
    failures = 0
    while not stopped:
        wake.clear()
        try:
            delay = await step(copy.deepcopy(dict(body)))
            failures = 0
        except (ApiException, OSError, urllib3.exceptions.HTTPError) as e:
            delay, failures = _backoff(failures), failures + 1
            # the API server's own words name the verb and the resource (a 403 says which permission is missing)
            logger.warning("%s failed (retry in %ss): %s", what, delay,
                           f"{e.reason}: {api_message(e)}" if isinstance(e, ApiException) else e)
            on_failure()
        except Exception:
            delay, failures = _backoff(failures), failures + 1
            logger.exception("%s crashed (retry in %ss)", what, delay)
            on_failure()
        await _sleep(wake, stopped, delay)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)  # type: ignore[arg-type]
async def keep_reconciled(stopped, namespace: str, name: str, body: kopf.Body, memo: kopf.Memo,
                          gpu_nodes: kopf.Index, model_names: kopf.Index, **_):
    """Level-triggered: reconcile now, then whenever the spec, the GPU inventory, the engine Deployment or its
    Pods, or another model with the same served name change; retry failures with backoff; never poll while
    waiting."""
    ctx: Context = memo.context
    shared: Shared = memo.shared
    key = (namespace, name)
    logger = ObjectLog(log, {"object": f"{namespace}/{name}"})
    wake = shared.wakeups.setdefault(key, asyncio.Event())
    metrics = shared.metrics
    written = None  # the status this loop last wrote or kept: the body may not show it yet

    async def step(snapshot: dict) -> float | None:
        nonlocal written
        snapshot = as_written(snapshot, written)  # decide with the status as we last wrote it
        shared.reconciled_generation[key] = generation = snapshot["metadata"].get("generation")
        logger.fields["generation"] = generation
        delay, result, status = None, "ok", None
        served = ((snapshot.get("spec") or {}).get("model") or {}).get("name")
        claims = list(model_names.get(served, [])) if served else []
        with metrics.duration.time():
            try:
                status = await reconcile(snapshot, _inventory(gpu_nodes), ctx, logger, claims,
                                         shared.cache_users(namespace))
            except NotYet as e:
                logger.info("waiting: %s", e)
                delay, result, status = e.delay, "waiting", e.status
            except CannotRun as e:
                logger.warning("cannot run until the spec changes: %s", e)
                result, status, delay = "failed", e.status, e.retry
        metrics.reconciles.labels(result).inc()
        written = status
        metrics.model_seen(key, snapshot, status)
        _report_failure(shared, key, snapshot, status)
        _report_cache(snapshot, status)
        shared.cache_used(key, cache_entry(snapshot, status))
        return recheck_after(status) if delay is None else delay

    try:
        await follow(stopped, body, wake, step, logger, "reconcile",
                     on_failure=lambda: metrics.reconciles.labels("error").inc())
    finally:
        shared.cache_used(key, None)
        shared.wakeups.pop(key, None)
        shared.reconciled_generation.pop(key, None)
        shared.reported_failures.pop(key, None)
        metrics.model_gone(key)


# Who else sets a ModelDeployment's count: (namespace, name) → "Kind ns/name". Watched, not polled; KEDA's resource
# is served only where KEDA is installed (kopf then says once that it cannot watch it, and picks it up if it comes).
@kopf.index("autoscaling", "v2", "horizontalpodautoscalers")  # type: ignore[arg-type]
def hpa_targets(namespace: str, name: str, spec, **_):
    return scale_target("HorizontalPodAutoscaler", namespace, name, dict(spec))


@kopf.index("keda.sh", "v1alpha1", "scaledobjects")  # type: ignore[arg-type]
def keda_targets(namespace: str, name: str, spec, **_):
    return scale_target("ScaledObject", namespace, name, dict(spec))


@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers")
@kopf.on.event("keda.sh", "v1alpha1", "scaledobjects")  # type: ignore[arg-type]
def scaler_changed(memo: kopf.Memo, namespace: str, **_):
    """An HPA or a ScaledObject came, went or changed its target: the models of its namespace look again."""
    for key, wake in list(memo.shared.scale_wakeups.items()):
        if key[0] == namespace:
            wake.set()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)  # type: ignore[arg-type]
async def keep_scaled(stopped, namespace: str, name: str, body: kopf.Body, memo: kopf.Memo,
                      hpa_targets: kopf.Index, keda_targets: kopf.Index, **_):
    """One autoscaling step every interval for a model with spec.autoscaling (or that a KEDA ScaledObject
    scales), and at once when its spec or count, or who else scales it, changes; the others wait for that."""
    shared: Shared = memo.shared
    scaler: Scaler = memo.scaler
    key = (namespace, name)
    logger = ObjectLog(log, {"object": f"{namespace}/{name}"})
    wake = shared.scale_wakeups.setdefault(key, asyncio.Event())
    written = None  # the status.autoscaling this loop last wrote: the body may not show it yet

    async def step(snapshot: dict) -> float | None:
        nonlocal written
        shared.scaled_generation[key] = snapshot["metadata"].get("generation")
        others = sorted(keda_targets.get(key, [])) + sorted(hpa_targets.get(key, []))
        wanted = autoscaling_of(snapshot.get("spec") or {})  # the one parse of spec.autoscaling in this step
        if wanted is None and not others and not (snapshot.get("status") or {}).get("autoscaling"):
            return None  # nothing to decide nor to clean up until something changes
        if not snapshot["metadata"].get("deletionTimestamp"):
            done = await autoscale(snapshot, wanted, scaler, others=others, written=written)
            written = done.status
            if done.event:
                kind, reason, message = done.event
                kopf.event(body, type=kind, reason=reason, message=message)
        return scaler.interval_s

    def forget() -> None:
        nonlocal written
        written = None

    try:
        await follow(stopped, body, wake, step, logger, "autoscaling step", on_failure=forget)
    finally:
        shared.scale_wakeups.pop(key, None)
        shared.scaled_generation.pop(key, None)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)  # type: ignore[arg-type]
async def keep_adapters(stopped, namespace: str, name: str, body: kopf.Body, memo: kopf.Memo,
                        model_names: kopf.Index, adapter_names: kopf.Index, **_):
    """The model's LoRA adapters on its running engines: loaded where missing, unloaded where removed, through the
    engines' runtime endpoints (no restart); status.adapters as the engines show them. Woken by the spec and the
    engine pods; while engines lack an adapter, again within seconds."""
    ctx: Context = memo.context
    shared: Shared = memo.shared
    key = (namespace, name)
    logger = ObjectLog(log, {"object": f"{namespace}/{name}"})
    wake = shared.adapter_wakeups.setdefault(key, asyncio.Event())
    memory = Memory()
    written: list | None = None
    session = aiohttp.ClientSession()
    size = ctx.table.lora.cache_size
    loader = Loader(ctx.images.loader, ctx.hf_endpoint, size, download_deadline_s(size, ctx.table.cache),
                    ctx.table.cache.download_retries)

    async def step(snapshot: dict) -> float | None:
        nonlocal written
        if snapshot["metadata"].get("deletionTimestamp"):
            return None
        done = await sync(snapshot, kube=ctx.kube, session=session, port=ctx.table.vllm.port, memory=memory,
                          base_claims=model_names, adapter_index=adapter_names, written=written, loader=loader,
                          counted=lambda action, ok: shared.metrics.adapter_calls.labels(action, "ok" if ok else
                                                                                         "failed").inc())
        written = done.status
        if done.calls:
            logger.info("adapters: %d loads or unloads; %s", done.calls,
                        ", ".join(f"{s['name']} {s['phase']} {s['loadedReplicas']}/{s['replicas']}"
                                  for s in done.status or []))
        for adapter, reason, message in done.failed:
            kopf.warn(body, reason=reason, message=f"adapter {adapter}: {message}")
        return done.delay

    def forget() -> None:
        nonlocal written
        written = None

    try:
        await follow(stopped, body, wake, step, logger, "adapter pass", on_failure=forget)
    finally:
        await session.close()
        shared.adapter_wakeups.pop(key, None)


@kopf.on.cleanup()
async def close_scaler(memo: kopf.Memo, **_):
    await memo.scaler.reader.close()


@kopf.on.probe(id="gpuNodes")  # type: ignore[arg-type]
def gpu_node_count(gpu_nodes: kopf.Index, **_):
    return len(gpu_nodes)
