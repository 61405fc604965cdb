"""The dev cluster's network: a private network namespace (nothing in it reaches past this machine) where a
cluster's control plane has the address 10.245.K.1 and each node one of 10.245.K.0/24, Services' cluster IPs
(10.(96+K).0.0/16) are local, and each pod has a network namespace of its own joined to its node by a veth pair,
with an address of the node's pod CIDR (as a point-to-point CNI plugin gives it): every pod's containers listen on
their own ports as in a cluster. K numbers the clusters of one process (a test process may run several). A pod
also gets a mount namespace with a /run of its own, where its service-account token is mounted."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ipaddress
import itertools
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass

SERVICE_RANGE = "10.96.0.0/12"  # every cluster's Services' cluster IPs: local addresses, the service proxy's
MAX_CLUSTERS = 16


@dataclass(frozen=True)
class Plan:
    """The addresses of the K-th cluster of this process, apart from every other's."""
    index: int

    @property
    def host(self) -> str:
        """The control plane's address (the API server's, the add-ons')."""
        return f"10.245.{self.index}.1"

    def node(self, i: int) -> str:
        return f"10.245.{self.index}.{i + 2}"

    @property
    def cluster_cidr(self) -> str:
        """The pods' addresses: the controller-manager gives each node a /24 of it (spec.podCIDR)."""
        return f"10.{244 - self.index}.0.0/16"

    @property
    def service_cidr(self) -> str:
        return f"10.{96 + self.index}.0.0/16"

    @property
    def dns(self) -> str:
        """kube-dns's cluster IP, as kubeadm has it."""
        return f"10.{96 + self.index}.0.10"


_plans = itertools.count()


def next_plan() -> Plan:
    index = next(_plans)
    if index >= MAX_CLUSTERS:
        raise NetworkError(f"at most {MAX_CLUSTERS} clusters in one process")
    return Plan(index)
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
_ENTERED = "CXYGPT_DEV_NETWORK"
# in the environment of every process a dev cluster starts, its pods' too: its state directory (nothing it started
# can hide from `cxygpt-dev down` or a test)
DEV_CLUSTER_MARK = "CXYGPT_DEV_CLUSTER"  # set once this process (and so its children) is in the private network


class NetworkError(RuntimeError):
    """The private network cannot be made here: the message says what is missing."""


def _ip(*args: str, namespace_of: int | None = None, batch: str | None = None) -> None:
    argv = ["ip", *(["-batch", "-"] if batch else args)]
    if namespace_of is not None:
        argv = ["nsenter", f"--net=/proc/{namespace_of}/ns/net", "--", *argv]
    out = subprocess.run(argv, input=batch, capture_output=True, text=True)
    if out.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {out.stderr.strip()}")


def in_private_network() -> bool:
    return os.environ.get(_ENTERED) == "1"


def enter_private_network(fresh: bool = False) -> None:
    """Moves this process (its calling thread, and so every child and thread it starts later) into a new network
    namespace with the host address on its loopback interface. Root does it directly; another user through a user
    namespace of its own, which must then be done before any other thread starts. Idempotent, unless `fresh`: a
    network of its own even when started inside another one (a dev cluster started by a test)."""
    if in_private_network() and not fresh:
        return
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            raise NetworkError(f"the dev cluster's network needs `{tool}` (Debian: iproute2, util-linux)")
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWNET | _CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        raise NetworkError(f"unshare(network namespace) failed: {os.strerror(ctypes.get_errno())} (needs root, or "
                           "unprivileged user namespaces)")
    if flags & _CLONE_NEWUSER:  # root inside the new user namespace, this user outside it
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
    _ip("link", "set", "lo", "up")
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:  # pod to pod: from one veth to another (this namespace's)
        f.write("1")
    _ip("route", "add", "local", SERVICE_RANGE, "dev", "lo")  # the service proxy listens on cluster IPs
    os.environ[_ENTERED] = "1"


def add_address(address: str) -> None:
    """An address of this network's host (a control plane's, a node's, where its kubelet listens), once."""
    out = subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True)
    if f" {address}/" not in out.stdout:
        _ip("addr", "add", f"{address}/32", "dev", "lo")


@dataclass
class Sandbox:
    """A pod's namespaces: the process that holds them (the pause container's part), its address, the host side of
    its veth pair."""
    address: str
    holder: asyncio.subprocess.Process
    veth: str

    def enter(self, argv: list[str]) -> list[str]:
        """A command line that runs `argv` in this pod's namespaces (nsenter execs it: the same process)."""
        pid = self.holder.pid
        return ["nsenter", f"--net=/proc/{pid}/ns/net", f"--mount=/proc/{pid}/ns/mnt", "--", *argv]

    async def mount(self, mounts: dict[str, str]) -> None:
        """Directories of this machine bind-mounted at paths of the pod's own view (under a /run of its own, as a
        container has: the service-account token's /var/run/secrets/...), and files over files (/etc/resolv.conf)."""
        script = ["mount -t tmpfs -o mode=755 tmpfs /run"]
        for target, source in mounts.items():
            if os.path.isdir(source):
                script.append(f"mkdir -p {shlex.quote(target)}")
            script.append(f"mount --bind {shlex.quote(source)} {shlex.quote(target)}")
        process = await asyncio.create_subprocess_exec(
            "nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--", "sh", "-ec", " && ".join(script),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise NetworkError(f"the pod's mounts failed: {output.decode(errors='replace').strip()}")


class PodNetwork:
    """Hands out the addresses of a node's pod CIDR and makes each pod's namespaces and veth pair (a point-to-point
    CNI plugin whose gateway is the node's address)."""

    def __init__(self, node_address: str, pod_cidr: str):
        if not in_private_network():
            raise NetworkError("pods need the dev cluster's network: call network.enter_private_network() first")
        self.node_address, self.pod_cidr = node_address, pod_cidr
        # the lowest first (.0 and .1 left out, as a bridge plugin keeps them); a released address goes last, so its
        # old veth (which the kernel removes a little after the namespace) is long gone when it comes round again
        self.free = collections.deque(str(a) for a in list(ipaddress.ip_network(pod_cidr).hosts())[1:])

    async def create(self) -> Sandbox:
        if not self.free:
            raise NetworkError(f"no pod address left in the node's pod CIDR {self.pod_cidr}")
        address = self.free.popleft()
        holder = await asyncio.create_subprocess_exec("unshare", "--net", "--mount", "--propagation", "private", "--",
                                                      "sleep", "infinity", start_new_session=True)
        veth = "cx" + format(int(ipaddress.ip_address(address)) & 0xFFFF, "x")
        try:
            await asyncio.to_thread(self._plumb, holder.pid, address, veth)
        except BaseException:
            await self._end(holder)
            self.free.append(address)
            raise
        return Sandbox(address, holder, veth)

    def _plumb(self, pid: int, address: str, veth: str) -> None:
        # the holder's namespace exists once /proc/<pid>/ns/net differs from ours
        ours = os.stat("/proc/self/ns/net").st_ino
        while os.stat(f"/proc/{pid}/ns/net").st_ino == ours:
            os.sched_yield()
        _ip(batch=f"link add {veth} type veth peer name eth0 netns /proc/{pid}/ns/net\n"
                  f"link set {veth} up\nroute add {address}/32 dev {veth}\n")
        _ip(namespace_of=pid, batch=f"link set lo up\nlink set eth0 up\naddr add {address}/32 dev eth0\n"
                                    f"route add {self.node_address}/32 dev eth0\n"
                                    f"route add default via {self.node_address}\n")

    async def release(self, sandbox: Sandbox) -> None:
        """The namespace goes with its holder; the veth pair with the namespace."""
        await self._end(sandbox.holder)
        self.free.append(sandbox.address)

    @staticmethod
    async def _end(holder: asyncio.subprocess.Process) -> None:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
    """A TCP connection passed on to host:port, both ways, until either side closes."""
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
    except OSError:
        writer.close()
        return

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
