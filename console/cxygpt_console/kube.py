"""The console's Kubernetes I/O, read-only: lists and watches what the pages show, and follows engine logs."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson

from .logs import MAX_LINE_CHARS, after_overlap

log = logging.getLogger("cxygpt.console.kube")
WATCH_TIMEOUT_S = 300        # the server ends each watch after this; the loop lists and watches again
LIST_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 30.0
LOG_TAIL_LINES = 200         # what a log view starts with
LOG_LIMIT_BYTES = 1 << 20    # the most one log read may bring
LOG_RESUME_S = 1.0           # how soon a log read that ended is resumed (an API server that does not stream follow)
SETTLE_S = 0.3               # how long the first lines of a log read may take to arrive before they are matched


@dataclass(frozen=True)
class Kind:
    api: str                 # "/api/v1" or "/apis/<group>/<version>"
    plural: str
    namespaced: bool
    selector: str | None     # label selector: only these objects are listed and watched
    max_objects: int         # past this many, new objects are left out (and the page says so); events: oldest go


ENGINE_SLICES = "kubernetes.io/service-name,app.kubernetes.io/managed-by=cxygpt-operator"
KINDS = {
    "modeldeployments": Kind("/apis/cxygpt.io/v1alpha1", "modeldeployments", True, None, 2000),
    "pods": Kind("/api/v1", "pods", True, "app.kubernetes.io/name=cxygpt-engine", 5000),
    "events": Kind("/api/v1", "events", True, None, 2000),
    "nodes": Kind("/api/v1", "nodes", False, None, 5000),
    # where each model's engines listen: the tokenizer endpoint the playground counts with
    "endpointslices": Kind("/apis/discovery.k8s.io/v1", "endpointslices", True, ENGINE_SLICES, 5000),
}
EVENT_KINDS = {"ModelDeployment", "Pod"}     # the Events the model page shows


class ApiServer:
    """Where and how to reach the API server: a kubeconfig (file or $KUBECONFIG) or in-cluster, loaded by the
    kubernetes client's loader so every auth method it knows works here too. The gateway's discovery has the same
    class: the console's image holds the console and the profiles only, not the gateway's code."""

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
            where = kubeconfig or "$KUBECONFIG"
            raise ValueError(f"no Kubernetes API (kubeconfig {where} or in-cluster): {e}") from None

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


class Changes:
    """A version number that goes up whenever something a page shows may have changed; pages wait on it."""

    def __init__(self):
        self.version = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, seen: int, timeout: float) -> int:
        if self.version == seen:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.version


def _key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def _slim(obj: dict) -> dict:
    """What is kept of an object: all of it but managedFields (often the largest part, never shown)."""
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return obj


def _event_time(event: dict) -> str:
    return event.get("lastTimestamp") or event.get("eventTime") or (event.get("metadata") or {}).get(
        "creationTimestamp") or ""


class Cluster:
    """The objects the console shows, kept current by one list-and-watch per kind and namespace (or the whole
    cluster); every change bumps `changes`. Nothing here writes to the API server."""

    def __init__(self, api: ApiServer, namespaces: list[str], changes: Changes,
                 gateway_service: tuple[str, str] | None = None):
        self.api, self.changes = api, changes
        self.namespaces: tuple[str | None, ...] = tuple(dict.fromkeys(namespaces)) or (None,)
        self.kinds = dict(KINDS)
        self.parts: list[tuple[str, str | None]] = [
            (kind, ns if k.namespaced else None) for kind, k in KINDS.items()
            for ns in (self.namespaces if k.namespaced else (None,))]
        if gateway_service:  # the gateway replicas, each scraped for its metrics
            namespace, service = gateway_service
            self.kinds["gateways"] = Kind("/apis/discovery.k8s.io/v1", "endpointslices", True,
                                          f"kubernetes.io/service-name={service}", 100)
            self.parts.append(("gateways", namespace))
        self.objects: dict[tuple[str, str | None], dict[tuple[str, str], dict]] = {p: {} for p in self.parts}
        self.left_out: dict[str, int] = {}
        self.synced: dict[tuple[str, str | None], asyncio.Event] = {}
        self.errors: dict[tuple[str, str | None], str] = {}
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # set when it starts
        self.tasks: list[asyncio.Task] = []

    def all(self, kind: str) -> list[dict]:
        return [o for (k, _), objects in self.objects.items() if k == kind for o in objects.values()]

    def problems(self) -> list[str]:
        """What the pages should say about the cluster view: watches failing, objects left out."""
        out = [f"cannot read {kind}{' in ' + ns if ns else ''}: {error}" for (kind, ns), error in self.errors.items()]
        out += [f"{n} {kind} left out (more than {self.kinds[kind].max_objects})"
                for kind, n in self.left_out.items() if n]
        return out

    async def start(self, session: aiohttp.ClientSession, initial_sync_s: float = 10.0) -> None:
        self.session = session
        self.synced = {p: asyncio.Event() for p in self.parts}
        self.tasks = [asyncio.create_task(self._follow(*p)) for p in self.parts]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(initial_sync_s):
                await asyncio.gather(*(e.wait() for e in self.synced.values()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def url(self, kind: str, namespace: str | None, name: str = "", subresource: str = "") -> str:
        k = self.kinds[kind]
        path = f"{self.api.host}{k.api}{f'/namespaces/{namespace}' if namespace else ''}/{k.plural}"
        return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")

    def _keep(self, kind: str, part: tuple[str, str | None], obj: dict) -> bool:
        """Adds or replaces one object within the kind's bound; False when it was left out."""
        if kind == "events" and (obj.get("involvedObject") or {}).get("kind") not in EVENT_KINDS:
            return False
        objects, key = self.objects[part], _key(obj)
        limit = self.kinds[kind].max_objects
        if key not in objects and len(objects) >= limit:
            if kind != "events":
                self.left_out[kind] = self.left_out.get(kind, 0) + 1
                return False
            del objects[min(objects, key=lambda k: _event_time(objects[k]))]  # the oldest Event makes room
        objects[key] = _slim(obj)
        return True

    async def _follow(self, kind: str, namespace: str | None) -> None:
        """List, then watch from the list's resourceVersion; start over after an error or the watch's end."""
        part, k = (kind, namespace), self.kinds[kind]
        url, backoff = self.url(kind, namespace), 1.0
        params = {"labelSelector": k.selector} if k.selector else {}
        while True:
            try:
                async with self.session.get(url, params=params, ssl=self.api.ssl_context(), headers=self.api.headers(),
                                            timeout=aiohttp.ClientTimeout(total=LIST_TIMEOUT_S)) as r:
                    if r.status != 200:
                        raise RuntimeError(f"{r.status} {(await r.text())[:300]}")
                    listed = orjson.loads(await r.read())
                self.objects[part] = {}
                self.left_out[kind] = 0
                for obj in listed.get("items") or []:
                    self._keep(kind, part, obj)
                self.errors.pop(part, None)
                self.changes.bump()
                self.synced[part].set()
                version = (listed.get("metadata") or {}).get("resourceVersion")
                await self._watch(kind, part, url, {**params, "watch": "true", "allowWatchBookmarks": "true",
                                                    "timeoutSeconds": str(WATCH_TIMEOUT_S),
                                                    **({"resourceVersion": version} if version else {})})
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the API server away, or refusing: keep what was known, say so, retry
                self.errors[part] = str(e)[:300]
                self.changes.bump()
                log.warning("reading %s%s failed, retrying in %.0f s: %s", kind,
                            f" in {namespace}" if namespace else "", backoff, e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _watch(self, kind: str, part: tuple[str, str | None], url: str, params: dict) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=WATCH_TIMEOUT_S + 30)
        async with self.session.get(url, params=params, timeout=timeout, ssl=self.api.ssl_context(),
                                    headers=self.api.headers()) as r:
            if r.status != 200:
                raise RuntimeError(f"watch: {r.status} {(await r.text())[:300]}")
            async for line in r.content:
                if not line.strip():
                    continue
                event = orjson.loads(line)
                type_, obj = event.get("type"), event.get("object") or {}
                if type_ == "ERROR":  # e.g. 410 Gone: the resourceVersion expired; list again
                    raise RuntimeError(f"watch error: {obj.get('message') or obj}")
                if type_ in ("ADDED", "MODIFIED"):
                    if not self._keep(kind, part, obj):
                        continue
                elif type_ == "DELETED":
                    if self.objects[part].pop(_key(obj), None) is None:
                        continue
                else:
                    continue  # BOOKMARK
                self.changes.bump()

    async def follow_log(self, namespace: str, pod: str, container: str) -> AsyncGenerator[list[str], None]:
        """The container's log: its last LOG_TAIL_LINES lines, then each new batch of lines as it comes. A read
        the API server ends (it does not stream follow, the container restarted) is resumed after LOG_RESUME_S,
        without repeating lines already given. Problems come as one line starting with '[console] '."""
        url = self.url("pods", namespace, pod, "log")
        params = {"container": container, "follow": "true", "tailLines": str(LOG_TAIL_LINES),
                  "limitBytes": str(LOG_LIMIT_BYTES)}
        seen: list[str] = []
        while True:
            try:
                async with self.session.get(url, params=params, ssl=self.api.ssl_context(), headers=self.api.headers(),
                                            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                                                          sock_read=WATCH_TIMEOUT_S)) as r:
                    if r.status != 200:
                        body = await r.content.read(2000)
                        try:
                            message = orjson.loads(body).get("message") or body.decode(errors="replace")
                        except orjson.JSONDecodeError:
                            message = body.decode(errors="replace")
                        yield [f"[console] the log cannot be read now ({r.status}): {message[:300]}"]
                    else:
                        first, lines = True, _lines(r.content)
                        async for batch in lines:
                            if first:  # the tail this read starts with, matched against what was shown
                                batch, first = after_overlap(seen, batch), False
                            if batch:
                                seen = (seen + batch)[-LOG_TAIL_LINES:]
                                yield batch
            except (aiohttp.ClientError, TimeoutError) as e:
                yield [f"[console] reading the log failed: {e!r}"[:400]]
            await asyncio.sleep(LOG_RESUME_S)


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[list[str]]:
    """Complete lines in batches: the first batch is whatever arrives within SETTLE_S of the first byte (the
    tail), then each chunk's lines. A line longer than MAX_LINE_CHARS is cut there."""
    pending, first = b"", True
    loop = asyncio.get_running_loop()
    while True:
        if first:
            chunk = await stream.readany()
            deadline = loop.time() + SETTLE_S
            while chunk and not stream.at_eof() and loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    more = await asyncio.wait_for(stream.readany(), max(0.0, deadline - loop.time()))
                    if not more:
                        break
                    chunk += more
                    if len(chunk) >= LOG_LIMIT_BYTES:
                        break
        else:
            chunk = await stream.readany()
        if not chunk:
            if pending:
                yield [pending.decode(errors="replace")[:MAX_LINE_CHARS]]
            return
        *complete, pending = (pending + chunk).split(b"\n")
        if len(pending) > 4 * MAX_LINE_CHARS:  # no newline in sight: cut it as a line of its own
            complete.append(pending)
            pending = b""
        batch = [line.decode(errors="replace").rstrip("\r") for line in complete]
        if batch or first:
            yield batch
        first = False
