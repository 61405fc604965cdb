"""`cxygpt-dev`: the whole system on one machine — Kubernetes API, operator, engines, gateway — no cluster, no GPU.
`--control-plane real` runs it on the real control plane (`make kube`) with our kubelets, in a network of its own."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from cxygpt_operator.autoscaling.policy import DEFAULT_INTERVAL_S

from . import network
from .certs import write_kubeconfig as write_tls_kubeconfig
from .cluster import Cluster
from .controlplane import ControlPlaneError, free_port
from .kubeapi import write_kubeconfig
from .podrunner import MAX_ENGINES, PodRunner
from .processes import forward_lines, stop_group
from .volumes import default_storage_class

REPO = Path(__file__).resolve().parents[2]
CHART, CHART_RELEASE = Path("deploy/helm/cxygpt"), "cxygpt"  # the real cluster runs the chart
BIN = Path(sys.executable).parent
STATE_DIR = Path(".cxygpt-dev")
GROUP_PATH = "/apis/cxygpt.io/v1alpha1/modeldeployments"
# the gateway as the operator's autoscaler finds it in a cluster: a Service with one ready endpoint (the process)
GATEWAY_SERVICE = ("default", "cxygpt-gateway")
CONSOLE_PORT = 8090  # the console's, when --console-port is not given and it is free (else any free port)
DETACH_READY_S = 240


def tool(name: str) -> str:
    """A console script of this environment (the venv's), else one on PATH."""
    local = BIN / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def shown(path) -> str:
    """A path as a printed command should show it: relative to the working directory when under it."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def port_taken(port: int) -> bool:
    """Whether a server listens on 127.0.0.1:port. A port that only TIME-WAIT sockets of a stopped run hold is
    free: with SO_REUSEADDR (as the gateway binds) only a listening socket refuses the bind."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def console_port(args) -> int:
    """--console-port, else CONSOLE_PORT when it is free, else any free port (parallel runs do not collide)."""
    return args.console_port or (CONSOLE_PORT if not port_taken(CONSOLE_PORT) else free_port())


def check_ports(args) -> None:
    """Fail before starting anything when a fixed port is taken (e.g. by another `cxygpt-dev up`)."""
    if port_taken(args.gateway_port):
        raise SystemExit(f"cxygpt-dev: 127.0.0.1:{args.gateway_port} (the gateway's port) is in use, e.g. by another "
                         "`cxygpt-dev up` (`cxygpt-dev down` stops a detached one); choose another with --gateway-port")
    if args.console_port is not None and port_taken(args.console_port):
        raise SystemExit(f"cxygpt-dev: 127.0.0.1:{args.console_port} (the console's port) is in use; choose another "
                         "with --console-port")


class Output:
    """Every component's lines in one log file, prefixed by component; the terminal shows cxygpt-dev's own lines (what
    started, what is Ready, where to look), and the components' too with --verbose."""

    def __init__(self, log_file: Path, verbose: bool = False):
        self.file = open(log_file, "a", buffering=1)
        self.verbose = verbose

    def __call__(self, component: str, line: str):
        text = f"[{component}] {line}"
        self.file.write(text + "\n")
        if self.verbose:
            print(text, flush=True)

    def say(self, line: str = ""):
        self.file.write(line + "\n")
        print(line, flush=True)


class OutputHandler(logging.Handler):
    """Python log records (the pod runner's) into the same prefixed output."""

    def __init__(self, out: Output, component: str):
        super().__init__()
        self.out, self.component = out, component

    def emit(self, record):
        self.out(self.component, self.format(record))


class Component:
    """A child process whose output is prefixed and which stops with the cluster."""

    def __init__(self, name: str, argv: list[str], out: Output, env: dict | None = None):
        self.name, self.argv, self.out, self.env = name, argv, out, env
        self.process: asyncio.subprocess.Process | None = None

    async def start(self):
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(self.env or {})}, start_new_session=True)
        self._pump = asyncio.create_task(forward_lines(self.process, lambda line: self.out(self.name, line)))

    async def stop(self):
        await stop_group(self.process)


async def wait_http(session: aiohttp.ClientSession, url: str, what: str, component: Component | None = None,
                    timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if component and component.process.returncode is not None:
            raise SystemExit(f"cxygpt-dev: {what} exited with {component.process.returncode} (its lines are in the log "
                             "file)")
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"cxygpt-dev: {what} did not answer at {url} within {timeout:.0f}s")


def settled(model: dict) -> bool:
    """A ModelDeployment that will not change by itself soon: Ready, Failed, at zero, or Pending because the
    scheduler has no node for its engines."""
    status = model.get("status") or {}
    available = next((c for c in status.get("conditions") or [] if c.get("type") == "Available"), {})
    return status.get("phase") in ("Ready", "Failed", "ScaledToZero") or (
        status.get("phase") == "Pending" and available.get("reason") == "Unschedulable")


def gpu_nodes_from_kind_config(path: Path) -> list[dict]:
    """The GPU workers of kind-config.yaml as Node objects (one source for both clusters)."""
    config = yaml.safe_load(path.read_text())
    workers = [n for n in config.get("nodes", []) if n.get("role") == "worker"]
    name = config.get("name", "kind")
    return [{"apiVersion": "v1", "kind": "Node",
             "metadata": {"name": f"{name}-worker{i + 1 if i else ''}", "labels": node.get("labels", {})},
             "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
            for i, node in enumerate(workers)]


class Forwards:
    """The real cluster's doors in the network cxygpt-dev was started in: the gateway's port, the API server's, the
    Hub's and the console's, listening there before cxygpt-dev moves to the cluster's own network, each passed on to
    an address there (the gateway Service's, the API server's, the Hub's, the console Service's)."""

    def __init__(self, gateway_port: int, console_port: int):
        self.sockets = {}
        for port in (gateway_port, 0, 0, console_port):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen(128)
            s.setblocking(False)
            self.sockets[s.getsockname()[1]] = s
        self.gateway_port, self.api_port, self.hub_port, self.console_port = list(self.sockets)
        self.servers: list[asyncio.base_events.Server] = []

    async def start(self, port: int, host: str, target_port: int):
        self.servers.append(await asyncio.start_server(
            lambda r, w: network.relay(r, w, host, target_port), sock=self.sockets[port]))

    def close(self):
        for server in self.servers:
            server.close()


class DevCluster:
    def __init__(self, args: argparse.Namespace, forwards: Forwards | None = None):
        self.args = args
        self.state = Path(args.state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        self.out = Output(self.state / "cxygpt-dev.log", verbose=args.verbose)
        self.kubeconfig = Path(args.kubeconfig or self.state / "kubeconfig").resolve()
        logging.getLogger("cxygpt.pods").addHandler(OutputHandler(self.out, "pods"))
        self.components: list[Component] = []
        self.runner: PodRunner | None = None
        self.runner_task: asyncio.Task | None = None
        self.forwards = forwards
        self.real: Cluster | None = None
        # where the components reach the API and each other (the cluster's network with the real control plane)
        self.internal_kubeconfig = self.kubeconfig
        self.api_ssl: ssl.SSLContext | bool = True
        self.host = "127.0.0.1"
        self.operator_metrics: int | None = None

    async def _start(self, name: str, argv: list[str], health: str, session, env=None) -> Component:
        component = Component(name, argv, self.out, env)
        await component.start()
        self.components.append(component)
        await wait_http(session, health, name, component)
        self.out.say(f"cxygpt-dev: {name} started")
        return component

    async def _start_in_memory(self, session) -> str:
        """The in-memory API, its GPU nodes and StorageClass; the pod runner starts once the operator runs."""
        api_port = free_port()
        api_url = f"http://127.0.0.1:{api_port}"
        await self._start("Kubernetes API (in memory)", [
            sys.executable, "-m", "cxygpt_dev.kubeapi", "--port", str(api_port), "--preload",
            str(REPO / "deploy" / "crds"), "--pod-logs", str((self.state / "pod-logs").resolve())],
            api_url + "/version", session)
        write_kubeconfig(self.kubeconfig, api_url)
        for node in gpu_nodes_from_kind_config(REPO / "kind-config.yaml"):
            async with session.post(api_url + "/api/v1/nodes", json=node) as resp:
                resp.raise_for_status()
        async with session.post(api_url + "/apis/storage.k8s.io/v1/storageclasses",
                                json=default_storage_class()) as resp:
            resp.raise_for_status()
        return api_url

    async def _start_real(self) -> str:
        """The real control plane, our kubelets of kind-config.yaml's GPU nodes and the add-ons, in this process's
        network; a kubeconfig for the user through the forwarded API port."""
        root = (self.state / "cluster").resolve()
        shutil.rmtree(root, ignore_errors=True)  # a stopped run's certificates and logs
        self.real = Cluster(root=root, api_port=self.forwards.api_port)
        await self.forwards.start(self.forwards.api_port, self.real.plan.host, self.forwards.api_port)
        began = time.monotonic()
        try:
            await asyncio.to_thread(self.real.start)
        except ControlPlaneError as e:
            raise SystemExit(f"cxygpt-dev: the real control plane did not start: {e}") from None
        plane = self.real.plane
        self.out.say(f"cxygpt-dev: Kubernetes {self._server_version()} (etcd, kube-apiserver, kube-controller-manager, "
                     f"kube-scheduler) and {len(self.real.nodes)} GPU nodes up in {time.monotonic() - began:.0f} s; "
                     f"their logs in {shown(root)}")
        write_tls_kubeconfig(self.kubeconfig, f"https://127.0.0.1:{self.forwards.api_port}", plane.ca.pair.cert,
                             user="cxygpt-dev-admin", client=plane.admin)
        self.internal_kubeconfig = plane.kubeconfig
        self.api_ssl = ssl.create_default_context(cafile=str(plane.ca.pair.cert))
        self.api_ssl.load_cert_chain(str(plane.admin.cert), str(plane.admin.key))
        self.host = self.real.plan.host
        return plane.url

    async def _install_chart(self, hub: str) -> str:
        """The chart, as `helm install --wait` puts it on a cluster: its CRD, the operator and the gateway as pods
        under their ServiceAccounts (the chart's RBAC enforced), the gateway's Service; the forwarded gateway port
        leads to that Service."""
        helm = tool("helm") if shutil.which("helm") or (BIN / "helm").exists() else str(REPO / ".tools/bin/helm")
        values = {"operator.hfEndpoint": hub, "modelAutoscaling.intervalSeconds": self.args.autoscale_interval,
                  "console.enabled": True}
        for env, value in (("CXYGPT_DEMAND_WINDOW_S", "gateway.demandWindowSeconds"),
                           ("CXYGPT_COLD_START_TIMEOUT_S", "gateway.coldStartTimeoutSeconds")):
            if os.environ.get(env):  # as the in-memory run's gateway process takes them
                values[value] = float(os.environ[env])
        argv = [helm, "--kubeconfig", str(self.internal_kubeconfig), "install", CHART_RELEASE, str(REPO / CHART),
                "--namespace", CHART_RELEASE, "--create-namespace", "--wait", "--timeout", "180s",
                # JSON values: numbers stay numbers (`--set` makes 2.5 a string)
                *[a for k, v in values.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]]
        began = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        output, _ = await proc.communicate()
        for line in output.decode(errors="replace").splitlines():
            self.out("helm", line)
        if proc.returncode != 0:
            raise SystemExit(f"cxygpt-dev: helm install of the chart failed (its output is in the log file): "
                             f"{output.decode(errors='replace').strip().splitlines()[-1:]}")
        service = json.loads(await asyncio.to_thread(self.real.kubectl, "get", "service", "cxygpt-gateway", "-n",
                                                     CHART_RELEASE, "-o", "json"))
        await self.forwards.start(self.forwards.gateway_port, service["spec"]["clusterIP"],
                                  service["spec"]["ports"][0]["port"])
        console = json.loads(await asyncio.to_thread(self.real.kubectl, "get", "service", "cxygpt-console", "-n",
                                                     CHART_RELEASE, "-o", "json"))
        await self.forwards.start(self.forwards.console_port, console["spec"]["clusterIP"],
                                  console["spec"]["ports"][0]["port"])
        self.out.say(f"cxygpt-dev: helm installed the chart (release {CHART_RELEASE}: the CRD, the operator, the "
                     f"gateway and the console as pods) in {time.monotonic() - began:.0f} s")
        return f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"

    def _server_version(self) -> str:
        return json.loads(self.real.kubectl("version", "-o", "json"))["serverVersion"]["gitVersion"]

    async def up(self, stop: asyncio.Event):
        a = self.args
        async with aiohttp.ClientSession() as session:
            api_url = await (self._start_real() if self.forwards else self._start_in_memory(session))
            hub_port = self.forwards.hub_port if self.real else free_port(self.host)
            hub = f"http://{self.host}:{hub_port}"
            # the Hub the download Jobs and the engines use: the tests' repositories, and a stand-in for each
            # model of the catalog
            hub_argv = [sys.executable, "-m", "cxygpt_dev.hub", "--root", str((self.state / "hub").resolve()),
                        "--host", self.host, "--port", str(hub_port),
                        "--catalog-stand-ins", str(a.hub_stand_in_mib_per_gib)]
            hub_argv += ["--rate-mib-s", str(a.hub_rate_mib_s)] if a.hub_rate_mib_s else []
            await self._start("hub", hub_argv, hub + "/health", session)
            if self.real:
                await self.forwards.start(hub_port, self.host, hub_port)
            if self.real:
                inside = await self._install_chart(hub)
            else:
                inside = await self._start_processes(session, api_url, hub)
            gateway = f"http://127.0.0.1:{a.gateway_port}"
            if self.real:  # the chart's console, under its own ServiceAccount, through its forwarded port
                console = f"http://127.0.0.1:{self.forwards.console_port}"
            else:
                port = console_port(a)
                console = f"http://127.0.0.1:{port}"
                await self._start("console", [tool("cxygpt-console"), "--kubeconfig", str(self.kubeconfig),
                                              "--gateway-url", gateway, "--gateway-service", "/".join(GATEWAY_SERVICE),
                                              "--host", "127.0.0.1", "--port", str(port)],
                                  console + "/healthz", session)
            self._print_next_steps(gateway, console)
            if not a.no_examples:
                await self._apply_examples()
                await self._wait_ready(session, api_url, stop)
                if not stop.is_set():
                    await self._first_chat(session, inside)
            self.out.say("cxygpt-dev: up. Ctrl-C (or `cxygpt-dev down`) stops everything; every component's lines "
                         f"are in {shown(self.state / 'cxygpt-dev.log')}.")
            (self.state / "ready").write_text(json.dumps({
                "gateway": gateway, "kubeconfig": str(self.kubeconfig),
                "hub": f"http://127.0.0.1:{hub_port}" if self.real else hub,
                "api": f"https://127.0.0.1:{self.forwards.api_port}" if self.real else api_url,
                "hub_root": str((self.state / "hub").resolve()), "console": console,
                "control_plane": "real" if self.real else "in-memory",
                **({"operator_metrics": f"http://127.0.0.1:{self.operator_metrics}/metrics"}
                   if self.operator_metrics else {})}))
            await stop.wait()

    async def _start_processes(self, session, api_url: str, hub: str) -> str:
        """The operator, the pod runner and the gateway as processes of this machine, with the admin's kubeconfig;
        the gateway's Service and EndpointSlice. The gateway's URL."""
        a = self.args
        op_port, self.operator_metrics = free_port(), free_port()
        await self._start("operator", [tool("cxygpt-operator"), "--kubeconfig", str(self.internal_kubeconfig),
                                       "--liveness", f"http://127.0.0.1:{op_port}/healthz",
                                       "--metrics-host", "127.0.0.1", "--metrics-port", str(self.operator_metrics),
                                       "--hf-endpoint", hub,
                                       "--gateway-service", "/".join(GATEWAY_SERVICE),
                                       "--autoscale-interval", str(a.autoscale_interval)],
                          f"http://127.0.0.1:{op_port}/healthz", session)
        # the in-memory API's kubelet and controllers
        self.runner = PodRunner(api_url, output=lambda label, line: self.out(f"engine {label}", line),
                                max_engines=a.max_engines, state_dir=self.state.resolve())
        self.runner_task = asyncio.create_task(self.runner.run())
        gateway = f"http://127.0.0.1:{a.gateway_port}"
        await self._start("gateway", [tool("cxygpt-gateway"), "--kubernetes", "--kubeconfig",
                                      str(self.internal_kubeconfig), "--host", "127.0.0.1", "--port",
                                      str(a.gateway_port)], gateway + "/healthz", session)
        await self._publish_gateway(session, api_url, a.gateway_port)
        return gateway

    async def _publish_gateway(self, session, api_url: str, port: int):
        """The gateway's Service and EndpointSlice, as a cluster has them: the autoscaler reads demand there."""
        namespace, name = GATEWAY_SERVICE
        labels = {"app.kubernetes.io/name": "cxygpt", "app.kubernetes.io/component": "gateway"}
        address = self.host
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace,
                                                                      "labels": labels},
                   "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port, "protocol": "TCP"}]}}
        slice_ = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                  "metadata": {"name": f"{name}-local", "namespace": namespace,
                               "labels": {**labels, "kubernetes.io/service-name": name,
                                          "endpointslice.kubernetes.io/managed-by": "cxygpt-dev"}},
                  "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                  "endpoints": [{"addresses": [address], "conditions": {"ready": True}}]}
        for path, body in ((f"/api/v1/namespaces/{namespace}/services", service),
                           (f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", slice_)):
            async with session.post(api_url + path, json=body, ssl=self.api_ssl) as resp:
                resp.raise_for_status()

    def _kubectl(self) -> str:
        return f"{shown(tool('kubectl'))} --kubeconfig {shown(self.kubeconfig)}"

    def _print_next_steps(self, gateway: str, console: str):
        k = self._kubectl()
        self.out.say("")
        self.out.say(f"cxygpt-dev: the gateway is at {gateway}; the console (fleet, GPUs, playground) at {console}. "
                     "Next:")
        self.out.say(f"  {k} apply -f {shown(REPO / 'examples')}/")
        self.out.say(f"  {k} get md -A")
        self.out.say(f"  curl -N {gateway}/v1/chat/completions -H 'Content-Type: application/json' "
                     "-d '{\"model\": \"qwen3-0.6b\", \"stream\": true, "
                     "\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'")
        self.out.say(f"  {shown(sys.executable)} -c \"import openai; "
                     f"c = openai.OpenAI(base_url='{gateway}/v1', api_key='none'); "
                     "print(c.chat.completions.create(model='qwen3-0.6b', messages=[{'role': 'user', 'content': 'Hi'}])"
                     ".choices[0].message.content)\"")
        self.out.say("")

    async def _apply_examples(self):
        argv = [tool("kubectl"), "--kubeconfig", str(self.internal_kubeconfig), "--cache-dir",
                str(self.state / "kubectl-cache"), "apply", "-f", str(REPO / "examples")]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        output, _ = await proc.communicate()
        for line in output.decode().splitlines():
            self.out("kubectl", line)
        if proc.returncode != 0:
            raise SystemExit("cxygpt-dev: applying examples/ failed (see above)")

    async def _wait_ready(self, session, api_url: str, stop: asyncio.Event, timeout: float = 120):
        """Until every model is settled (Ready, Failed, scaled to zero, or Pending on the scheduler), printing each
        change of their phases; then one line for each model that is not Ready, saying why."""
        deadline, last, items = time.monotonic() + timeout, None, []
        while time.monotonic() < deadline and not stop.is_set():
            async with session.get(api_url + GROUP_PATH, ssl=self.api_ssl) as resp:
                items = (await resp.json())["items"]
            states = {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "New") for i in items}
            line = "waiting for models: " + ", ".join(f"{n} {p}" for n, p in sorted(states.items()))
            if line != last:
                self.out.say(line)
                last = line
            if items and all(settled(i) for i in items):
                break
            await asyncio.sleep(0.25)
        else:
            if not stop.is_set():
                self.out.say(f"cxygpt-dev: not every model settled in {timeout:.0f} s; the system keeps running")
        for item in items:
            status = item.get("status") or {}
            if status.get("phase") != "Ready":
                available = next((c for c in status.get("conditions") or [] if c.get("type") == "Available"), {})
                self.out.say(f"  {item['metadata']['namespace']}/{item['metadata']['name']}: "
                             f"{status.get('phase', 'New')}: {available.get('message', '')}")

    async def _first_chat(self, session, gateway: str):
        """One streamed chat through the gateway, as a client would send it."""
        body = {"model": "qwen3-0.6b", "stream": True, "max_tokens": 24,
                "messages": [{"role": "user", "content": "Say hello to the dev cluster."}]}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            async with session.post(gateway + "/v1/chat/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=30)) as resp:
                if resp.status == 200:
                    text = []
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if line.startswith("data: ") and line != "data: [DONE]":
                            for choice in json.loads(line[6:]).get("choices", []):
                                text.append(choice.get("delta", {}).get("content") or "")
                    self.out.say(f"first streamed chat via the gateway (qwen3-0.6b): {''.join(text).strip()}")
                    return
                error = await resp.text()
            await asyncio.sleep(0.3)  # the gateway may not have discovered the engines yet
        self.out.say(f"cxygpt-dev: the first chat did not succeed: {error[:300]}")

    async def down(self):
        if self.runner_task:
            self.runner_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.runner_task
        for component in reversed(self.components):
            await component.stop()
        if self.real:
            await asyncio.to_thread(self.real.stop)
        if self.forwards:
            self.forwards.close()
        (self.state / "ready").unlink(missing_ok=True)


def _up(args) -> int:
    forwards = None
    os.environ[network.DEV_CLUSTER_MARK] = str(Path(args.state_dir).resolve())
    try:
        check_ports(args)
        if args.control_plane == "real":
            # the doors first, in the network this was started in; then a network of the cluster's own
            forwards = Forwards(args.gateway_port, console_port(args))
            network.enter_private_network(fresh=True)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 1
    except (OSError, network.NetworkError) as e:
        print(f"cxygpt-dev: the real cluster's network cannot be made here: {e}", file=sys.stderr)
        return 1
    cluster = DevCluster(args, forwards)

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(cluster.up(stop))
        waiter = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # raises what went wrong while starting
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, SystemExit):
                await task
            cluster.out.say("cxygpt-dev: stopping")
            await cluster.down()
            cluster.out.say("cxygpt-dev: stopped")

    try:
        asyncio.run(run())
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def _detach(args) -> int:
    try:
        check_ports(args)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 1
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    (state / "ready").unlink(missing_ok=True)
    argv = [sys.executable, "-m", "cxygpt_dev.main", "up", "--state-dir", str(state),
            "--gateway-port", str(args.gateway_port), "--max-engines", str(args.max_engines)]
    argv += ["--kubeconfig", args.kubeconfig] if args.kubeconfig else []
    argv += ["--console-port", str(args.console_port)] if args.console_port else []
    argv += ["--no-examples"] if args.no_examples else []
    argv += ["--verbose"] if args.verbose else []
    argv += ["--hub-rate-mib-s", str(args.hub_rate_mib_s), "--hub-stand-in-mib-per-gib",
             str(args.hub_stand_in_mib_per_gib)]
    argv += ["--autoscale-interval", str(args.autoscale_interval), "--control-plane", args.control_plane]
    with open(state / "detached.log", "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    (state / "pid").write_text(str(proc.pid))
    deadline = time.monotonic() + DETACH_READY_S
    while time.monotonic() < deadline:
        if (state / "ready").exists():
            info = json.loads((state / "ready").read_text())
            print(f"cxygpt-dev: up in the background (pid {proc.pid}), on the {info['control_plane']} control plane.")
            print(f"  gateway     {info['gateway']}  (OpenAI API at {info['gateway']}/v1)")
            print(f"  kubectl     {shown(tool('kubectl'))} --kubeconfig {shown(info['kubeconfig'])} get md -A")
            print(f"  logs        {shown(state / 'cxygpt-dev.log')}")
            print("  stop        cxygpt-dev down" + (f" --state-dir {shown(state)}" if state != STATE_DIR else ""))
            return 0
        if proc.poll() is not None:
            print(f"cxygpt-dev: exited with {proc.returncode}; see {state / 'detached.log'}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"cxygpt-dev: not ready after {DETACH_READY_S} s; still starting in the background (see "
          f"{state / 'cxygpt-dev.log'})", file=sys.stderr)
    return 1


def _down(args) -> int:
    pid_file = Path(args.state_dir) / "pid"
    if not pid_file.exists():
        print("cxygpt-dev: nothing to stop (no detached run here)")
        return 0
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink()
        print("cxygpt-dev: it had already stopped")
        return 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pid_file.unlink()
            print("cxygpt-dev: stopped")
            return 0
        time.sleep(0.2)
    print(f"cxygpt-dev: pid {pid} did not stop within 30 s", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxygpt-dev", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start everything (foreground; Ctrl-C stops)")
    up.add_argument("--gateway-port", type=int, default=8001, help="gateway port on 127.0.0.1 (default 8001)")
    up.add_argument("--console-port", type=int,
                    help=f"the console's port on 127.0.0.1 (default {CONSOLE_PORT}, or a free one when that is taken)")
    up.add_argument("--kubeconfig", help="where to write the kubeconfig (default .cxygpt-dev/kubeconfig)")
    up.add_argument("--max-engines", type=int, default=MAX_ENGINES,
                    help=f"engine processes this machine runs at most, over every model (default {MAX_ENGINES}); "
                         "more replicas are refused with a Deployment ReplicaFailure condition")
    up.add_argument("--autoscale-interval", type=float, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                    help=f"how often the operator's autoscaler decides (default {DEFAULT_INTERVAL_S:g}, the "
                         "operator's)")
    up.add_argument("--no-examples", action="store_true", help="do not apply examples/ nor send the first chat")
    up.add_argument("--hub-rate-mib-s", type=float, default=32,
                    help="the local Hub's bandwidth, shared by every download (MiB/s, default 32; 0 = unlimited)")
    up.add_argument("--hub-stand-in-mib-per-gib", type=float, default=1,
                    help="the fake weights of the catalog's models on the local Hub: MiB per GiB of the real ones "
                         "(default 1)")
    up.add_argument("--control-plane", choices=("in-memory", "real"), default="in-memory",
                    help="in-memory (default: starts at once) or real: Kubernetes' own kube-apiserver, etcd, "
                         "controller-manager and scheduler (built by `make kube`) with our kubelets, in a network "
                         "namespace of its own (needs root or user namespaces)")
    up.add_argument("--detach", action="store_true", help="run in the background; `cxygpt-dev down` stops it")
    up.add_argument("--verbose", action="store_true",
                    help="every component's lines on the terminal too (they are always in the log file)")
    down = sub.add_parser("down", help="stop a detached run")
    for p in (up, down):
        p.add_argument("--state-dir", default=str(STATE_DIR),
                       help="kubeconfig, logs and pid file (default .cxygpt-dev)")
    args = ap.parse_args(argv)
    logging.getLogger("cxygpt.pods").setLevel(logging.INFO)
    if args.command == "down":
        return _down(args)
    return _detach(args) if args.detach else _up(args)


if __name__ == "__main__":
    sys.exit(main())
