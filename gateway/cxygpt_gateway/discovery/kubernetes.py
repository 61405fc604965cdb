"""Kubernetes discovery: watch ModelDeployments and their EndpointSlices, route to the Ready ones."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import aiohttp
import orjson
from cxygpt_profiles import Limits
from pydantic import ValidationError

from .base import ModelSink, ModelSpec

log = logging.getLogger("cxygpt.gateway.kubernetes")
GROUP_VERSION = "cxygpt.io/v1alpha1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
WATCH_TIMEOUT_S = 300      # the server ends each watch after this; the loop re-lists and watches again
INITIAL_SYNC_S = 10.0      # how long start() waits for the first lists before serving anyway
MAX_BACKOFF_S = 30.0
LIST_TIMEOUT_S = 30.0


def _endpoint_urls(slices: list[dict]) -> list[str]:
    """Ready endpoints of a Service's EndpointSlices as base URLs (one per pod: the replicas)."""
    urls = []
    for s in slices:
        ports = s.get("ports") or []
        port = ports[0].get("port") if ports else None
        if not port:
            continue
        for endpoint in s.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for address in endpoint.get("addresses") or []:
                host = f"[{address}]" if ":" in address else address
                urls.append(f"http://{host}:{port}")
    return sorted(set(urls))


def spec_from_modeldeployment(md: dict, slices: list[dict]) -> ModelSpec | None:
    """The route a ModelDeployment offers, or None while it is not Ready (or its status is unusable)."""
    spec, status = md.get("spec") or {}, md.get("status") or {}
    name = (spec.get("model") or {}).get("name")
    if status.get("phase") != "Ready" or not name or not status.get("endpoint") or not status.get("limits"):
        return None
    try:
        limits = Limits.model_validate(status["limits"])
    except ValidationError as e:
        meta = md.get("metadata") or {}
        log.warning("ModelDeployment %s/%s: status.limits unusable: %s", meta.get("namespace"), meta.get("name"), e)
        return None
    urls = _endpoint_urls(slices) or [status["endpoint"].rstrip("/")]
    return ModelSpec(name=name, urls=tuple(urls), limits=limits,
                     mode="single" if status.get("mode") == "single" else "multi", profile=status.get("profile"),
                     fallback=spec.get("fallbackModel"))


def desired_routes(mds: dict[tuple[str, str], dict], slices: dict[tuple[str, str], dict]) -> dict[str, ModelSpec]:
    """Model name → spec for every Ready ModelDeployment (pure); slices are matched by Service name."""
    by_service: dict[tuple[str, str], list[dict]] = {}
    for (namespace, _), s in slices.items():
        service = ((s.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        by_service.setdefault((namespace, service), []).append(s)
    routes = {}
    for key in sorted(mds):  # stable choice if two namespaces serve the same model name
        spec = spec_from_modeldeployment(mds[key], by_service.get(key, []))
        if spec is not None and spec.name not in routes:
            routes[spec.name] = spec
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
    def __init__(self, *, namespace: str | None = None, kubeconfig: str | None = None):
        self.namespace, self.api = namespace, ApiServer(kubeconfig)
        self.objects: dict[str, dict[tuple[str, str], dict]] = {"modeldeployments": {}, "endpointslices": {}}
        self.published: set[str] = set()
        self.tasks: list[asyncio.Task] = []
        self.session: aiohttp.ClientSession | None = None
        self.sink: ModelSink | None = None

    def _path(self, group_version: str, plural: str) -> str:
        ns = f"/namespaces/{self.namespace}" if self.namespace else ""
        return f"{self.api.host}/apis/{group_version}{ns}/{plural}"

    async def start(self, sink: ModelSink) -> None:
        self.sink = sink
        self.session = aiohttp.ClientSession(read_bufsize=1 << 20)
        synced = {plural: asyncio.Event() for plural in self.objects}
        self.tasks = [
            asyncio.create_task(self._follow(GROUP_VERSION, "modeldeployments", None, synced["modeldeployments"])),
            asyncio.create_task(self._follow("discovery.k8s.io/v1", "endpointslices", SERVICE_NAME_LABEL,
                                             synced["endpointslices"])),
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(INITIAL_SYNC_S):
                await asyncio.gather(*(e.wait() for e in synced.values()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def _follow(self, group_version: str, plural: str, selector: str | None, synced: asyncio.Event) -> None:
        """List, then watch from the list's resourceVersion; start over after an error or expiry."""
        url, backoff = self._path(group_version, plural), 1.0
        params = {"labelSelector": selector} if selector else {}
        while True:
            try:
                async with self.session.get(url, params=params, ssl=self.api.ssl_context(), headers=self.api.headers(),
                                            timeout=aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)) as r:
                    r.raise_for_status()
                    listed = orjson.loads(await r.read())
                self.objects[plural] = {_key(o): o for o in listed.get("items") or []}
                self._publish()
                synced.set()
                version = (listed.get("metadata") or {}).get("resourceVersion")
                await self._watch(url, plural, {**params, "watch": "true", "allowWatchBookmarks": "true",
                                                 "timeoutSeconds": str(WATCH_TIMEOUT_S),
                                                 **({"resourceVersion": version} if version else {})})
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # API server away or answering nonsense: keep the last known routes
                log.warning("watching %s failed, retrying in %.0f s: %s", plural, backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _watch(self, url: str, plural: str, params: dict) -> None:
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
                    self.objects[plural][_key(obj)] = obj
                elif kind == "DELETED":
                    self.objects[plural].pop(_key(obj), None)
                else:
                    continue  # BOOKMARK
                self._publish()

    def _publish(self) -> None:
        routes = desired_routes(self.objects["modeldeployments"], self.objects["endpointslices"])
        for name in self.published - routes.keys():
            self.sink.remove(name)
        for spec in routes.values():
            self.sink.upsert(spec)
        self.published = set(routes)


def _key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""
