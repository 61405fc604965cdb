"""Kubernetes discovery: watch ModelDeployments and their EndpointSlices, route to every ready endpoint."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import aiohttp
import orjson
from pydantic import ValidationError

from cxygpt_profiles import Limits

from ..routing.policies import MAX_EPSILON, POLICIES
from .base import AdapterSpec, ModelSink, ModelSpec, ScaleTarget, Unavailable

log = logging.getLogger("cxygpt.gateway.kubernetes")
GROUP_VERSION = "cxygpt.io/v1alpha1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# the slices of the operator's engine Services only (the EndpointSlice controller copies a Service's labels),
# not every Service's in the cluster: each slice event recomputes the routes on the serving loop
ENGINE_SLICES = f"{SERVICE_NAME_LABEL},app.kubernetes.io/managed-by=cxygpt-operator"
WATCH_TIMEOUT_S = 300      # the server ends each watch after this; the loop re-lists and watches again
INITIAL_SYNC_S = 10.0      # how long start() waits for the first lists before serving anyway
MAX_BACKOFF_S = 30.0
LIST_TIMEOUT_S = 30.0
WAKE_TIMEOUT_S = 10.0
# 0 -> 1 only if it is still 0: of several gateways (or requests) waking a model at once, one write wins. An
# autoscaling/v1 Scale leaves replicas out when it is 0 (omitempty): its spec is then {}, and only then
WAKE_PATCH = orjson.dumps([{"op": "test", "path": "/spec", "value": {}},
                           {"op": "add", "path": "/spec/replicas", "value": 1}])
# what is watched in each watched namespace: name → (group/version, plural, label selector)
WATCHES = {"modeldeployments": (GROUP_VERSION, "modeldeployments", None),
           "endpointslices": ("discovery.k8s.io/v1", "endpointslices", ENGINE_SLICES)}


def _taking_requests(slices: list[dict]):
    """(slice, endpoint) for each endpoint that takes new requests. One that is not ready, or is terminating,
    drains: it gets nothing new, and what it serves finishes (EndpointSlice API: an absent `ready` means ready)."""
    for s in slices:
        for endpoint in s.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is not False and conditions.get("terminating") is not True:
                yield s, endpoint


def ready_endpoint_urls(slices: list[dict]) -> list[str]:
    """Base URLs (one per pod: the replicas) of the endpoints that take new requests."""
    urls = set()
    for s, endpoint in _taking_requests(slices):
        ports = s.get("ports") or []
        port = ports[0].get("port") if ports else None
        if not port:
            continue
        for address in endpoint.get("addresses") or []:
            urls.add(f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}")
    return sorted(urls)


def ready_endpoint_count(slices: list[dict]) -> int:
    """How many pods a Service's slices list as taking requests: the gateway replicas. A pod is counted once
    however many slices name it (dual-stack Services have one slice per address family)."""
    def pod(endpoint: dict):
        ref = endpoint.get("targetRef") or {}
        return ref.get("uid") or ref.get("name") or tuple(endpoint.get("addresses") or ())
    return len({pod(endpoint) for _, endpoint in _taking_requests(slices)})


# the operator's reasons (ProfileSelected False) for a model no node of the cluster can hold
CANNOT_PLACE = frozenset({"NoMatchingGPU", "InsufficientGPUMemory"})


def _condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


def why_unavailable(md: dict) -> Unavailable:
    """What a client is told while a ModelDeployment has no ready replica, from what its status says."""
    spec, status = md.get("spec") or {}, md.get("status") or {}
    name, phase = (spec.get("model") or {}).get("name"), status.get("phase")
    ready = status.get("ready") or f"0/{spec.get('replicas', 1)}"
    trouble = _condition(status, "Degraded").get("message") or _condition(status, "Available").get("message")
    placed = _condition(status, "ProfileSelected")
    if placed.get("status") == "False" and placed.get("reason") in CANNOT_PLACE:
        return Unavailable(f"model {name} cannot start: {placed.get('message') or placed['reason']}; a request does "
                           "not change that, a GPU node that fits does", retry_after_s=60)
    if (spec.get("replicas") == 0 or phase == "ScaledToZero") and scale_target(md):
        return Unavailable(f"model {name} is scaled to zero for want of requests; a request starts it",
                           retry_after_s=30)
    if spec.get("replicas") == 0 or phase == "ScaledToZero":
        return Unavailable(f"model {name} is scaled to zero (spec.replicas is 0)", retry_after_s=30)
    if phase == "Failed":
        return Unavailable(f"model {name} cannot serve: {trouble or 'its ModelDeployment failed'}", retry_after_s=60)
    cache = status.get("cache") or {}
    if phase == "Pending" and cache.get("phase") in ("Pending", "Downloading"):
        return Unavailable(f"model {name} is waiting for its weights: {cache.get('message') or cache['phase']}",
                           retry_after_s=30)
    if phase == "Pending":
        return Unavailable(f"model {name} is waiting for a GPU node{f': {trouble}' if trouble else ''}",
                           retry_after_s=30)
    if phase == "Starting":
        return Unavailable(f"model {name} is starting ({ready} replicas ready: loading the model)", retry_after_s=10)
    if phase in ("Ready", "PartiallyReady"):
        return Unavailable(f"model {name} is restarting: none of its replicas is ready right now", retry_after_s=5)
    return Unavailable(f"model {name} is being set up (the operator has not reported on it yet)", retry_after_s=5)


def scale_target(md: dict) -> ScaleTarget | None:
    """Where a request wakes this model from zero replicas: when its autoscaler scales from zero (the operator says
    so in status.autoscaling) and it is not failing (waiting for an engine that crash-loops helps no one)."""
    meta, status = md.get("metadata") or {}, md.get("status") or {}
    if not (status.get("autoscaling") or {}).get("scaleFromZero") or status.get("phase") == "Failed":
        return None
    placed = _condition(status, "ProfileSelected")
    if placed.get("status") == "False" and placed.get("reason") in CANNOT_PLACE:
        return None  # no GPU node fits it: a wake would only leave a pod Pending while the request waits
    replicas = (md.get("spec") or {}).get("replicas", 1)
    return ScaleTarget(meta.get("namespace") or "", meta.get("name") or "",
                       replicas if isinstance(replicas, int) else 1)


def _claim(md: dict) -> tuple[str, str]:
    """When the model claimed its served name, then its uid: the operator's rule (RFC 3339 UTC sorts as text).
    The time its status confirms (status.nameClaim); else its creation for a spec never changed; else a claim
    not yet confirmed ("~" sorts last), so a model renamed onto a live name never takes it over."""
    meta, status = md.get("metadata") or {}, md.get("status") or {}
    served = ((md.get("spec") or {}).get("model") or {}).get("name")
    claim = status.get("nameClaim") or {}
    if served and claim.get("name") == served and claim.get("since"):
        since = claim["since"]
    elif (meta.get("generation") or 1) == 1 and meta.get("creationTimestamp"):
        since = meta["creationTimestamp"]
    else:
        since = "~"
    return since, meta.get("uid") or ""


def name_owners(mds: dict[tuple[str, str], dict]) -> dict[str, tuple[str, str]]:
    """Served model name → the ModelDeployment that owns it: the first to claim it (then the smaller uid), in any
    namespace, as the operator decides; the others are conflicts and get no route. One being deleted claims
    nothing."""
    owners: dict[str, tuple[str, str]] = {}
    for key, md in mds.items():
        name = ((md.get("spec") or {}).get("model") or {}).get("name")
        if (md.get("metadata") or {}).get("deletionTimestamp"):
            continue
        if name and (name not in owners or _claim(md) < _claim(mds[owners[name]])):
            owners[name] = key
    return owners


def spec_from_modeldeployment(md: dict, slices: list[dict]) -> ModelSpec | Unavailable:
    """The route a ModelDeployment offers (its ready endpoints, maybe none), or why it has none yet: no usable
    status.limits (not reconciled, no profile, unusable)."""
    spec, status = md.get("spec") or {}, md.get("status") or {}
    name = (spec.get("model") or {}).get("name")
    if not status.get("limits"):
        return why_unavailable(md)
    try:
        limits = Limits.model_validate(status["limits"])
    except ValidationError as e:
        meta = md.get("metadata") or {}
        log.warning("ModelDeployment %s/%s: status.limits unusable: %s", meta.get("namespace"), meta.get("name"), e)
        return why_unavailable(md)
    urls = ready_endpoint_urls(slices)
    policy, epsilon = routing_of(spec)
    return ModelSpec(name=str(name), urls=tuple(urls), limits=limits,
                     mode="single" if status.get("mode") == "single" else "multi", profile=status.get("profile"),
                     fallback=spec.get("fallbackModel"), unavailable=None if urls else why_unavailable(md),
                     task="embed" if (spec.get("model") or {}).get("task") == "embed" else "generate",
                     routing_policy=policy, routing_epsilon=epsilon, scale_from_zero=scale_target(md),
                     namespace=(md.get("metadata") or {}).get("namespace"),
                     accept_fallback_from=accepted_fallbacks(spec), adapters=adapters_of(spec))


# adapters read from one ModelDeployment (its schema bounds them lower; the registry serves max_adapters_per_model)
MAX_ADAPTERS = 1000


def adapters_of(spec: dict) -> tuple[AdapterSpec, ...]:
    """spec.adapters: each one's served name and source, in order; an entry without a string name is skipped."""
    given = spec.get("adapters")
    if not isinstance(given, list):
        return ()
    found: dict[str, AdapterSpec] = {}
    for entry in given[:MAX_ADAPTERS]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name and name not in found:
            source = entry.get("source")
            found[name] = AdapterSpec(name, source=source if isinstance(source, str) else None)
    return tuple(found.values())


def accepted_fallbacks(spec: dict) -> tuple[str, ...]:
    """spec.acceptFallbackFrom: the namespaces (or "*") whose models may name this one as their fallbackModel."""
    given = spec.get("acceptFallbackFrom")
    return tuple(n for n in given if isinstance(n, str)) if isinstance(given, list) else ()


def routing_of(spec: dict) -> tuple[str | None, float | None]:
    """spec.routing's policy and epsilon; what the schema would refuse counts as unset (the gateway's default)."""
    given = spec.get("routing")
    routing: dict = given if isinstance(given, dict) else {}
    policy, epsilon = routing.get("policy"), routing.get("epsilon")
    if not (isinstance(epsilon, (int, float)) and not isinstance(epsilon, bool) and 0 < epsilon <= MAX_EPSILON):
        epsilon = None
    return policy if policy in POLICIES else None, None if epsilon is None else float(epsilon)


def desired_routes(mds: dict[tuple[str, str], dict],
                   slices: dict[tuple[str, str], dict]) -> dict[str, ModelSpec | Unavailable]:
    """Model name → its route, or why it has none, for every name a ModelDeployment serves (pure); routes go to
    the name's owner only, and slices are matched to it by Service name (the ModelDeployment's name)."""
    by_service: dict[tuple[str, str], list[dict]] = {}
    for (namespace, _), s in slices.items():
        service = ((s.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL) or ""
        by_service.setdefault((namespace, service), []).append(s)
    owners = name_owners(mds)
    routes: dict[str, ModelSpec | Unavailable] = {
        name: spec_from_modeldeployment(mds[key], by_service.get(key, [])) for name, key in sorted(owners.items())}
    for name, route in list(routes.items()):  # a model with no route yet: its adapters' names are 503 too, not 404
        if isinstance(route, Unavailable):
            for adapter in adapters_of(mds[owners[name]].get("spec") or {}):
                routes.setdefault(adapter.name, Unavailable(f"adapter {adapter.name} of model {name}: "
                                                            f"{route.message}", route.retry_after_s))
    return routes


class ApiServer:
    """Where and how to reach the API server: kubeconfig (file or $KUBECONFIG) or in-cluster, via the
    kubernetes client's loader so every auth method it knows works here too."""

    def __init__(self, kubeconfig: str | None):
        from kubernetes import client, config
        self.configuration = client.Configuration()
        try:
            try:
                config.load_kube_config(config_file=kubeconfig, client_configuration=self.configuration)
            except (config.ConfigException, OSError, TypeError):
                if kubeconfig:
                    raise
                config.load_incluster_config(client_configuration=self.configuration)
        except (config.ConfigException, OSError, TypeError) as e:
            raise ValueError(f"no Kubernetes API to watch (kubeconfig {kubeconfig or '$KUBECONFIG'} "
                             f"or in-cluster): {e}") from None

    @property
    def host(self) -> str:
        return self.configuration.host.rstrip("/")

    def headers(self) -> dict:
        c = self.configuration
        if c.refresh_api_key_hook is not None:
            c.refresh_api_key_hook(c)  # in-cluster tokens rotate
        token = c.get_api_key_with_prefix("authorization") or c.get_api_key_with_prefix("BearerToken")
        return {"Authorization": token} if token else {}

    def ssl_context(self) -> ssl.SSLContext | bool:
        c = self.configuration
        if not self.host.startswith("https"):
            return True
        if not c.verify_ssl:
            return False
        context = ssl.create_default_context(cafile=c.ssl_ca_cert)
        if c.cert_file:
            context.load_cert_chain(c.cert_file, c.key_file)
        return context


class KubernetesDiscovery:
    """Lists and watches ModelDeployments and EndpointSlices in each watched namespace (or the whole cluster), and
    the EndpointSlices of the gateway's own Service when it is named (how many gateways share the engines)."""

    def __init__(self, *, namespaces: list[str] | tuple[str, ...] = (), kubeconfig: str | None = None,
                 gateway_service: str | None = None):
        self.namespaces, self.api = tuple(dict.fromkeys(namespaces)) or (None,), ApiServer(kubeconfig)
        self.watches = dict(WATCHES)
        # (watch, namespace watched) → that list's objects by (namespace, name); each watch owns its own part
        self.objects: dict[tuple[str, str | None], dict[tuple[str, str], dict]] = {
            (watch, ns): {} for watch in WATCHES for ns in self.namespaces}
        if gateway_service:
            namespace, service = gateway_service.split("/", 1)
            self.watches["gateways"] = ("discovery.k8s.io/v1", "endpointslices", f"{SERVICE_NAME_LABEL}={service}")
            self.objects["gateways", namespace] = {}
        self.published: set[str] = set()
        self.tasks: list[asyncio.Task] = []
        # both set by start(), before any watch runs
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]
        self.sink: ModelSink = None  # type: ignore[assignment]

    def _path(self, group_version: str, plural: str, namespace: str | None) -> str:
        ns = f"/namespaces/{namespace}" if namespace else ""
        return f"{self.api.host}/apis/{group_version}{ns}/{plural}"

    async def start(self, sink: ModelSink) -> None:
        self.sink = sink
        self.session = aiohttp.ClientSession(read_bufsize=1 << 20)
        synced = {part: asyncio.Event() for part in self.objects}
        self.tasks = [asyncio.create_task(self._follow(watch, ns, synced[watch, ns])) for watch, ns in self.objects]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(INITIAL_SYNC_S):  # the routes; the gateway count may come later
                await asyncio.gather(*(e.wait() for (watch, _), e in synced.items() if watch in WATCHES))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def _follow(self, watch: str, namespace: str | None, synced: asyncio.Event) -> None:
        """List, then watch from the list's resourceVersion; start over after an error or expiry."""
        group_version, plural, selector = self.watches[watch]
        url, backoff, part = self._path(group_version, plural, namespace), 1.0, (watch, namespace)
        params = {"labelSelector": selector} if selector else {}
        while True:
            try:
                async with self.session.get(url, params=params, ssl=self.api.ssl_context(), headers=self.api.headers(),
                                            timeout=aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)) as r:
                    r.raise_for_status()
                    listed = orjson.loads(await r.read())
                self.objects[part] = {_key(o): o for o in listed.get("items") or []}
                self._publish(watch)
                synced.set()
                version = (listed.get("metadata") or {}).get("resourceVersion")
                await self._watch(url, part, {**params, "watch": "true", "allowWatchBookmarks": "true",
                                              "timeoutSeconds": str(WATCH_TIMEOUT_S),
                                              **({"resourceVersion": version} if version else {})})
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # API server away or answering nonsense: keep the last known routes
                log.warning("watching %s%s failed, retrying in %.0f s: %s",
                            plural if watch in WATCHES else f"{plural} ({selector})",
                            f" in {namespace}" if namespace else "", backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _watch(self, url: str, part: tuple[str, str | None], params: dict) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=WATCH_TIMEOUT_S + 30)
        async with self.session.get(url, params=params, timeout=timeout, ssl=self.api.ssl_context(),
                                    headers=self.api.headers()) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.strip():
                    continue
                event = orjson.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # e.g. 410 Gone: our resourceVersion expired; re-list
                    raise RuntimeError(f"watch error: {obj.get('message') or obj}")
                if kind in ("ADDED", "MODIFIED"):
                    self.objects[part][_key(obj)] = obj
                elif kind == "DELETED":
                    self.objects[part].pop(_key(obj), None)
                else:
                    continue  # BOOKMARK
                self._publish(part[0])

    async def wake(self, target: ScaleTarget) -> str:
        """spec.replicas 0 -> 1 through the scale subresource (the gateway may change the count and nothing else
        of the model), only while it is 0; the operator's autoscaler takes it from there."""
        url = f"{self._path(GROUP_VERSION, 'modeldeployments', target.namespace)}/{target.name}/scale"
        try:
            async with self.session.patch(url, data=WAKE_PATCH, ssl=self.api.ssl_context(),
                                          headers={**self.api.headers(), "Content-Type": "application/json-patch+json"},
                                          timeout=aiohttp.ClientTimeout(total=WAKE_TIMEOUT_S)) as r:
                if r.status == 200:
                    return "woken"
                if r.status in (409, 422):  # the test failed: someone else woke it, or it is not at zero
                    return "awake"
                return f"failed: {r.status} {(await r.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError) as e:
            return f"failed: {e!r}"

    def _all(self, watch: str) -> dict[tuple[str, str], dict]:
        merged: dict[tuple[str, str], dict] = {}
        for (w, _), objects in self.objects.items():
            if w == watch:
                merged.update(objects)
        return merged

    def _publish(self, watch: str) -> None:
        """Tells the sink what changed with `watch`'s objects: the gateway count, or the routes."""
        if watch == "gateways":
            # none listed ready (not created yet, a wrong name): None, and the configured count stands
            self.sink.set_gateways(ready_endpoint_count(list(self._all("gateways").values())) or None)
            return
        routes = desired_routes(self._all("modeldeployments"), self._all("endpointslices"))
        for name in self.published - routes.keys():
            self.sink.remove(name)
        for name, route in routes.items():
            if isinstance(route, Unavailable):
                self.sink.reserve(name, route)
            else:
                self.sink.upsert(route)
        self.published = set(routes)


def _key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""
