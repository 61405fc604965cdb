"""Local pod runner: stands in for kubelet + the Deployment controller, running engine processes on 127.0.0.1."""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import hashlib
import json
import logging
import os
import secrets
import shutil
import string
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from .containers import TAIL_LINES, requests_in_flight, tail_message
from .jobs import Jobs
from .processes import forward_lines, run_until_signalled, stop_group
from .rollout import PodView, rollout_step, strategy_of
from .volumes import MOUNTS_ENV, Unbound, Volumes, rewrite, rewrite_all
from .watching import follow

log = logging.getLogger("cxygpt.pods")
MANAGED = "app.kubernetes.io/managed-by=cxygpt-operator"
SLICE_MANAGER = "cxygpt-dev"
# Restart back-off after an engine exits: kubelet's doubles from 10 s to 5 min; the dev cluster's is shorter so
# a fixed engine is back within seconds (documented in the README).
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)
# Engine processes this machine runs at most, over every Deployment: more replicas are refused (ReplicaFailure).
MAX_ENGINES = 32
_ALNUM = string.ascii_lowercase + string.digits
# Keeps a deleted Pod visible (with its deletionTimestamp) until its engine has stopped, as kubelet's graceful
# termination does; the pod runner removes it then.
POD_FINALIZER = "cxygpt.io/pod-runner"


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


def template_hash(template: dict) -> str:
    """pod-template-hash: 10 lowercase alphanumerics that change whenever the pod template does."""
    return hashlib.sha256(orjson.dumps(template, option=orjson.OPT_SORT_KEYS)).hexdigest()[:10]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Pod:
    name: str
    template_hash: str
    template: dict
    uid: str = ""
    port: int = 0
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    started_at: str | None = None
    exits: int = 0
    last_exit: dict | None = None  # lastState.terminated
    backoff_s: float = 0.0
    terminating: bool = False
    unschedulable: str | None = None  # why the scheduler has no node for it (a claim with no volume yet)
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    tasks: list[asyncio.Task] = field(default_factory=list)
    written: dict = field(default_factory=dict)  # what was last sent to the API, per object kind

    def view(self) -> PodView:
        return PodView(self.name, self.template_hash, self.ready, self.terminating)


@dataclass
class Workload:
    namespace: str
    name: str
    deployment: dict
    pods: dict[str, Pod] = field(default_factory=dict)
    refused: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    conditions: dict[str, dict] = field(default_factory=dict)
    written_status: dict | None = None
    task: asyncio.Task | None = None
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)  # one writer at a time: the last write is the newest


class PodRunner:
    """`state_dir` holds the claims' directories (volumes/) and the containers' logs (pod-logs/, which the dev API
    serves as pods/log); a temporary directory when none is given."""

    def __init__(self, api_url: str, *, output=None, engine: str | None = None, max_engines: int = MAX_ENGINES,
                 state_dir: Path | None = None):
        self.api_url = api_url.rstrip("/")
        self.engine = engine or shutil.which("cxygpt-sim") or str(Path(sys.executable).parent / "cxygpt-sim")
        self.output = output  # callable(prefix, line) for engine logs
        self.max_engines = max_engines
        self.workloads: dict[tuple[str, str], Workload] = {}
        self.session: aiohttp.ClientSession | None = None
        state = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="cxygpt-pods-"))
        self.logs = state / "pod-logs"
        self.volumes = Volumes(state / "volumes", self._request)
        self.jobs = Jobs(self, self.volumes, self.logs, output=output)

    # --- API ---------------------------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, body=None, content_type="application/merge-patch+json"):
        headers = {"Content-Type": content_type} if body is not None else {}
        data = orjson.dumps(body) if body is not None else None
        async with self.session.request(method, self.api_url + path, data=data, headers=headers) as resp:
            data = await resp.read()
            if method == "DELETE" and resp.status == 404:
                return None  # gone already
            if resp.status >= 400:
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
                    self._sync(dep)
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
                            self._sync(event["object"])
            except (aiohttp.ClientError, RuntimeError, orjson.JSONDecodeError) as e:
                log.warning("deployment watch broke (%s); relisting", e)
                await asyncio.sleep(1)

    async def _watch_pod_deletions(self):
        """A Pod deleted through the API (`kubectl delete pod`) terminates gracefully; its Deployment replaces it."""
        async def handle(kind: str | None, obj: dict) -> None:
            md = obj.get("metadata", {})
            owner = next((r["name"] for r in md.get("ownerReferences", []) if r.get("kind") == "Deployment"), None)
            workload = self.workloads.get((md.get("namespace"), owner))
            pod = workload.pods.get(md.get("name")) if workload else None
            if pod and md.get("deletionTimestamp") and not pod.terminating:
                self._begin_termination(workload, pod)
                workload.changed.set()

        await follow(self.session, self.api_url + "/api/v1/pods?labelSelector=pod-template-hash&watch=true", handle,
                     "pod")

    def _begin_termination(self, workload: Workload, pod: Pod):
        pod.terminating = True
        pod.tasks.append(asyncio.create_task(self._terminate(workload, pod)))

    @staticmethod
    def _key(obj: dict) -> tuple[str, str]:
        return obj["metadata"]["namespace"], obj["metadata"]["name"]

    # --- the Deployment controller ---------------------------------------------------------------------------------

    def _sync(self, dep: dict):
        key = self._key(dep)
        workload = self.workloads.get(key)
        if workload is None:
            workload = self.workloads[key] = Workload(*key, deployment=dep)
            workload.task = asyncio.create_task(self._control(workload))
        workload.deployment = dep
        workload.changed.set()

    def _engines(self) -> int:
        return sum(len(w.pods) for w in self.workloads.values())

    async def _control(self, workload: Workload):
        """Reconcile on every change of the Deployment or of one of its pods."""
        while True:
            await workload.changed.wait()
            workload.changed.clear()
            try:
                await self._reconcile(workload)
            except (RuntimeError, aiohttp.ClientError) as e:
                log.warning("%s/%s: reconcile failed (%s); retrying", workload.namespace, workload.name, e)
                await asyncio.sleep(1)
                workload.changed.set()

    async def _reconcile(self, workload: Workload):
        spec = workload.deployment["spec"]
        template = spec["template"]
        digest = template_hash(template)
        capacity = max(0, self.max_engines - self._engines())
        step = rollout_step([p.view() for p in workload.pods.values()], spec.get("replicas", 1), digest,
                            strategy_of(spec), capacity)
        workload.refused = step.refused
        if step.start or step.terminate:
            log.info("%s/%s: start %d, terminate %s (pods: %s)", workload.namespace, workload.name, step.start,
                     ", ".join(step.terminate) or "none",
                     ", ".join(f"{p.name}{'+' if p.ready else '-'}{'~' if p.terminating else ''}"
                               for p in workload.pods.values()))
        for name in step.terminate:
            self._begin_termination(workload, workload.pods[name])
        for _ in range(step.start):
            name = f"{workload.name}-{digest}-{''.join(secrets.choice(_ALNUM) for _ in range(5))}"
            pod = workload.pods[name] = Pod(name, digest, template)
            pod.tasks.append(asyncio.create_task(self._keep_running(workload, pod)))
        await self._publish(workload)

    async def _remove(self, key):
        workload = self.workloads.pop(key, None)
        if workload:
            workload.task.cancel()
            # the Deployment's pods go with it, gracefully: what the engines serve finishes first (their Service
            # and endpoints are already gone, so nothing new arrives)
            try:
                await asyncio.gather(*(self._drain_and_stop(workload, pod) for pod in list(workload.pods.values())))
            finally:  # cancelled mid-drain (Ctrl-C): no longer in self.workloads, so stop_all would miss them
                await asyncio.gather(*(stop_group(pod.process, 2.0) for pod in list(workload.pods.values())))
            log.info("%s/%s: deployment gone, engines stopped", *key)

    # --- kubelet ------------------------------------------------------------------------------------------------------

    async def _keep_running(self, workload: Workload, pod: Pod):
        """Start the engine, probe its health like a readiness probe, restart it (with back-off) when it exits."""
        container = pod.template["spec"]["containers"][0]
        try:
            await self._write_pod(workload, pod, create=True)
        except (RuntimeError, aiohttp.ClientError) as e:
            log.warning("%s/%s: pod %s not written: %s", workload.namespace, workload.name, pod.name, e)
        mapping = await self._mounts(workload, pod, container)
        if mapping is None:
            return
        env = {**os.environ, **{e["name"]: rewrite(e.get("value", ""), mapping) for e in container.get("env", [])},
               MOUNTS_ENV: json.dumps(mapping, sort_keys=True)}
        log_file = self.logs / workload.namespace / pod.name / f"{container.get('name', 'engine')}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        while not pod.terminating:
            pod.port = free_port()
            argv = rewrite_all(engine_argv(container, pod.port, self.engine), mapping)
            pod.process = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
                start_new_session=True)
            pod.started_at, pod.backoff_s = _now(), 0.0
            log.info("%s/%s: started engine %s on 127.0.0.1:%d (pid %d)", workload.namespace, workload.name,
                     pod.name, pod.port, pod.process.pid)
            await self._report(workload, pod)

            def emit(line, label=pod.name):
                pod.tail.append(line)
                with open(log_file, "a") as f:  # kubelet's log file, served as pods/log
                    f.write(line + "\n")
                if self.output:
                    self.output(label, line)

            pump = asyncio.create_task(forward_lines(pod.process, emit))
            probe = asyncio.create_task(self._probe(workload, pod))
            pod.tasks += [pump, probe]
            code = await pod.process.wait()
            probe.cancel()
            await pump
            pod.tasks = [t for t in pod.tasks if t not in (pump, probe)]
            pod.ready = False
            if pod.terminating:
                return
            exit_code = code if code >= 0 else 128 - code  # killed by a signal: 128 + its number, as kubelet says
            pod.last_exit = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                             "message": tail_message(pod.tail), "startedAt": pod.started_at, "finishedAt": _now()}
            pod.backoff_s = RESTART_BACKOFF_S[min(pod.exits, len(RESTART_BACKOFF_S) - 1)]
            pod.exits += 1
            log.warning("%s/%s: engine %s exited with %s; restart %d in %ss", workload.namespace, workload.name,
                        pod.name, exit_code, pod.exits, pod.backoff_s)
            await self._report(workload, pod)
            await asyncio.sleep(pod.backoff_s)

    async def _mounts(self, workload: Workload, pod: Pod, container: dict) -> dict[str, str] | None:
        """The pod's volumes on this machine; while a claim has no volume the pod is Pending and unschedulable, as
        the scheduler leaves it. None when the pod is terminated meanwhile."""
        while not pod.terminating:
            try:
                mapping = await self.volumes.mounts(workload.namespace, pod.name, pod.template["spec"], container)
            except Unbound as e:
                if pod.unschedulable != str(e):
                    pod.unschedulable = str(e)
                    await self._report(workload, pod)
                await asyncio.sleep(1)
                continue
            except (RuntimeError, aiohttp.ClientError) as e:
                log.warning("%s/%s: pod %s volumes not read: %s", workload.namespace, workload.name, pod.name, e)
                await asyncio.sleep(1)
                continue
            pod.unschedulable = None
            return mapping
        return None

    async def _probe(self, workload: Workload, pod: Pod):
        url = f"http://127.0.0.1:{pod.port}/health"
        while True:
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    ready = resp.status == 200
            except (TimeoutError, aiohttp.ClientError):
                ready = False
            if ready != pod.ready:
                pod.ready = ready
                await self._report(workload, pod)
            await asyncio.sleep(2 if ready else 0.2)

    async def _report(self, workload: Workload, pod: Pod | None = None):
        """A pod changed: kubelet writes its status (and the endpoint follows) first, then the controller
        reconsiders, as in a cluster: a new pod is Ready in the API before an old one is terminated."""
        if self.workloads.get((workload.namespace, workload.name)) is workload:
            if pod is not None:
                await self._publish(workload, only=pod)
            workload.changed.set()

    async def _terminate(self, workload: Workload, pod: Pod):
        """Kubelet's graceful termination: out of the endpoints at once, the preStop sleep (over as soon as the
        engine has nothing running or waiting), SIGTERM, SIGKILL once the grace period is over."""
        # the API server marks a deleted pod (deletionTimestamp); the finalizer keeps it until the engine stopped
        await self._delete(f"/api/v1/namespaces/{workload.namespace}/pods/{pod.name}")
        await self._publish(workload, only=pod)
        await self._drain_and_stop(workload, pod)
        await self._report(workload)

    async def _drain_and_stop(self, workload: Workload, pod: Pod):
        """The preStop sleep, over as soon as the engine has nothing running or waiting; then the stop."""
        pod.terminating = True  # an engine that exits now is not restarted
        spec = pod.template["spec"]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        lifecycle = spec["containers"][0].get("lifecycle") or {}
        drain = min(((lifecycle.get("preStop") or {}).get("sleep") or {}).get("seconds", 0), grace)
        began = time.monotonic()
        deadline = began + drain
        while time.monotonic() < deadline and pod.process and pod.process.returncode is None:
            if await self._idle(pod):
                break
            await asyncio.sleep(0.2)
        log.info("%s/%s: engine %s drained in %.1fs; stopping", workload.namespace, workload.name, pod.name,
                 time.monotonic() - began)
        await self._stop(workload, pod, grace_s=max(2.0, grace - (time.monotonic() - began)))

    async def _idle(self, pod: Pod) -> bool:
        try:
            async with self.session.get(f"http://127.0.0.1:{pod.port}/metrics",
                                        timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 200 and requests_in_flight(await resp.text()) == 0
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return False

    async def _stop(self, workload: Workload, pod: Pod, grace_s: float = 10):
        pod.terminating = True
        current = asyncio.current_task()
        for task in pod.tasks:
            if task is not current:
                task.cancel()
        await stop_group(pod.process, grace_s)
        self.volumes.forget_pod(workload.namespace, pod.name)
        shutil.rmtree(self.logs / workload.namespace / pod.name, ignore_errors=True)
        async with workload.writing:  # no write of this pod may come after its deletion (apply would recreate it)
            workload.pods.pop(pod.name, None)
            await self._delete(f"/apis/discovery.k8s.io/v1/namespaces/{workload.namespace}/endpointslices/{pod.name}")
            path = f"/api/v1/namespaces/{workload.namespace}/pods/{pod.name}"
            if await self._delete(path):  # not gone already (a deleted Deployment takes its pods along)
                try:
                    await self._request("PATCH", path, {"metadata": {"finalizers": None}})
                except (RuntimeError, aiohttp.ClientError) as e:
                    log.warning("%s: finalizer not removed: %s", path, e)

    async def _delete(self, path: str) -> bool:
        """DELETE; whether the object was still there."""
        try:
            return await self._request("DELETE", path) is not None
        except (RuntimeError, aiohttp.ClientError) as e:
            log.warning("%s not deleted: %s", path, e)
            return False

    async def stop_all(self):
        """Every engine at once (Ctrl-C must not wait for one drain after another)."""
        workloads = list(self.workloads.values())
        self.workloads.clear()
        for workload in workloads:
            workload.task.cancel()
        await asyncio.gather(*(self._stop(w, p, grace_s=5) for w in workloads for p in list(w.pods.values())))

    # --- objects: Pods, EndpointSlices, Deployment status -------------------------------------------------------------

    def _pod_object(self, workload: Workload, pod: Pod) -> dict:
        dep = workload.deployment
        labels = {**(pod.template.get("metadata", {}).get("labels") or {}), "pod-template-hash": pod.template_hash}
        container = pod.template["spec"]["containers"][0]
        running = pod.process is not None and pod.process.returncode is None
        if running:
            state = {"running": {"startedAt": pod.started_at}}
        elif pod.exits >= 2:
            state = {"waiting": {"reason": "CrashLoopBackOff", "message": (
                f"back-off {pod.backoff_s:g}s restarting failed container=engine pod={pod.name}")}}
        elif pod.last_exit:
            state = {"terminated": pod.last_exit}
        else:
            state = {"waiting": {"reason": "ContainerCreating"}}
        ready = "True" if pod.ready and not pod.terminating else "False"
        scheduled = ({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": f"0/1 nodes are available: {pod.unschedulable}."} if pod.unschedulable
                     else {"type": "PodScheduled", "status": "True"})
        status = {
            "phase": "Running" if pod.started_at else "Pending", "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
            "conditions": [scheduled, {"type": "Ready", "status": ready}, {"type": "ContainersReady", "status": ready}],
            "containerStatuses": [{
                "name": container.get("name", "engine"), "image": container.get("image", ""),
                "ready": ready == "True", "started": running, "restartCount": max(0, pod.exits - (not running)),
                "state": state, **({"lastState": {"terminated": pod.last_exit}} if pod.last_exit else {})}]}
        metadata = {"name": pod.name, "namespace": workload.namespace, "labels": labels,
                    "finalizers": [POD_FINALIZER],
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": workload.name,
                                         "uid": dep["metadata"].get("uid", ""), "controller": True,
                                         "blockOwnerDeletion": True}]}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod.template["spec"], "status": status}

    async def _write_pod(self, workload: Workload, pod: Pod, create: bool = False):
        body = self._pod_object(workload, pod)
        path = f"/api/v1/namespaces/{workload.namespace}/pods"
        if create:
            created = await self._request("POST", path, body)
            pod.uid = created["metadata"]["uid"]
            pod.written["pod"] = body
        elif pod.written.get("pod") != body and pod.uid:
            if pod.written.get("pod", {}).get("metadata") != body["metadata"]:
                await self._request("PATCH", f"{path}/{pod.name}", {"metadata": body["metadata"]})
            await self._request("PATCH", f"{path}/{pod.name}/status", {"status": body["status"]})
            pod.written["pod"] = body

    async def _publish(self, workload: Workload, only: Pod | None = None):
        async with workload.writing:
            await self._write_all(workload, only)

    async def _write_all(self, workload: Workload, only: Pod | None):
        ns, name = workload.namespace, workload.name
        try:
            services = (await self._request("GET", f"/api/v1/namespaces/{ns}/services")).get("items", [])
        except RuntimeError as e:
            log.warning("%s/%s: services not read: %s", ns, name, e)
            services = []
        # what adds capacity is written before what removes it
        for pod in [only] if only else sorted(workload.pods.values(), key=lambda p: p.terminating):
            if pod.name not in workload.pods:
                continue
            try:  # a pod being removed meanwhile is no reason to leave the others unwritten
                await self._write_pod(workload, pod)
                if pod.port:
                    await self._put_slice(workload, pod, services)
            except RuntimeError as e:
                log.warning("%s/%s: pod %s not written: %s", ns, name, pod.name, e)
        if only:
            return
        try:
            await self._write_status(workload)
        except RuntimeError as e:
            log.warning("%s/%s: status not written: %s", ns, name, e)

    def _condition(self, workload: Workload, kind: str, status: bool, reason: str, message: str) -> dict:
        """A Deployment condition whose lastTransitionTime moves only when its status does."""
        before = workload.conditions.get(kind)
        value = "True" if status else "False"
        changed = before is None or before["status"] != value
        now = _now()
        condition = {"type": kind, "status": value, "reason": reason, "message": message,
                     "lastTransitionTime": now if changed else before["lastTransitionTime"],
                     "lastUpdateTime": now if changed or before["reason"] != reason else before["lastUpdateTime"]}
        workload.conditions[kind] = condition
        return condition

    async def _write_status(self, workload: Workload):
        dep = workload.deployment
        spec = dep["spec"]
        desired = spec.get("replicas", 1)
        digest = template_hash(spec["template"])
        live = [p for p in workload.pods.values() if not p.terminating]
        updated = [p for p in live if p.template_hash == digest]
        ready = sum(p.ready for p in live)
        min_available = desired - strategy_of(spec).max_unavailable
        complete = len(updated) == desired == len(live) and sum(p.ready for p in updated) == desired
        conditions = [
            self._condition(workload, "Available", ready >= min_available,
                            "MinimumReplicasAvailable" if ready >= min_available else "MinimumReplicasUnavailable",
                            "Deployment has minimum availability." if ready >= min_available
                            else "Deployment does not have minimum availability."),
            self._condition(workload, "Progressing", True,
                            "NewReplicaSetAvailable" if complete else "ReplicaSetUpdated",
                            f'ReplicaSet "{workload.name}-{digest}" has successfully progressed.' if complete
                            else f'ReplicaSet "{workload.name}-{digest}" is progressing.'),
        ]
        if workload.refused:
            conditions.append(self._condition(
                workload, "ReplicaFailure", True, "FailedCreate",
                f"{workload.refused} of {desired} replicas refused: cxygpt-dev runs at most {self.max_engines} engine "
                f"processes on this machine (cxygpt-dev up --max-engines)"))
        else:
            workload.conditions.pop("ReplicaFailure", None)
        status = {"observedGeneration": dep["metadata"].get("generation", 1), "replicas": len(live),
                  "updatedReplicas": len(updated), "readyReplicas": ready, "availableReplicas": ready,
                  "unavailableReplicas": max(0, max(desired, len(live)) - ready),
                  "terminatingReplicas": len(workload.pods) - len(live), "conditions": conditions}
        comparable = {**status, "conditions": [{k: v for k, v in c.items() if not k.startswith("last")}
                                                for c in conditions]}
        if comparable != workload.written_status:
            # a merge patch replaces lists whole: a condition that no longer holds disappears
            await self._request("PATCH", f"/apis/apps/v1/namespaces/{workload.namespace}/deployments/{workload.name}"
                                "/status", {"status": status})
            workload.written_status = comparable

    async def _put_slice(self, workload: Workload, pod: Pod, services: list[dict]):
        """One EndpointSlice per pod: every engine shares 127.0.0.1 and differs by port."""
        labels = pod.template.get("metadata", {}).get("labels") or {}
        for svc in services:
            selector = svc.get("spec", {}).get("selector") or {}
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                break
        else:
            return
        body = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": pod.name, "namespace": workload.namespace,
                         # the EndpointSlice controller copies the Service's labels onto its slices
                         "labels": {**(svc["metadata"].get("labels") or {}),
                                    "kubernetes.io/service-name": svc["metadata"]["name"],
                                    "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": svc["metadata"]["name"],
                                              "uid": svc["metadata"]["uid"]}]},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"],
                           "conditions": {"ready": pod.ready and not pod.terminating, "serving": pod.ready,
                                          "terminating": pod.terminating},
                           "targetRef": {"kind": "Pod", "name": pod.name, "namespace": workload.namespace,
                                         "uid": pod.uid}}],
            "ports": [{"name": "http", "port": pod.port, "protocol": "TCP"}],
        }
        if pod.written.get("slice") != body:
            await self._request("PATCH", f"/apis/discovery.k8s.io/v1/namespaces/{workload.namespace}/endpointslices/"
                                f"{pod.name}?fieldManager={SLICE_MANAGER}&force=true", body,
                                content_type="application/apply-patch+yaml")
            pod.written["slice"] = body

    async def run(self):
        async with aiohttp.ClientSession() as self.session:
            helpers = [asyncio.create_task(self._watch_pod_deletions()),
                       asyncio.create_task(self.volumes.watch(self.session, self.api_url)),
                       asyncio.create_task(self.jobs.watch(self.session, self.api_url))]
            try:
                await self._watch_deployments()
            finally:
                for task in helpers:
                    task.cancel()
                await self.jobs.stop_all()
                await self.stop_all()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cxygpt_dev.podrunner", description=__doc__)
    ap.add_argument("--api", required=True, help="the Kubernetes API's URL")
    ap.add_argument("--max-engines", type=int, default=MAX_ENGINES)
    ap.add_argument("--state-dir", type=Path, help="claims' directories and containers' logs (default a temporary one)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    run_until_signalled(PodRunner(a.api, max_engines=a.max_engines, state_dir=a.state_dir).run())


if __name__ == "__main__":
    main()
