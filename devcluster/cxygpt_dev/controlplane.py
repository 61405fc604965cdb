"""A real Kubernetes control plane on this machine: etcd, kube-apiserver, kube-controller-manager and kube-scheduler
(the binaries `make kube` builds) on free ports, with their certificates, stopped with their data."""
from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .certs import Authority, Pair, service_account_keys, write_kubeconfig

REPO = Path(__file__).resolve().parents[2]
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# what kubeadm enables beyond the API server's defaults (NodeRestriction), and the check that a writer naming an
# owner with blockOwnerDeletion may update that owner's finalizers (which charts' RBAC must then grant)
ADMISSION_PLUGINS = "NodeRestriction,OwnerReferencesPermissionEnforcement"
START_TIMEOUT_S = 60.0


class ControlPlaneError(RuntimeError):
    """A component did not start: the message names it and ends with its last log lines."""


def kube_bin_dir() -> Path:
    """Where `make kube` put the binaries ($CXYGPT_KUBE_BIN overrides)."""
    if os.environ.get("CXYGPT_KUBE_BIN"):
        return Path(os.environ["CXYGPT_KUBE_BIN"])
    built = sorted((REPO / ".tools" / "kube").glob("kubernetes-*/bin/kube"))
    if not built:
        raise ControlPlaneError("no Kubernetes binaries: run `make kube` (builds them once, minutes when cold)")
    return built[-1].parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tmpfs() -> str | None:
    """etcd's data on memory when the machine has /dev/shm: fsyncs then cost nothing."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class ControlPlane:
    """`address` is where the API server listens and what it advertises (the `kubernetes` Service's endpoint): a
    loopback address is refused in endpoints, so the dev cluster's network passes its host address. `hosts` are
    extra names and addresses in the serving certificate."""
    address: str = "127.0.0.1"
    hosts: tuple[str, ...] = ()
    cluster_cidr: str | None = None  # when given, the controller-manager hands each node a /24 of it
    api_port: int | None = None      # the API server's port (default: a free one)
    service_cidr: str = "10.96.0.0/16"
    bin_dir: Path | None = None
    root: Path | None = None
    components: list[Component] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.bin_dir = Path(self.bin_dir or kube_bin_dir())
        self.own_root = self.root is None
        self.root = Path(self.root or tempfile.mkdtemp(prefix="cxygpt-kube-"))
        self.pki = self.root / "pki"
        self.api_port = self.api_port or free_port(self.address)
        self.url = f"https://{self.address}:{self.api_port}"
        self.kubeconfig = self.root / "admin.kubeconfig"
        self.etcd_dir: Path | None = None

    # --- set-up ---------------------------------------------------------------------------------------------------

    def _certificates(self) -> None:
        ca = self.ca = Authority(self.pki)
        self.serving = ca.issue("apiserver", "kube-apiserver", server=True, hosts=(
            # the `kubernetes` Service's cluster IP: the first of the range
            "127.0.0.1", "localhost", self.address, str(ipaddress.ip_network(self.service_cidr)[1]), "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", *self.hosts))
        self.kubelet_client = ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                       organizations=("system:masters",), client=True)
        self.admin = ca.issue("admin", "cxygpt-dev-admin", organizations=("system:masters",), client=True)
        self.sa = service_account_keys(self.pki)
        # the front proxy (the aggregation layer's client) has a CA of its own, as kubeadm makes it
        self.front_proxy_ca = Authority(self.pki / "front-proxy", "front-proxy-ca")
        self.front_proxy = self.front_proxy_ca.issue("front-proxy-client", "front-proxy-client", client=True)
        for user in ("kube-controller-manager", "kube-scheduler"):
            pair = ca.issue(user, f"system:{user}", client=True)
            write_kubeconfig(self.root / f"{user}.kubeconfig", self.url, ca.pair.cert, user=f"system:{user}",
                             client=pair)
        write_kubeconfig(self.kubeconfig, self.url, ca.pair.cert, user="cxygpt-dev-admin", client=self.admin)

    def issue(self, name: str, common_name: str, **kw) -> Pair:
        """Another certificate from the cluster's CA (a kubelet's client and serving certificates)."""
        return self.ca.issue(name, common_name, **kw)

    def _argv(self, command: str, *flags: str) -> list[str]:
        return [str(self.bin_dir / command), *flags]

    def _components(self) -> list[tuple[Component, str, bool]]:
        """(component, health URL, whether the URL needs the admin's client certificate)."""
        etcd_port, peer_port = free_port(), free_port()
        self.etcd_dir = Path(tempfile.mkdtemp(prefix="cxygpt-etcd-", dir=_tmpfs()))
        etcd = f"http://127.0.0.1:{etcd_port}"
        kcm_port, scheduler_port = free_port(), free_port()
        pki = self.pki
        return [
            (Component("etcd", self._argv(
                "etcd", "--name=default", f"--data-dir={self.etcd_dir}", f"--listen-client-urls={etcd}",
                f"--advertise-client-urls={etcd}", f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}", "--unsafe-no-fsync", "--log-level=warn"),
                self.root / "etcd.log"), f"{etcd}/health", False),
            (Component("kube-apiserver", self._argv(
                "kube-apiserver", f"--etcd-servers={etcd}", f"--bind-address={self.address}",
                f"--advertise-address={self.address}", f"--secure-port={self.api_port}",
                f"--tls-cert-file={self.serving.cert}", f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.ca.pair.cert}", f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={self.sa.cert}", f"--service-account-signing-key-file={self.sa.key}",
                f"--service-cluster-ip-range={self.service_cidr}", "--authorization-mode=Node,RBAC",
                f"--enable-admission-plugins={ADMISSION_PLUGINS}", "--allow-privileged=true",
                f"--requestheader-client-ca-file={self.front_proxy_ca.pair.cert}",
                "--requestheader-allowed-names=front-proxy-client", "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group", "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={self.front_proxy.cert}", f"--proxy-client-key-file={self.front_proxy.key}",
                f"--kubelet-client-certificate={self.kubelet_client.cert}",
                f"--kubelet-client-key={self.kubelet_client.key}",
                f"--kubelet-certificate-authority={self.ca.pair.cert}",
                "--kubelet-preferred-address-types=InternalIP", "--profiling=false", f"--cert-dir={pki}", "--v=0",
                # the `kubernetes` Service's endpoint cannot be a loopback address
                *(["--endpoint-reconciler-type=none"] if ipaddress.ip_address(self.address).is_loopback else [])),
                self.root / "kube-apiserver.log"), f"{self.url}/readyz", True),
            (Component("kube-controller-manager", self._argv(
                "kube-controller-manager", *self._client_flags("kube-controller-manager", kcm_port),
                "--use-service-account-credentials=true", f"--service-account-private-key-file={self.sa.key}",
                f"--root-ca-file={self.ca.pair.cert}", f"--cluster-signing-cert-file={self.ca.pair.cert}",
                f"--cluster-signing-key-file={self.ca.pair.key}", f"--service-cluster-ip-range={self.service_cidr}",
                "--controllers=*,bootstrapsigner,tokencleaner", "--v=0",
                # a new node's not-ready taint comes off within a second of its Ready status (default: 5 s)
                "--node-monitor-period=1s",
                *([f"--cluster-cidr={self.cluster_cidr}", "--allocate-node-cidrs=true", "--node-cidr-mask-size=24"]
                  if self.cluster_cidr else [])),
                self.root / "kube-controller-manager.log"), f"https://127.0.0.1:{kcm_port}/healthz", False),
            (Component("kube-scheduler", self._argv(
                "kube-scheduler", *self._client_flags("kube-scheduler", scheduler_port), "--v=0"),
                self.root / "kube-scheduler.log"), f"https://127.0.0.1:{scheduler_port}/healthz", False),
        ]

    def _client_flags(self, user: str, port: int) -> list[str]:
        kubeconfig = self.root / f"{user}.kubeconfig"
        return [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1",
                f"--secure-port={port}", f"--cert-dir={self.root / user}"]

    # --- running ----------------------------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> ControlPlane:
        began = time.monotonic()
        try:
            self._certificates()
            self.timings["certificates"] = time.monotonic() - began
            for component, health, admin in self._components():
                step = time.monotonic()
                component.start()
                self.components.append(component)
                self._wait_healthy(component, health, admin, began + timeout)
                self.timings[component.name] = time.monotonic() - step
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - began
        return self

    def _context(self, admin: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.pair.cert))
        if admin:
            context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        else:  # the controller-manager's and scheduler's own self-signed serving certificates
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _wait_healthy(self, component: Component, url: str, admin: bool, deadline: float) -> None:
        context = self._context(admin) if url.startswith("https") else None
        last = ""
        while time.monotonic() < deadline:
            if component.process.poll() is not None:
                raise ControlPlaneError(f"{component.name} exited with {component.process.returncode}:\n"
                                        f"{component.tail()}")
            try:
                with urllib.request.urlopen(url, context=context, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as e:
                last = f"{e.code} {e.read()[:300]!r}"
            except (urllib.error.URLError, OSError) as e:
                last = repr(e)
            time.sleep(0.05)
        raise ControlPlaneError(f"{component.name} not healthy at {url} in time (last: {last}):\n{component.tail()}")

    def logs(self) -> str:
        return "\n".join(f"--- {c.name}:\n{c.tail()}" for c in self.components)

    def stop(self) -> None:
        """Every component, the newest first, then their data."""
        for component in reversed(self.components):
            component.stop()
        self.components.clear()
        if self.etcd_dir:
            shutil.rmtree(self.etcd_dir, ignore_errors=True)
        if self.own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
