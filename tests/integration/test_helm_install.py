"""The rendered chart applied with real kubectl to the in-memory API; the operator and gateway run as it configures them."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from harness import REPO, ServerProcess, console_script, free_port, wait_until

CHART = REPO / "deploy" / "helm" / "cxygpt"
SIM_IMAGE = "cxygpt/cxygpt-sim:it-1"
NODE = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "kind-worker2", "labels": {
    "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "1", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}}


def helm(*args) -> subprocess.CompletedProcess:
    binary = shutil.which("helm") or REPO / ".tools" / "bin" / "helm"
    if not shutil.which("helm") and not binary.exists():
        pytest.skip("no helm binary (run `make bootstrap`)")
    out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"helm {' '.join(args)}: {out.stderr}"
    return out


def is_hook(doc) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


class Install:
    """`helm install` as far as the in-memory API allows: the release's objects (not its hooks) applied with kubectl."""

    def __init__(self, kube_api, tmp, namespace: str, *sets: str, values: Path | None = None):
        self.kube_api, self.tmp, self.namespace = kube_api, tmp, namespace
        out = helm("template", "cxygpt", str(CHART), "--namespace", namespace, *(["-f", str(values)] if values else []),
                   "--set", "operator.simImage.tag=it-1", *[a for s in sets for a in ("--set", s)]).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
        # hooks are not part of the release: helm runs them later (post-install) or on `helm test`
        self.objects = [d for d in docs if not is_hook(d)]
        self.hooks = [d for d in docs if is_hook(d)]
        self.processes: list[ServerProcess] = []

    def kubectl(self, *args, stdin=None) -> str:
        out = subprocess.run([console_script("kubectl"), "--kubeconfig", str(self.kube_api.kubeconfig),
                              "--cache-dir", str(self.tmp / "kubectl-cache"), *args],
                             capture_output=True, text=True, input=stdin, timeout=30)
        assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
        return out.stdout

    def apply(self, docs: list[dict]) -> str:
        return self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        return json.loads(self.kubectl("get", kind, name, "-o", "json", *(["-n", namespace] if namespace else [])))

    def container(self, component: str) -> dict:
        dep = self.get("deployment", f"cxygpt-{component}", self.namespace)
        return dep["spec"]["template"]["spec"]["containers"][0]

    def mounted_profiles(self) -> str:
        """The profile table as the pods see it: the applied ConfigMap's data, written where the args expect it."""
        cm = self.get("configmap", "cxygpt-profiles", self.namespace)
        path = self.tmp / "profiles.yaml"
        path.write_text(cm["data"]["profiles.yaml"])
        return str(path)

    def install(self, *namespaces: str):
        # `helm install --create-namespace` (the in-memory API knows only default and kube-system), and the
        # watched namespaces, which exist before a release puts Roles in them
        self.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
                    for n in dict.fromkeys((self.namespace, *namespaces))])
        return self.apply(self.objects)

    def start_operator(self, name: str = "operator", kubeconfig: Path | None = None,
                       autoscale_interval: float | None = None) -> ServerProcess:
        """The operator process, run with the installed Deployment's own args (local ports, the mounted table;
        a shorter autoscaling interval when given)."""
        op = self.container("operator")
        health, metrics = free_port(), free_port()
        args = local_args(op["args"], {"--liveness": f"http://127.0.0.1:{health}/healthz",
                                       "--profiles": self.mounted_profiles(), "--metrics-port": str(metrics),
                                       **({"--autoscale-interval": str(autoscale_interval)} if autoscale_interval else {})})
        return self.start([console_script(op["command"][0]), *args, "--metrics-host", "127.0.0.1",
                           "--kubeconfig", str(kubeconfig or self.kube_api.kubeconfig)], port=health, health="/healthz",
                          name=name)

    def start_gateway(self, kubeconfig: Path | None = None) -> ServerProcess:
        """The gateway process with the installed Deployment's args and environment (a local port)."""
        gw = self.container("gateway")
        port = free_port()
        env = {e["name"]: e["value"] for e in gw["env"] if "value" in e}
        env["CXYGPT_PROFILES"] = self.mounted_profiles()
        return self.start([console_script(gw["command"][0]), *local_args(gw["args"], {"--host": "127.0.0.1",
                                                                                     "--port": str(port)}),
                           "--kubeconfig", str(kubeconfig or self.kube_api.kubeconfig)],
                          port=port, health="/healthz", name="gateway", env=env)

    def add_model(self, namespace: str, name: str = "qwen3-small", served: str = "qwen3-0.6b", **spec):
        self.apply([NODE, {
            "apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"name": served, "source": "hf://Qwen/Qwen3-0.6B"}, "mode": "multi",
                     "engine": {"kind": "sim"}, **spec}}])

    def engine_deployment(self, namespace: str, name: str = "qwen3-small") -> dict | None:
        out = subprocess.run([console_script("kubectl"), "--kubeconfig", str(self.kube_api.kubeconfig),
                              "--cache-dir", str(self.tmp / "kubectl-cache"), "get", "deployment", name,
                              "-n", namespace, "-o", "json"], capture_output=True, text=True, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait_engine(self, namespace: str, timeout: float = 20, name: str = "qwen3-small") -> dict:
        try:
            return wait_until(lambda: self.engine_deployment(namespace, name), timeout=timeout,
                              what="the engine Deployment")
        except AssertionError:
            logs = "\n".join(f"--- {p.argv[0]}:\n{p.log()}" for p in self.processes)
            raise AssertionError(f"no engine Deployment after {timeout}s; logs:\n{logs}") from None

    def engine_ready(self, namespace: str, name: str = "qwen3-small") -> None:
        """What the Deployment and EndpointSlice controllers report once the engine pod is ready (there is no
        kubelet here): the Deployment's ready count and a ready endpoint in the Service's slice."""
        self.kubectl("patch", "deployment", name, "-n", namespace, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": {"replicas": 1, "readyReplicas": 1}}))
        self.apply([{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                     "metadata": {"name": f"{name}-engine", "namespace": namespace,
                                  "labels": {"kubernetes.io/service-name": name,  # and the Service's own labels
                                             "app.kubernetes.io/managed-by": "cxygpt-operator"}},
                     "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
                     "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": True}}]}])

    def start(self, argv: list[str], *, port: int, health: str, name: str, env: dict | None = None) -> ServerProcess:
        proc = ServerProcess(argv, port=port, health=health, log_path=self.tmp / f"{name}.log", env=env).start()
        self.processes.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.processes):
            proc.stop()


def local_args(args: list[str], replace: dict[str, str]) -> list[str]:
    """The container's args with in-cluster addresses and paths swapped for local ones (same flags)."""
    out = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        out.append(f"{flag}={replace[flag]}" if flag in replace else arg)
    return out


@pytest.fixture
def install(kube_api, tmp_path, request):
    inst = Install(kube_api, tmp_path, *request.param)
    yield inst
    inst.stop()


@pytest.mark.parametrize("install", [("cxygpt",), ("llm", "operator.watchNamespaces={llm}")],
                         ids=["cluster-wide", "watch-namespace"], indirect=True)
def test_the_installed_operator_reconciles_a_model_deployment(install):
    applied = install.install()
    for obj in install.objects:  # every object of the release exists in the API afterwards
        kind = obj["kind"].lower()
        install.get(kind, obj["metadata"]["name"], obj["metadata"].get("namespace"))
        assert obj["metadata"]["name"] in applied
    assert {h["kind"] for h in install.hooks} == {"Pod"}  # only the `helm test` pod

    # the operator process, run with the installed Deployment's own args
    assert install.container("operator")["image"] == "cxygpt/cxygpt-operator:0.1.0"
    profiles = install.mounted_profiles()
    assert open(profiles).read() == (REPO / "profiles" / "profiles.yaml").read_text()
    install.start_operator()

    model_ns = install.namespace if install.namespace == "llm" else "default"
    install.add_model(model_ns)
    dep = install.wait_engine(model_ns)
    engine = dep["spec"]["template"]["spec"]["containers"][0]
    assert engine["image"] == SIM_IMAGE  # the chart's operator.simImage reached the engine
    assert engine["command"] == ["cxygpt-sim", "serve"]
    md = install.get("md", "qwen3-small", model_ns)
    assert md["status"]["profile"] == "SRV_80G" and md["status"]["image"] == SIM_IMAGE

    # the engine becomes ready (the Deployment controller's job in a real cluster)
    install.engine_ready(model_ns)
    wait_until(lambda: install.get("md", "qwen3-small", model_ns)["status"].get("phase") == "Ready", timeout=15,
               what="the ModelDeployment Ready")

    # the gateway process with the installed args, then the `helm test` hook's own check against it
    gateway = install.start_gateway()
    [test_pod] = install.hooks
    script, url = test_pod["spec"]["containers"][0]["args"]
    assert url == f"http://cxygpt-gateway.{install.namespace}.svc:80"
    check = subprocess.run([sys.executable, "-c", script, gateway.url], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and check.stdout.strip() == "ok: ['qwen3-0.6b']", check.stdout + check.stderr


@pytest.mark.parametrize("install", [("cxygpt", "operator.replicaCount=2")], ids=["ha"], indirect=True)
def test_two_peering_operators_reconcile_with_one_active(install):
    install.install()
    # kopf's peering CRDs came with the release; the peering object is the post-install hook
    peering = [h for h in install.hooks if h["kind"] == "ClusterKopfPeering"]
    assert len(peering) == 1
    install.apply(peering)
    first = install.start_operator("operator-1")
    install.start_operator("operator-2")
    install.add_model("default")
    install.wait_engine("default", timeout=6)  # replicas draw distinct priorities: one works
    first.stop()  # the standby takes over: a model in another namespace is reconciled by the other replica
    install.add_model("llm", served="qwen3-0.6b-llm")  # a name of its own: the oldest model owns a name
    install.wait_engine("llm", timeout=6)


@pytest.mark.parametrize("install", [("cxygpt", "operator.watchNamespaces={team-a,team-b}")], ids=["tenants"],
                         indirect=True)
def test_one_gateway_serves_the_models_of_every_watched_namespace(install):
    install.install("team-a", "team-b")
    install.start_operator()
    for namespace in ("team-a", "team-b"):
        install.add_model(namespace, served=f"model-of-{namespace}")
    for namespace in ("team-a", "team-b"):
        install.wait_engine(namespace)
        install.engine_ready(namespace)
    gateway = install.start_gateway()
    assert [a for a in install.container("gateway")["args"] if a.startswith("--namespace")] == \
        ["--namespace=team-a", "--namespace=team-b"]

    def served():
        return {m["id"] for m in httpx.get(gateway.url + "/v1/models", timeout=5).json()["data"]}

    wait_until(lambda: served() == {"model-of-team-a", "model-of-team-b"}, timeout=15,
               what="the gateway to serve both tenants' models")
