"""Local pod runner: stands in for kubelet + the Deployment controller, running engine processes on 127.0.0.1."""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from .processes import forward_lines, stop_group

log = logging.getLogger("cxygpt.pods")
MANAGED = "app.kubernetes.io/managed-by=cxygpt-operator"
CONFIG_HASH = "cxygpt.io/config-hash"
SLICE_MANAGER = "cxygpt-dev"
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)


def engine_argv(container: dict, port: int, engine: str) -> list[str]:
    """The container's command line, on this machine: vLLM has no GPU here, so the simulator (same
    arguments and API) runs in its place; host and port come last so they win."""
    command = list(container.get("command") or [])
    if not command or command[0] in ("vllm", "cxygpt-sim"):
        command = [engine, *command[1:]] if command else [engine, "serve"]
    return [*command, *container.get("args", []), "--host", "127.0.0.1", "--port", str(port)]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Replica:
    index: int
    template_hash: str
    port: int = 0
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    restarts: int = 0
    stopping: bool = False
    slice_name: str | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


@dataclass
class Workload:
    namespace: str
    name: str
    deployment: dict
    replicas: list[Replica] = field(default_factory=list)


class PodRunner:
    def __init__(self, api_url: str, *, output=None, engine: str | None = None):
        self.api_url = api_url.rstrip("/")
        self.engine = engine or shutil.which("cxygpt-sim") or str(Path(sys.executable).parent / "cxygpt-sim")
        self.output = output  # callable(prefix, line) for engine logs
        self.workloads: dict[tuple[str, str], Workload] = {}
        self.session: aiohttp.ClientSession | None = None

    # --- API ---------------------------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, body=None, content_type="application/merge-patch+json"):
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(method, self.api_url + path, data=orjson.dumps(body) if body is not None else None,
                                        headers=headers) as resp:
            data = await resp.read()
            if resp.status >= 400 and not (method == "DELETE" and resp.status == 404):
                raise RuntimeError(f"{method} {path}: {resp.status} {data[:300]!r}")
            return orjson.loads(data) if data else None

    async def _watch_deployments(self):
        """List, then watch; on a broken stream, list again (as client-go's reflector does)."""
        path = f"/apis/apps/v1/deployments?labelSelector={MANAGED}"
        while True:
            try:
                listed = await self._request("GET", path)
                seen = set()
                for dep in listed.get("items", []):
                    seen.add(self._key(dep))
                    await self._sync(dep)
                for key in set(self.workloads) - seen:
                    await self._remove(key)
                async with self.session.get(self.api_url + path + "&watch=true",
                                            timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        event = orjson.loads(line)
                        if event.get("type") == "DELETED":
                            await self._remove(self._key(event["object"]))
                        elif event.get("type") in ("ADDED", "MODIFIED"):
                            await self._sync(event["object"])
            except (aiohttp.ClientError, RuntimeError, orjson.JSONDecodeError) as e:
                log.warning("deployment watch broke (%s); relisting", e)
                await asyncio.sleep(1)

    @staticmethod
    def _key(obj: dict) -> tuple[str, str]:
        return obj["metadata"]["namespace"], obj["metadata"]["name"]

    # --- desired state -------------------------------------------------------------------------------------------

    async def _sync(self, dep: dict):
        key = self._key(dep)
        workload = self.workloads.setdefault(key, Workload(*key, deployment=dep))
        workload.deployment = dep
        template = dep["spec"]["template"]
        digest = (template.get("metadata", {}).get("annotations") or {}).get(CONFIG_HASH) or str(hash(orjson.dumps(template)))
        desired = dep["spec"].get("replicas", 1)
        # a changed pod template replaces every replica (maxSurge 0: stop, then start)
        stale = [r for r in workload.replicas if r.template_hash != digest]
        extra = [r for r in workload.replicas if r.template_hash == digest][desired:]
        for replica in stale + extra:
            workload.replicas.remove(replica)
            await self._stop(workload, replica)
        used = {r.index for r in workload.replicas}
        while len(workload.replicas) < desired:
            index = min(set(range(desired + len(used) + 1)) - used)
            used.add(index)
            replica = Replica(index=index, template_hash=digest)
            workload.replicas.append(replica)
            replica.tasks.append(asyncio.create_task(self._keep_running(workload, replica)))
        await self._publish(workload)

    async def _remove(self, key):
        workload = self.workloads.pop(key, None)
        if workload:
            for replica in workload.replicas:
                await self._stop(workload, replica)
            await self._delete_slices(workload)
            log.info("%s/%s: deployment gone, engines stopped", *key)

    # --- processes --------------------------------------------------------------------------------------------------

    async def _keep_running(self, workload: Workload, replica: Replica):
        """Start the engine, watch its health like a readiness probe, restart it when it dies."""
        container = workload.deployment["spec"]["template"]["spec"]["containers"][0]
        env = {**os.environ, **{e["name"]: e.get("value", "") for e in container.get("env", [])}}
        label = f"{workload.name}-{replica.index}"
        while not replica.stopping:
            replica.port = free_port()
            argv = engine_argv(container, replica.port, self.engine)
            replica.process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
                start_new_session=True)
            log.info("%s/%s: started engine %s on 127.0.0.1:%d (pid %d)", workload.namespace, workload.name,
                     label, replica.port, replica.process.pid)
            emit = (lambda line, label=label: self.output(label, line)) if self.output else None
            pump = asyncio.create_task(forward_lines(replica.process, emit))
            probe = asyncio.create_task(self._probe(workload, replica))
            code = await replica.process.wait()
            probe.cancel()
            await pump
            if replica.ready:
                replica.ready = False
                await self._publish(workload)
            if replica.stopping:
                return
            delay = RESTART_BACKOFF_S[min(replica.restarts, len(RESTART_BACKOFF_S) - 1)]
            replica.restarts += 1
            log.warning("%s/%s: engine %s exited with %s; restart %d in %ss", workload.namespace, workload.name,
                        label, code, replica.restarts, delay)
            await asyncio.sleep(delay)

    async def _probe(self, workload: Workload, replica: Replica):
        url = f"http://127.0.0.1:{replica.port}/health"
        while True:
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    ready = resp.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ready = False
            if ready != replica.ready:
                replica.ready = ready
                await self._publish(workload)
            await asyncio.sleep(2 if ready else 0.2)

    async def _stop(self, workload: Workload, replica: Replica):
        replica.stopping = True
        await stop_group(replica.process)
        for task in replica.tasks:
            task.cancel()
        await self._delete_slice(workload, replica)

    async def stop_all(self):
        for key in list(self.workloads):
            workload = self.workloads.pop(key)
            for replica in workload.replicas:
                await self._stop(workload, replica)

    # --- status and endpoints -------------------------------------------------------------------------------------

    async def _publish(self, workload: Workload):
        dep = workload.deployment
        ns, name = workload.namespace, workload.name
        ready = sum(r.ready for r in workload.replicas)
        desired = dep["spec"].get("replicas", 1)
        status = {"observedGeneration": dep["metadata"].get("generation", 1), "replicas": len(workload.replicas),
                  "updatedReplicas": len(workload.replicas), "readyReplicas": ready, "availableReplicas": ready,
                  "conditions": [{"type": "Available", "status": "True" if ready >= desired else "False",
                                  "reason": "MinimumReplicasAvailable" if ready >= desired else "MinimumReplicasUnavailable"}]}
        try:
            await self._request("PATCH", f"/apis/apps/v1/namespaces/{ns}/deployments/{name}/status", {"status": status})
            for replica in workload.replicas:
                if replica.port:
                    await self._put_slice(workload, replica)
        except RuntimeError as e:
            log.warning("%s/%s: status not written: %s", ns, name, e)

    async def _service_for(self, workload: Workload) -> dict | None:
        labels = workload.deployment["spec"]["template"]["metadata"].get("labels") or {}
        services = await self._request("GET", f"/api/v1/namespaces/{workload.namespace}/services")
        for svc in services.get("items", []):
            selector = svc.get("spec", {}).get("selector") or {}
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                return svc
        return None

    async def _put_slice(self, workload: Workload, replica: Replica):
        """One EndpointSlice per replica: here every engine shares 127.0.0.1 and differs by port."""
        svc = await self._service_for(workload)
        if svc is None:
            return
        name = replica.slice_name = f"{svc['metadata']['name']}-{replica.index}"
        body = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": workload.namespace,
                         "labels": {"kubernetes.io/service-name": svc["metadata"]["name"],
                                    "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc["metadata"]["name"],
                                              "uid": svc["metadata"]["uid"]}]},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": replica.ready}}],
            "ports": [{"name": "http", "port": replica.port, "protocol": "TCP"}],
        }
        await self._request("PATCH", f"/apis/discovery.k8s.io/v1/namespaces/{workload.namespace}/endpointslices/{name}"
                            f"?fieldManager={SLICE_MANAGER}&force=true", body, content_type="application/apply-patch+yaml")

    async def _delete_slice(self, workload: Workload, replica: Replica):
        if not replica.slice_name:
            return
        path = f"/apis/discovery.k8s.io/v1/namespaces/{workload.namespace}/endpointslices/{replica.slice_name}"
        try:
            await self._request("DELETE", path)
        except (RuntimeError, aiohttp.ClientError):
            pass

    async def _delete_slices(self, workload: Workload):
        for replica in workload.replicas:
            await self._delete_slice(workload, replica)

    async def run(self):
        async with aiohttp.ClientSession() as self.session:
            try:
                await self._watch_deployments()
            finally:
                await self.stop_all()
