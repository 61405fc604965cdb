"""A whole cluster on this machine: the real control plane, our kubelets (one process per simulated GPU node) and
the add-ons (storage provisioner, Services' proxy and DNS), on the dev cluster's private network."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import network
from .certs import write_kubeconfig
from .controlplane import Component, ControlPlane, ControlPlaneError
from .kubelet import Node, node_from_kind
from .provisioner import rbac, storage_class

REPO = Path(__file__).resolve().parents[2]
NODE_READY_TIMEOUT_S = 60.0


def kind_nodes(plan: network.Plan, path: Path = REPO / "kind-config.yaml") -> list[Node]:
    """The GPU workers of kind-config.yaml, named as kind names them, at the plan's first node addresses."""
    config = yaml.safe_load(path.read_text())
    workers = [n for n in config.get("nodes", []) if n.get("role") == "worker"]
    name = config.get("name", "kind")
    return [node_from_kind(worker, f"{name}-worker{i + 1 if i else ''}", plan.node(i))
            for i, worker in enumerate(workers)]


@dataclass
class Cluster:
    """`nodes` default to kind-config.yaml's GPU workers; `plan` sets its addresses apart from any other cluster
    of this process."""
    root: Path
    nodes: list[Node] | None = None
    plan: network.Plan = field(default_factory=network.next_plan)
    kubelets: dict[str, Component] = field(default_factory=dict)
    addons: Component | None = None
    plane: ControlPlane | None = None
    api_port: int | None = None

    def __post_init__(self):
        self.nodes = list(self.nodes) if self.nodes is not None else kind_nodes(self.plan)

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        out = subprocess.run([str(Path(sys.executable).parent / "kubectl"), "--kubeconfig", str(self.kubeconfig),
                              *args], input=stdin, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def start(self) -> Cluster:
        network.enter_private_network()
        network.add_address(self.plan.host)
        self.root = Path(self.root)
        self.plane = ControlPlane(address=self.plan.host, root=self.root / "control-plane",
                                  cluster_cidr=self.plan.cluster_cidr, service_cidr=self.plan.service_cidr,
                                  api_port=self.api_port)
        try:
            self.plane.start()
            self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([storage_class(), *rbac(), {
                # kube-dns's address taken, as a cluster's DNS Service holds it (the DNS answers there)
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": "kube-dns", "namespace": "kube-system"},
                "spec": {"clusterIP": self.plan.dns, "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53,
                                                                     "protocol": "TCP"}]}}]))
            self._start_addons()
            for node in list(self.nodes):
                self._start_kubelet(node)
            for node in self.nodes:
                self.wait_node_ready(node.name)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_addons(self) -> None:
        plane = self.plane
        provisioner = plane.issue("provisioner", "system:cxygpt-dev:local-directory-provisioner", client=True)
        proxy = plane.issue("kube-proxy", "system:kube-proxy", client=True)
        self.addons = Component("addons", [sys.executable, "-m", "cxygpt_dev.addons", "--server", plane.url,
                                           "--ca", str(plane.ca.pair.cert),
                                           "--provisioner", str(provisioner.cert), str(provisioner.key),
                                           "--proxy", str(proxy.cert), str(proxy.key),
                                           "--volumes", str(self.root / "volumes"), "--dns", self.plan.dns],
                                self.root / "addons.log")
        self.addons.start()

    def _start_kubelet(self, node: Node) -> None:
        plane = self.plane
        client = plane.issue(f"kubelet-{node.name}", f"system:node:{node.name}", organizations=("system:nodes",),
                             client=True)
        serving = plane.issue(f"kubelet-{node.name}-serving", node.name, hosts=(node.address, node.name), server=True)
        kubelet = Component(f"kubelet {node.name}", [
            sys.executable, "-m", "cxygpt_dev.kubelet", "--server", plane.url, "--ca", str(plane.ca.pair.cert),
            "--client", str(client.cert), str(client.key), "--serving", str(serving.cert), str(serving.key),
            "--node", json.dumps(node.__dict__), "--state-dir", str(self.root / "nodes" / node.name),
            "--dns", self.plan.dns],
            self.root / f"kubelet-{node.name}.log")
        kubelet.start()
        self.kubelets[node.name] = kubelet

    def add_node(self, node: Node, wait: bool = True) -> Node:
        self.nodes.append(node)
        self._start_kubelet(node)
        if wait:
            self.wait_node_ready(node.name)
        return node

    def wait_node_ready(self, name: str, timeout: float = NODE_READY_TIMEOUT_S) -> None:
        """Ready as the scheduler sees it: the Ready condition, and the not-ready taint the node lifecycle controller
        takes off."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            kubelet = self.kubelets[name]
            if kubelet.process.poll() is not None:
                raise ControlPlaneError(f"kubelet of {name} exited:\n{kubelet.tail()}")
            try:
                node = json.loads(self.kubectl("get", "node", name, "-o", "json"))
            except ControlPlaneError as e:
                last = str(e)
            else:
                ready = any(c["type"] == "Ready" and c["status"] == "True"
                            for c in (node.get("status") or {}).get("conditions") or [])
                taints = [t["key"] for t in (node.get("spec") or {}).get("taints") or []]
                if ready and "node.kubernetes.io/not-ready" not in taints:
                    return
                last = f"ready={ready} taints={taints}"
            time.sleep(0.2)
        raise ControlPlaneError(f"node {name} not Ready in {timeout:.0f}s ({last}):\n{self.kubelets[name].tail()}")

    def user_kubeconfig(self, path: Path, namespace: str, service_account: str, duration: str = "24h") -> Path:
        """A kubeconfig with a token of a ServiceAccount (TokenRequest), to run a process as that account."""
        token = self.kubectl("create", "token", service_account, "-n", namespace, f"--duration={duration}").strip()
        return write_kubeconfig(path, self.plane.url, self.plane.ca.pair.cert,
                                user=f"system:serviceaccount:{namespace}:{service_account}", token=token)

    def logs(self) -> str:
        parts = [self.plane.logs()] if self.plane else []
        parts += [f"--- {c.name}:\n{c.tail()}" for c in [self.addons, *self.kubelets.values()] if c]
        return "\n".join(parts)

    def stop(self) -> None:
        """The kubelets first (they stop their pods), then the add-ons and the control plane."""
        for kubelet in self.kubelets.values():
            kubelet.stop(grace_s=20)
        self.kubelets.clear()
        if self.addons:
            self.addons.stop()
        if self.plane:
            self.plane.stop()
