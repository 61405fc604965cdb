"""Our kubelet: one simulated GPU node on the real API server. It registers the node (GPU Feature Discovery labels,
`nvidia.com/gpu` capacity), keeps it Ready (node status and its Lease), runs the pods the scheduler binds to it as
local processes (each pod in network and mount namespaces of its own, on an address of the node's pod CIDR), reports
their status, runs their probes, preStop hooks and grace periods, and serves their logs to the API server."""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import ssl
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from . import network
from .certs import Pair
from .containers import Run, local_program, now, probe_once, requests_in_flight
from .network import DEV_CLUSTER_MARK
from .podvolumes import CannotStart, PodVolumes
from .processes import run_until_signalled
from .volumes import MOUNTS_ENV, rewrite, rewrite_all
from .watching import follow

log = logging.getLogger("cxygpt.kubelet")
KUBELET_PORT = 10250
LEASE_DURATION_S = 40
LEASE_RENEW_S = 10            # kubelet renews its Lease every quarter of its duration
STATUS_REPORT_S = 60          # and reports the node's status at least this often
# restart back-off after a container exits: kubelet's doubles from 10 s to 5 min; ours is shorter so a fixed engine
# is back within seconds (the README says so)
RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
# node resources besides the GPUs: a GPU server's (every node is this machine, so they only feed the scheduler)
NODE_CPU, NODE_MEMORY, NODE_PODS = "64", "512Gi", "110"


class NotFound(LookupError):
    """The API answered 404."""


@dataclass
class Node:
    name: str
    labels: dict[str, str]
    address: str
    gpus: int = 0
    # other extended resources, as a device plugin advertises them (e.g. MIG slices: {"nvidia.com/mig-3g.40gb": "2"})
    resources: dict[str, str] = field(default_factory=dict)
    taints: list[dict] = field(default_factory=list)  # registered with them, as kubelet's --register-with-taints

    def object(self) -> dict:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.name, "labels": {
            "kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
            **self.labels}}, **({"spec": {"taints": self.taints}} if self.taints else {})}

    def status(self, version: str) -> dict:
        capacity = {"cpu": NODE_CPU, "memory": NODE_MEMORY, "pods": NODE_PODS, "ephemeral-storage": "1Ti",
                    **({"nvidia.com/gpu": str(self.gpus)} if self.gpus else {}), **self.resources}
        stamp = now()
        conditions = [{"type": kind, "status": "False", "reason": f"KubeletHasNo{kind}", "message": "",
                       "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
                      for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "kubelet is posting ready status", "lastHeartbeatTime": stamp,
                           "lastTransitionTime": stamp})
        return {"capacity": capacity, "allocatable": capacity, "conditions": conditions,
                "addresses": [{"type": "InternalIP", "address": self.address},
                              {"type": "Hostname", "address": self.name}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
                "nodeInfo": {"machineID": uuid.uuid5(uuid.NAMESPACE_DNS, self.name).hex, "systemUUID":
                             str(uuid.uuid5(uuid.NAMESPACE_URL, self.name)), "bootID": str(uuid.uuid4()),
                             "kernelVersion": os.uname().release, "osImage": "cxygpt-dev",
                             "containerRuntimeVersion": "cxygpt-dev://local-processes", "kubeletVersion": version,
                             "kubeProxyVersion": version, "operatingSystem": "linux", "architecture": "amd64"}}


def node_from_kind(worker: dict, name: str, address: str) -> Node:
    """A node like one of kind-config.yaml's GPU workers (its labels; the GPU count from GFD's label)."""
    labels = {str(k): str(v) for k, v in (worker.get("labels") or {}).items()}
    return Node(name, labels, address, int(labels.get("nvidia.com/gpu.count", "0")))


def _micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Container:
    spec: dict
    init: bool = False
    run: Run | None = None
    runs: int = 0                      # how many times it was started (restartCount = runs - 1)
    ready: bool = False
    started: bool = False              # the startup probe passed (or there is none)
    waiting: tuple[str, str] = ("ContainerCreating", "")
    last: dict | None = None           # lastState.terminated
    done: dict | None = None           # state.terminated when it will not run again
    task: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self, pod_uid: str) -> dict:
        if self.done:
            state = {"terminated": self.done}
        elif self.run and self.run.running:
            state = {"running": {"startedAt": self.run.started_at}}
        else:
            reason, message = self.waiting
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        image = self.spec.get("image", "")
        return {"name": self.name, "image": image, "imageID": f"cxygpt-dev://{image}",
                **({"containerID": f"cxygpt-dev://{pod_uid}/{self.name}/{self.runs}"} if self.runs else {}),
                "ready": self.ready, "started": bool(self.run and self.run.running and self.started),
                "restartCount": max(0, self.runs - 1), "state": state,
                "lastState": {"terminated": self.last} if self.last else {}}


class PodWorker:
    """One pod bound to this node, from its sandbox to its deletion."""

    def __init__(self, kubelet: Kubelet, pod: dict):
        self.kubelet, self.pod = kubelet, pod
        self.uid = pod["metadata"]["uid"]
        self.key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        self.sandbox: network.Sandbox | None = None
        self.containers = {c["name"]: Container(c) for c in pod["spec"]["containers"]}
        self.init = [Container(c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.initialized = not self.init
        self.started_at: str | None = None
        self.phase = "Pending"
        self.terminating = asyncio.Event()
        self.changed = asyncio.Event()
        self.written: dict | None = None
        self.transitions: dict[str, tuple[bool, str]] = {}  # condition → (status, since when)
        self.task = asyncio.create_task(self._live())
        self.reporter = asyncio.create_task(self._report_changes())

    @property
    def namespace(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    # --- status ------------------------------------------------------------------------------------------------------

    def status(self) -> dict:
        ready = all(c.ready for c in self.containers.values()) and self.phase == "Running"
        # readiness gates: Ready also waits for each gate's condition, which someone else sets in the pod's status
        conditions = (self.pod.get("status") or {}).get("conditions") or []
        gates_open = all(any(c.get("type") == gate.get("conditionType") and c.get("status") == "True"
                             for c in conditions) for gate in self.pod["spec"].get("readinessGates") or [])
        stamp = now()

        def condition(kind: str, value: bool, reason: str = "") -> dict:
            # its lastTransitionTime moves only when its status does
            since = self.transitions.get(kind)
            if since is None or since[0] != value:
                since = self.transitions[kind] = (value, stamp)
            return {"type": kind, "status": "True" if value else "False",
                    **({"reason": reason} if reason and not value else {}), "lastProbeTime": None,
                    "lastTransitionTime": since[1]}

        status = {"phase": self.phase, "hostIP": self.kubelet.node.address,
                  "hostIPs": [{"ip": self.kubelet.node.address}],
                  "conditions": [condition("PodReadyToStartContainers", self.sandbox is not None),
                                 condition("Initialized", self.initialized, "ContainersNotInitialized"),
                                 condition("ContainersReady", ready, "ContainersNotReady"),
                                 condition("Ready", ready and gates_open,
                                           "ContainersNotReady" if not ready else "ReadinessGatesNotReady")],
                  "containerStatuses": [c.status(self.uid) for c in self.containers.values()]}
        if self.init:
            status["initContainerStatuses"] = [c.status(self.uid) for c in self.init]
        if self.sandbox:
            status["podIP"], status["podIPs"] = self.sandbox.address, [{"ip": self.sandbox.address}]
        if self.started_at:
            status["startTime"] = self.started_at
        return status

    def report(self) -> None:
        self.changed.set()

    async def _report_changes(self) -> None:
        """Writes the status when it changed (a condition's lastTransitionTime moves only when its status does)."""
        while True:
            await self.changed.wait()
            self.changed.clear()
            status = self.status()
            comparable = status
            if comparable == self.written:
                continue
            try:
                await self.kubelet.request("PATCH", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
                                           {"status": status}, STRATEGIC)
                self.written = comparable
            except NotFound:
                return
            except (RuntimeError, aiohttp.ClientError) as e:
                log.warning("%s: status not written: %s", self.key, e)
                await asyncio.sleep(1)
                self.changed.set()

    # --- life -------------------------------------------------------------------------------------------------------

    async def _live(self) -> None:
        kubelet = self.kubelet
        try:
            self.sandbox = await kubelet.network.create()
            self.started_at = now()
            self.report()
            volumes = await self._volumes()
            if volumes is None:
                return
            await self._service_account_mount(volumes)
            for container in self.init:
                if not await self._run_to_completion(container, volumes):
                    self.phase = "Failed"
                    self.report()
                    return
            self.initialized = True
            for container in self.containers.values():
                container.task = asyncio.create_task(self._keep_running(container, volumes))
            await asyncio.gather(*(c.task for c in self.containers.values()))
            if not self.terminating.is_set():
                failed = any(c.done and c.done["exitCode"] for c in self.containers.values())
                self.phase = "Failed" if failed else "Succeeded"
                self.report()
                await self._release()
        except (network.NetworkError, RuntimeError, aiohttp.ClientError) as e:
            log.warning("%s: cannot run: %s", self.key, e)
            await kubelet.event(self.pod, "Warning", "FailedCreatePodSandBox", str(e))
        except Exception:
            log.exception("%s: the pod's worker failed", self.key)
            raise

    async def _volumes(self) -> dict[str, Path] | None:
        shown = None
        while not self.terminating.is_set():
            try:
                return await self.kubelet.volumes.prepare(self.pod)
            except (CannotStart, RuntimeError, aiohttp.ClientError) as e:
                # a 403 too: the node authorizer learns of a pod's Secrets and ConfigMaps a little after its binding
                reason, message = (e.reason, e.message) if isinstance(e, CannotStart) else ("ContainerCreating", str(e))
                if shown != message:
                    shown = message
                    for c in self.containers.values():
                        c.waiting = (reason, message)
                    self.report()
                    await self.kubelet.event(self.pod, "Warning", "FailedMount", message)
            await asyncio.sleep(1)
        return None

    async def _service_account_mount(self, volumes: dict[str, Path]) -> None:
        """The token volume at its real path in the pod's mount namespace: clients read that fixed path; and the
        cluster's DNS in /etc/resolv.conf."""
        mounts = {}
        for container in self.containers.values():
            for mount in container.spec.get("volumeMounts") or []:
                if mount["mountPath"] == SERVICE_ACCOUNT_DIR:
                    mounts[SERVICE_ACCOUNT_DIR] = str(volumes[mount["name"]])
        resolv = self.kubelet.volumes.pod_dir(self.pod) / "resolv.conf"
        resolv.parent.mkdir(parents=True, exist_ok=True)
        resolv.write_text(f"nameserver {self.kubelet.dns}\nsearch {self.namespace}.svc.cluster.local "
                          "svc.cluster.local cluster.local\noptions ndots:5\n")
        mounts["/etc/resolv.conf"] = str(resolv)
        await self.sandbox.mount(mounts)

    async def _command(self, container: Container, volumes: dict[str, Path]) -> tuple[list[str], dict[str, str],
                                                                                      Path]:
        """The container's command line and environment on this machine: its paths made local (every mount but the
        token's, which is mounted at its own path)."""
        spec = container.spec
        mapping = PodVolumes.mounts(spec, volumes)
        mapping.pop(SERVICE_ACCOUNT_DIR, None)
        termination = self.kubelet.volumes.pod_dir(self.pod) / "termination" / spec["name"]
        termination.parent.mkdir(parents=True, exist_ok=True)
        termination.write_text("")
        mapping[spec.get("terminationMessagePath", "/dev/termination-log")] = str(termination)
        env = {k: rewrite(v, mapping) for k, v in (await self.kubelet.volumes.env(self.pod, spec)).items()}
        command = list(spec.get("command") or [])
        if not command:
            raise CannotStart("CreateContainerConfigError", "no command: this node runs no images, only their "
                              "programs (set the container's command)")
        argv = [local_program(command[0]), *rewrite_all(command[1:] + list(spec.get("args") or []), mapping)]
        # of this machine's environment only what a container image would set, and the dev cluster's mark
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", DEV_CLUSTER_MARK)}
        environment = {**base, "HOSTNAME": self.name, **self.kubelet.service_env, **env,
                       MOUNTS_ENV: json.dumps(mapping, sort_keys=True)}
        return self.sandbox.enter(argv), environment, termination

    def _log_file(self, container: Container) -> Path:
        return self.kubelet.logs / self.namespace / self.name / container.name / f"{container.runs}.log"

    async def _start(self, container: Container, volumes: dict[str, Path]) -> bool:
        while not self.terminating.is_set():
            try:
                argv, env, termination = await self._command(container, volumes)
                break
            except CannotStart as e:
                if container.waiting != (e.reason, e.message):
                    container.waiting = (e.reason, e.message)
                    self.report()
                await asyncio.sleep(1)
        else:
            return False
        container.runs += 1
        output = self.kubelet.output
        container.run = Run(argv, env, self._log_file(container), termination,
                            output=(lambda line, label=f"{self.name}/{container.name}": output(label, line))
                            if output else None)
        await container.run.start()
        container.done, container.started = None, "startupProbe" not in container.spec
        if not container.init:
            self.phase = "Running"
        log.info("%s: container %s started (pid %d) on %s", self.key, container.name, container.run.process.pid,
                 self.sandbox.address)
        self.report()
        return True

    async def _run_to_completion(self, container: Container, volumes: dict[str, Path]) -> bool:
        """An init container: until it succeeds (restartPolicy Never: once)."""
        while await self._start(container, volumes):
            code = await container.run.wait()
            terminated = container.run.terminated(code)
            if code == 0:
                container.done = terminated
                self.report()
                return True
            container.last = terminated
            if self.pod["spec"].get("restartPolicy", "Always") == "Never":
                container.done = terminated
                self.report()
                return False
            await self._back_off(container)
        return False

    async def _keep_running(self, container: Container, volumes: dict[str, Path]) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        while await self._start(container, volumes):
            probes = asyncio.create_task(self._probe(container))
            code = await container.run.wait()
            probes.cancel()
            container.ready = False
            terminated = container.run.terminated(
                code, fallback_to_logs=container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError")
            if self.terminating.is_set() or policy == "Never" or (policy == "OnFailure" and code == 0):
                container.done = terminated
                self.report()
                return
            container.last = terminated
            log.warning("%s: container %s exited with %d; restart %d", self.key, container.name, code, container.runs)
            await self._back_off(container)

    async def _back_off(self, container: Container) -> None:
        delay = RESTART_BACKOFF_S[min(container.runs - 1, len(RESTART_BACKOFF_S) - 1)]
        reason = "CrashLoopBackOff" if container.runs >= 2 else "Error"
        container.waiting = (reason, f"back-off {delay:g}s restarting failed container={container.name} "
                                     f"pod={self.name}_{self.namespace}({self.uid})")
        self.report()
        if container.runs >= 2:
            await self.kubelet.event(self.pod, "Warning", "BackOff", "Back-off restarting failed container "
                                     f"{container.name} in pod {self.name}_{self.namespace}({self.uid})")
        try:
            await asyncio.wait_for(self.terminating.wait(), delay)
        except TimeoutError:
            pass

    async def exec(self, argv: list[str]) -> int:
        process = await asyncio.create_subprocess_exec(
            *self.sandbox.enter([local_program(argv[0]), *argv[1:]]), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        try:
            return await process.wait()
        except asyncio.CancelledError:
            process.kill()
            raise

    async def _probe(self, container: Container) -> None:
        """The startup probe until it passes, then liveness and readiness, each on its own period, as kubelet's
        probe workers do (a first try at once)."""
        spec = container.spec
        if "startupProbe" in spec:
            if not await self._probe_loop(container, spec["startupProbe"], "Startup", until_success=True):
                return
            container.started = True
            self.report()
        loops = [self._probe_loop(container, spec["livenessProbe"], "Liveness")] if "livenessProbe" in spec else []
        if "readinessProbe" in spec:
            loops.append(self._probe_loop(container, spec["readinessProbe"], "Readiness"))
        else:
            container.ready = True
            self.report()
        await asyncio.gather(*loops)

    async def _probe_loop(self, container: Container, probe: dict, kind: str, until_success: bool = False) -> bool:
        period = probe.get("periodSeconds", 10)
        successes = failures = 0
        await asyncio.sleep(probe.get("initialDelaySeconds", 0))
        while container.run and container.run.running:
            ok, why = await probe_once(probe, container.spec, self.sandbox.address, self.kubelet.session, self.exec)
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if kind == "Readiness":
                ready = successes >= probe.get("successThreshold", 1) or (container.ready and ok)
                if failures >= probe.get("failureThreshold", 3):
                    ready = False
                if ready != container.ready:
                    container.ready = ready
                    self.report()
            elif ok and until_success:
                return True
            elif not ok and failures >= probe.get("failureThreshold", 3):
                await self.kubelet.event(self.pod, "Warning", "Unhealthy", f"{kind} probe failed: {why}")
                await self.kubelet.event(self.pod, "Normal", "Killing", f"Container {container.name} failed "
                                         f"{kind.lower()} probe, will be restarted")
                await container.run.stop(self._grace())
                return False
            if not ok and kind != "Startup":
                await self.kubelet.event(self.pod, "Warning", "Unhealthy", f"{kind} probe failed: {why}")
            await asyncio.sleep(period)
        return False

    def _grace(self) -> float:
        md = self.pod["metadata"]
        grace = md.get("deletionGracePeriodSeconds")
        return float(grace if grace is not None else self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    # --- termination -----------------------------------------------------------------------------------------------

    def update(self, pod: dict) -> None:
        self.pod = pod
        self.report()  # a readiness gate's condition may have changed
        if pod["metadata"].get("deletionTimestamp") and not self.terminating.is_set():
            self.terminating.set()
            asyncio.create_task(self._terminate())

    async def _terminate(self) -> None:
        """kubelet's graceful termination: not ready at once, the preStop hooks, SIGTERM, SIGKILL when the grace
        period is over; then the pod's namespaces go and the pod is deleted for good."""
        began, grace = time.monotonic(), self._grace()
        for c in self.containers.values():
            c.ready = False
        self.report()
        running = [c for c in self.containers.values() if c.run and c.run.running]
        if running:
            await self.kubelet.event(self.pod, "Normal", "Killing", "Stopping container " +
                                     ", ".join(c.name for c in running))
        await asyncio.gather(*(self._stop(c, began + grace) for c in running))
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        for c in self.containers.values():
            if c.run and not c.done:
                c.done = c.run.terminated(c.run.process.returncode or 0)
        await self._release()
        try:
            await self.kubelet.request("DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}", {
                "kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                "preconditions": {"uid": self.uid}}, "application/json")
        except NotFound:
            pass
        except (RuntimeError, aiohttp.ClientError) as e:
            log.warning("%s: not deleted: %s", self.key, e)
        log.info("%s: terminated in %.1fs", self.key, time.monotonic() - began)
        self.kubelet.forget(self.uid)

    async def _stop(self, container: Container, deadline: float) -> None:
        hook = (container.spec.get("lifecycle") or {}).get("preStop") or {}
        try:
            await asyncio.wait_for(self._pre_stop(container, hook), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            pass
        await container.run.stop(max(2.0, deadline - time.monotonic()))

    async def _pre_stop(self, container: Container, hook: dict) -> None:
        if "exec" in hook:
            await self.exec(hook["exec"]["command"])
        elif "httpGet" in hook:
            await probe_once({"httpGet": hook["httpGet"], "timeoutSeconds": 30}, container.spec,
                             self.sandbox.address, self.kubelet.session, self.exec)
        elif "sleep" in hook:
            # a difference from kubelet, which sleeps it whole: over as soon as an engine's /metrics shows nothing
            # running or waiting (its drain is done), so a rollout here takes seconds, not minutes
            end = time.monotonic() + hook["sleep"]["seconds"]
            while time.monotonic() < end and container.run.running:
                if await self._engine_idle(container):
                    return
                await asyncio.sleep(0.2)

    async def _engine_idle(self, container: Container) -> bool:
        ports = [p["containerPort"] for p in container.spec.get("ports") or []]
        if not ports:
            return False
        try:
            async with self.kubelet.session.get(f"http://{self.sandbox.address}:{ports[0]}/metrics",
                                                timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 200 and requests_in_flight(await resp.text()) == 0
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return False

    async def _release(self) -> None:
        if self.sandbox:
            await self.kubelet.network.release(self.sandbox)
        self.kubelet.volumes.forget(self.pod)

    async def kill(self) -> None:
        """Gone from the API without a grace period (a forced delete, or the node stopping): stop at once."""
        self.terminating.set()
        self.task.cancel()
        await asyncio.gather(*(c.run.stop(2.0) for c in [*self.init, *self.containers.values()] if c.run))
        await asyncio.gather(self.task, return_exceptions=True)
        self.reporter.cancel()
        await self._release()


class Kubelet:
    def __init__(self, *, server: str, ca: Path, client: Pair, serving: Pair, node: Node, state_dir: Path, dns: str,
                 output=None, api_server_client: str = "kube-apiserver-kubelet-client"):
        self.server, self.ca, self.client, self.serving, self.node = server.rstrip("/"), ca, client, serving, node
        self.dns = dns  # the nameserver of the pods' resolv.conf
        self.state = Path(state_dir)
        self.logs = self.state / "logs"
        self.volumes = PodVolumes(self.request, self.state / "pods")
        self.output = output
        self.api_server_client = api_server_client
        self.pods: dict[str, PodWorker] = {}
        self.session: aiohttp.ClientSession | None = None
        self.network: network.PodNetwork | None = None
        self.service_env: dict[str, str] = {}
        self.version = "v0.0.0"

    # --- API -------------------------------------------------------------------------------------------------------

    async def request(self, method: str, path: str, body=None, content_type: str = "application/json"):
        data = None if body is None else orjson.dumps(body)
        async with self.session.request(method, self.server + path, data=data,
                                        headers={"Content-Type": content_type} if data else {}) as resp:
            payload = await resp.read()
            if resp.status == 404:
                raise NotFound(f"{method} {path}")
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {payload[:300]!r}")
            return orjson.loads(payload) if payload else None

    async def event(self, pod: dict, kind: str, reason: str, message: str) -> None:
        md = pod["metadata"]
        stamp = now()
        try:
            await self.request("POST", f"/api/v1/namespaces/{md['namespace']}/events", {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{md['name']}.", "namespace": md["namespace"]},
                "involvedObject": {"kind": "Pod", "namespace": md["namespace"], "name": md["name"], "uid": md["uid"],
                                   "apiVersion": "v1"},
                "reason": reason, "message": message[:1024], "type": kind, "count": 1,
                "source": {"component": "kubelet", "host": self.node.name}, "reportingComponent": "kubelet",
                "reportingInstance": self.node.name, "firstTimestamp": stamp, "lastTimestamp": stamp})
        except (RuntimeError, LookupError, aiohttp.ClientError) as e:
            log.info("event %s not posted: %s", reason, e)

    def _client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client.cert), str(self.client.key))
        return context

    # --- the node --------------------------------------------------------------------------------------------------

    async def _register(self) -> dict:
        self.version = (await self.request("GET", "/version"))["gitVersion"]
        try:
            await self.request("POST", "/api/v1/nodes", self.node.object())
        except RuntimeError as e:
            if " 409 " not in str(e):
                raise
            # a node may not change its own taints (NodeRestriction): its labels only
            await self.request("PATCH", f"/api/v1/nodes/{self.node.name}",
                               {"metadata": self.node.object()["metadata"]}, MERGE)
        node = await self.request("PATCH", f"/api/v1/nodes/{self.node.name}/status",
                                  {"status": self.node.status(self.version)}, STRATEGIC)
        log.info("node %s registered (%s, %d GPU)", self.node.name, self.node.address, self.node.gpus)
        return node

    async def _lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node.name}"
        node = await self.request("GET", f"/api/v1/nodes/{self.node.name}")
        try:
            await self.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node.name, "namespace": "kube-node-lease", "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": self.node.name, "uid": node["metadata"]["uid"]}]},
                "spec": {"holderIdentity": self.node.name, "leaseDurationSeconds": LEASE_DURATION_S,
                         "renewTime": _micro_now()}})
        except RuntimeError as e:
            if " 409 " not in str(e):
                raise
        reported = time.monotonic()
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                await self.request("PATCH", path, {"spec": {"renewTime": _micro_now()}}, MERGE)
                if time.monotonic() - reported > STATUS_REPORT_S:
                    await self.request("PATCH", f"/api/v1/nodes/{self.node.name}/status",
                                       {"status": self.node.status(self.version)}, STRATEGIC)
                    reported = time.monotonic()
            except (RuntimeError, LookupError, aiohttp.ClientError) as e:
                log.warning("node %s: heartbeat failed: %s", self.node.name, e)

    async def _pod_cidr(self) -> str:
        """The node's pod CIDR, once the controller-manager has given it one."""
        while True:
            node = await self.request("GET", f"/api/v1/nodes/{self.node.name}")
            if cidr := (node.get("spec") or {}).get("podCIDR"):
                return cidr
            await asyncio.sleep(0.2)

    async def _kubernetes_service(self) -> dict[str, str]:
        """The API server as every container finds it (KUBERNETES_SERVICE_HOST/PORT): the `kubernetes` Service."""
        service = await self.request("GET", "/api/v1/namespaces/default/services/kubernetes")
        host, port = service["spec"]["clusterIP"], service["spec"]["ports"][0]["port"]
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": str(port),
                "KUBERNETES_SERVICE_PORT_HTTPS": str(port), "KUBERNETES_PORT": f"tcp://{host}:{port}",
                f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}", f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
                f"KUBERNETES_PORT_{port}_TCP_PORT": str(port), f"KUBERNETES_PORT_{port}_TCP_ADDR": host}

    # --- pods --------------------------------------------------------------------------------------------------------

    async def _handle(self, kind: str | None, pod: dict) -> None:
        uid = (pod.get("metadata") or {}).get("uid")
        worker = self.pods.get(uid)
        if kind == "DELETED":
            if worker:
                self.pods.pop(uid, None)
                await worker.kill()
            return
        if kind not in ("ADDED", "MODIFIED"):
            return
        if worker:
            worker.update(pod)
        elif (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            if pod["metadata"].get("deletionTimestamp"):  # never started here: nothing to stop
                await self.request("DELETE", f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/"
                                   f"{pod['metadata']['name']}", {"kind": "DeleteOptions", "apiVersion": "v1",
                                                                  "gracePeriodSeconds": 0})
                return
            self.pods[uid] = PodWorker(self, pod)

    def forget(self, uid: str) -> None:
        worker = self.pods.pop(uid, None)
        if worker:
            worker.reporter.cancel()

    # --- the kubelet's server: logs --------------------------------------------------------------------------------

    def _server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.serving.cert), str(self.serving.key))
        context.verify_mode = ssl.CERT_REQUIRED  # only the API server's client certificate
        return context

    def _authorized(self, request: web.Request) -> bool:
        peer = request.transport.get_extra_info("peercert") or {}
        names = [v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"]
        return names == [self.api_server_client]

    def _find(self, namespace: str, name: str) -> PodWorker | None:
        return next((w for w in self.pods.values() if w.namespace == namespace and w.name == name), None)

    async def _container_logs(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=403, text="Forbidden")
        ns, name, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        worker = self._find(ns, name)
        c = worker and (worker.containers.get(container) or next((i for i in worker.init if i.name == container),
                                                                 None))
        if c is None or not c.runs:
            return web.Response(status=404, text=f"container {container!r} of pod {ns}/{name} has no logs here")
        q = request.query
        previous = q.get("previous") == "true"
        if previous and c.runs < 2:
            return web.Response(status=400, text=f'previous terminated container "{container}" in pod "{name}" '
                                "not found")
        path = worker.kubelet.logs / ns / name / container / f"{c.runs - 1 if previous else c.runs}.log"
        lines = path.read_text(errors="replace").splitlines(keepends=True) if path.exists() else []
        if q.get("sinceSeconds"):
            since = (datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=int(q["sinceSeconds"])))
            lines = [line for line in lines if datetime.datetime.fromisoformat(line.split(" ", 1)[0]) >= since]
        if q.get("tailLines"):
            lines = lines[len(lines) - int(q["tailLines"]):] if int(q["tailLines"]) else []
        stamps = q.get("timestamps") == "true"
        limit = int(q["limitBytes"]) if q.get("limitBytes") else None

        def shown(line: str) -> bytes:
            return (line if stamps else line.split(" ", 1)[1] if " " in line else line).encode()

        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        sent = 0
        body = b"".join(shown(line) for line in lines)
        if limit is not None:
            body = body[:limit]
        await response.write(body)
        sent += len(body)
        if q.get("follow") == "true" and not previous:
            offset = path.stat().st_size if path.exists() else 0
            run = c.run
            while limit is None or sent < limit:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset += len(chunk)
                if chunk:
                    out = b"".join(shown(line) for line in chunk.decode(errors="replace").splitlines(keepends=True))
                    await response.write(out)
                    sent += len(out)
                elif not (run and run.running) or c.run is not run:
                    break
                else:
                    await asyncio.sleep(0.2)
        await response.write_eof()
        return response

    async def _serve(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._container_logs)
        app.router.add_get("/healthz", lambda _: web.Response(text="ok"))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.node.address, KUBELET_PORT, ssl_context=self._server_context()).start()
        return runner

    # --- running -----------------------------------------------------------------------------------------------------

    async def run(self, ready: asyncio.Event | None = None) -> None:
        network.add_address(self.node.address)
        connector = aiohttp.TCPConnector(ssl=self._client_context(), limit=0)
        async with aiohttp.ClientSession(connector=connector) as self.session:
            await self._register()
            self.service_env = await self._kubernetes_service()
            self.network = network.PodNetwork(self.node.address, await self._pod_cidr())
            server = await self._serve()
            tasks = [asyncio.create_task(self._lease()),
                     asyncio.create_task(follow(self.session, f"{self.server}/api/v1/pods?fieldSelector="
                                                f"spec.nodeName%3D{self.node.name}&watch=true", self._handle,
                                                f"{self.node.name} pods", errors=(RuntimeError, LookupError)))]
            if ready:
                ready.set()
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*(w.kill() for w in list(self.pods.values())), return_exceptions=True)
                await server.cleanup()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cxygpt_dev.kubelet", description=__doc__)
    ap.add_argument("--server", required=True, help="the API server's URL")
    ap.add_argument("--ca", required=True, type=Path, help="the cluster's CA certificate")
    ap.add_argument("--client", nargs=2, required=True, type=Path, metavar=("CERT", "KEY"),
                    help="the node's client certificate (system:node:<name> in system:nodes)")
    ap.add_argument("--serving", nargs=2, required=True, type=Path, metavar=("CERT", "KEY"),
                    help="the kubelet server's certificate (for the node's address)")
    ap.add_argument("--node", required=True, type=json.loads,
                    help='the node as JSON: {"name": ..., "labels": {...}, "address": ..., "gpus": N}')
    ap.add_argument("--state-dir", required=True, type=Path, help="pods' volumes and containers' logs")
    ap.add_argument("--dns", required=True, help="the cluster DNS's address, the pods' nameserver")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    network.enter_private_network()  # already in it when started by the dev cluster (inherited)
    kubelet = Kubelet(server=a.server, ca=a.ca, client=Pair(*a.client), serving=Pair(*a.serving),
                      node=Node(**a.node), state_dir=a.state_dir, dns=a.dns,
                      output=lambda label, line: print(f"[{label}] {line}", flush=True))

    run_until_signalled(kubelet.run())


if __name__ == "__main__":
    main()
