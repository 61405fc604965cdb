"""The chart on the real control plane, as an operator of a cluster runs it: `helm install --wait` (hooks included),
`helm test`, `helm upgrade`, `helm uninstall`. The operator, the gateway and the console run as pods under the
chart's ServiceAccounts, so the real RBAC authorizer enforces the chart's roles on every call they make: nothing they
do is refused, and the console can read what its pages show and nothing else (no Secrets, no writes)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cxygpt_dev.cluster import Cluster
from cxygpt_dev.controlplane import free_port
from cxygpt_dev.hub import make_repo
from harness import REPO, ServerProcess, wait_until
from kube import Kubectl

pytestmark = pytest.mark.timeout(400)
CHART = REPO / "deploy" / "helm" / "cxygpt"
RELEASE = NAMESPACE = "cxygpt"
TINY = "cxygpt-test/tiny"


@pytest.fixture(scope="module")
def chart_cluster(tmp_path_factory):
    """A cluster of this module's own (the chart owns the CRD it installs), and a Hub with a small repository and
    stand-ins of the catalog's models (which the engines download)."""
    root = tmp_path_factory.mktemp("chart-cluster")
    cluster = Cluster(root=root).start()
    make_repo(root / "hub", TINY, weights_bytes=2 * 2**20)
    host = cluster.plan.host  # where the pods reach it: the cluster's host address
    port = free_port(host)
    hub = ServerProcess([sys.executable, "-m", "cxygpt_dev.hub", "--root", str(root / "hub"), "--host",
                         host, "--port", str(port), "--catalog-stand-ins", "1"], port=port, host=host,
                        log_path=root / "hub.log")
    try:
        hub.start()
        yield cluster, hub.url
    finally:
        hub.stop()
        cluster.stop()


def helm(kubeconfig: Path, *args: str, timeout: float = 240) -> str:
    binary = shutil.which("helm") or str(REPO / ".tools" / "bin" / "helm")
    out = subprocess.run([binary, "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"helm {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def sim_model(name: str, served: str, namespace: str, **spec) -> dict:
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"name": served, "source": "hf://Qwen/Qwen3-0.6B"}, "engine": {"kind": "sim"}, **spec}}


def phase(kube: Kubectl, name: str, namespace: str) -> dict:
    """The ModelDeployment's status."""
    return json.loads(kube("get", "md", name, "-n", namespace, "-o", "json")).get("status") or {}


def redis() -> list[dict]:
    """Redis as a pod of the release namespace (Debian's redis-server as its program), for the HA values."""
    labels = {"app": "redis"}
    return [{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "redis", "namespace": NAMESPACE},
             "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
                 "containers": [{"name": "redis", "image": "redis:8", "command": [
                     "redis-server", "--port", "6379", "--save", "", "--appendonly", "no"],
                     "ports": [{"name": "redis", "containerPort": 6379}],
                     "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 1}}]}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "redis", "namespace": NAMESPACE},
             "spec": {"selector": labels, "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}]}}]


def forbidden_lines(kube: Kubectl, component: str) -> list[str]:
    """What the authorizer refused the component's pods, from their logs (every container, restarts included)."""
    lines = []
    for pod in json.loads(kube("get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/component={component}",
                               "-o", "json"))["items"]:
        text = kube("logs", "-n", NAMESPACE, pod["metadata"]["name"])
        lines += [line for line in text.splitlines() if "Forbidden" in line or " 403" in line or "forbidden" in line]
    return lines


# what the console's ServiceAccount may do, as the real authorizer answers `kubectl auth can-i` for it: read what its
# pages show (in the watched namespaces), never a Secret, never a write
CONSOLE_GRANTS = {("list", "modeldeployments.cxygpt.io"): "yes", ("watch", "pods"): "yes", ("get", "pods/log"): "yes",
                  ("list", "events"): "yes", ("list", "endpointslices.discovery.k8s.io"): "yes",
                  ("get", "secrets"): "no", ("list", "secrets"): "no", ("create", "modeldeployments.cxygpt.io"): "no",
                  ("patch", "modeldeployments.cxygpt.io/scale"): "no", ("delete", "pods"): "no",
                  ("create", "pods/exec"): "no"}


def console_can(kube: Kubectl, namespaces: list[str]) -> dict[tuple[str, str], str]:
    """`kubectl auth can-i` for the console's ServiceAccount, in the first namespace the release serves."""
    account = f"--as=system:serviceaccount:{NAMESPACE}:{RELEASE}-console"
    answers = {}
    for verb, resource in CONSOLE_GRANTS:
        kind, _, sub = resource.partition("/")
        answers[verb, resource] = kube.run("auth", "can-i", verb, kind, *([f"--subresource={sub}"] if sub else []),
                                           "-n", namespaces[0], account, check=False).stdout.strip()
    return answers


def served(gateway: str) -> dict[str, str]:
    return {m["id"]: m.get("state", "") for m in httpx.get(gateway + "/v1/models", timeout=5).json()["data"]}


def diagnosis(kube: Kubectl) -> str:
    """The release's pods' last log lines and the cluster's warnings, for a failure's message."""
    parts = [kube.run("get", "pods,md", "-A", "-o", "wide", check=False).stdout]
    for pod in json.loads(kube("get", "pods", "-n", NAMESPACE, "-o", "json"))["items"]:
        parts.append(f"--- {pod['metadata']['name']}:\n" + kube.run(
            "logs", "-n", NAMESPACE, pod["metadata"]["name"], "--tail=25", check=False).stdout)
    parts.append(kube.run("get", "events", "-A", "--field-selector=type=Warning", check=False).stdout)
    return "\n".join(parts)[-12000:]


def wait_for_owner_kind(kube: Kubectl, namespace: str) -> None:
    """Until the API server's admission knows the chart's new kind. Its RESTMapper learns a CRD some seconds after
    the install, and until then OwnerReferencesPermissionEnforcement refuses (403) an ownerReference with
    blockOwnerDeletion to a ModelDeployment, as the operator's first Deployment would meet it: the operator retries,
    and this test, whose "nothing forbidden" check is about RBAC, waits (a server-side dry run as the operator)."""
    probe = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "owner-probe", "namespace": namespace, "ownerReferences": [{
            "apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "name": "probe",
            "uid": "00000000-0000-0000-0000-000000000000", "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"selector": {"matchLabels": {"probe": "x"}}, "template": {
            "metadata": {"labels": {"probe": "x"}}, "spec": {"containers": [{"name": "x", "image": "x"}]}}}}
    wait_until(lambda: kube.run("apply", "--server-side", "--dry-run=server", "--field-manager=probe",
                                f"--as=system:serviceaccount:{NAMESPACE}:{RELEASE}-operator", "-f", "-",
                                stdin=json.dumps(probe), check=False).returncode == 0,
               timeout=60, interval=0.5, what="the API server's admission to know ModelDeployment owners")


@pytest.mark.parametrize("scenario", ["defaults", "ha", "watch-namespaces-ha"])
def test_install_test_upgrade_and_uninstall_with_the_charts_rbac_enforced(chart_cluster, tmp_path, scenario):
    cluster, hub = chart_cluster
    kube = Kubectl(cluster.kubeconfig, cache=tmp_path / "kubectl-cache")
    try:
        scenario_steps(cluster, hub, kube, scenario)
    except (AssertionError, httpx.HTTPError) as e:
        raise AssertionError(f"{e!r}\n{diagnosis(kube)}") from None


def scenario_steps(cluster: Cluster, hub: str, kube: Kubectl, scenario: str) -> None:
    values = [] if scenario == "defaults" else ["-f", str(CHART / "ci" / f"{scenario}-values.yaml")]
    watched = yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text())["operator"].get(
        "watchNamespaces", []) if values else []
    namespaces = watched or ["default"]
    for namespace in {NAMESPACE, *watched}:  # a namespaced release's Roles go into namespaces that exist
        kube.run("create", "namespace", namespace, check=False)
    if scenario == "ha":
        kube.apply(*redis())
    values += ["--set", "console.enabled=true"]
    began = time.monotonic()
    helm(cluster.kubeconfig, "install", RELEASE, str(CHART), "-n", NAMESPACE, *values, "--wait", "--timeout", "180s",
         "--set", f"operator.hfEndpoint={hub}", "--set", "modelAutoscaling.intervalSeconds=1")
    installed_in = time.monotonic() - began
    operators = json.loads(kube("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=operator",
                                "-o", "json"))["items"]
    assert len(operators) == (2 if scenario != "defaults" else 1) and installed_in < 120
    assert all(p["spec"]["serviceAccountName"] == f"{RELEASE}-operator" for p in operators)
    # the authorizer is the chart's: what it grants, and nothing else
    assert kube.run("auth", "can-i", "patch", "deployments", "-n", namespaces[0],
                    f"--as=system:serviceaccount:{NAMESPACE}:{RELEASE}-operator").stdout.strip() == "yes"
    assert kube.run("auth", "can-i", "create", "deployments", "-n", namespaces[0],
                    f"--as=system:serviceaccount:{NAMESPACE}:{RELEASE}-gateway", check=False).stdout.strip() == "no"
    assert console_can(kube, namespaces) == CONSOLE_GRANTS
    wait_for_owner_kind(kube, namespaces[0])

    # helm test: the hook pod reaches the gateway by its Service's name
    out = helm(cluster.kubeconfig, "test", RELEASE, "-n", NAMESPACE, "--logs")
    assert "Phase:          Succeeded" in out and "ok: [" in out, out
    gateway_service = json.loads(kube("get", "service", f"{RELEASE}-gateway", "-n", NAMESPACE, "-o", "json"))
    gateway = f"http://{gateway_service['spec']['clusterIP']}:{gateway_service['spec']['ports'][0]['port']}"

    # a model in each namespace the release serves; then one that asks for a served name already taken
    for n, namespace in enumerate(namespaces):
        kube.apply(sim_model("small", f"small-{n}", namespace))
    for namespace in namespaces:
        wait_until(lambda namespace=namespace: phase(kube, "small", namespace).get("phase") == "Ready", timeout=90,
                   interval=0.5,
                   what=f"the model in {namespace} Ready")
    wait_until(lambda: {f"small-{n}" for n in range(len(namespaces))} <= set(served(gateway)), timeout=30,
               what="the gateway serving every namespace's model")
    reply = httpx.post(gateway + "/v1/chat/completions", timeout=30, json={
        "model": "small-0", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    time.sleep(1.05)  # creationTimestamp has one-second granularity: the next one must be younger
    kube.apply(sim_model("other", "small-0", namespaces[-1]))
    wait_until(lambda: phase(kube, "other", namespaces[-1]).get("phase") == "Failed" and any(
        c.get("reason") == "ModelNameConflict" for c in phase(kube, "other", namespaces[-1]).get("conditions", [])),
        timeout=30, what="the name conflict")

    if scenario == "defaults":
        # the model cache: a claim (the standard class's provisioner), a download Job from the Hub, its pod's log
        # read for the progress (pods/log), the engines mounting the claim
        kube.apply({**sim_model("cached", "cached", "default"),
                    "spec": {"model": {"name": "cached", "source": f"hf://{TINY}", "cache": {"enabled": True,
                                                                                            "size": "1Gi"}},
                             "engine": {"kind": "sim"}}})
        status = wait_until(lambda: (s := phase(kube, "cached", "default")).get("phase") == "Ready" and s,
                            timeout=120, interval=0.5, what="the cached model Ready")
        assert status["cache"]["phase"] == "Ready"
        # autoscaling: idle, the operator takes a model to zero (scale subresource); a request wakes it (the
        # gateway's write) and is answered once an engine serves
        kube.apply(sim_model("idle", "idle", "default", autoscaling={
            "minReplicas": 0, "maxReplicas": 2, "scaleDownDelaySeconds": 0}))
        wait_until(lambda: phase(kube, "idle", "default").get("phase") == "ScaledToZero", timeout=60,
                   interval=0.5, what="the idle model at zero")
        wait_until(lambda: served(gateway).get("idle") == "scaled_to_zero", timeout=30, what="the gateway sees it")
        woken = httpx.post(gateway + "/v1/chat/completions", timeout=90, json={
            "model": "idle", "max_tokens": 4, "messages": [{"role": "user", "content": "wake up"}]})
        assert woken.status_code == 200, woken.text

    if scenario == "ha":
        # two operators, one active: the active one gone, the standby takes over
        active = next(p["metadata"]["name"] for p in operators
                      if "small" in kube("logs", "-n", NAMESPACE, p["metadata"]["name"]))
        kube("delete", "pod", active, "-n", NAMESPACE, "--wait=false")
        kube.apply(sim_model("later", "later", namespaces[0]))
        wait_until(lambda: phase(kube, "later", namespaces[0]).get("phase") == "Ready", timeout=90, interval=0.5,
                   what="a model reconciled by the standby")

    # helm upgrade: a changed value rolls the gateway's pods; the release still serves
    before = {p["metadata"]["name"] for p in json.loads(kube("get", "pods", "-n", NAMESPACE, "-l",
                                                             "app.kubernetes.io/component=gateway", "-o", "json"))["items"]}
    helm(cluster.kubeconfig, "upgrade", RELEASE, str(CHART), "-n", NAMESPACE, *values, "--wait", "--timeout",
         "180s", "--set", f"operator.hfEndpoint={hub}", "--set", "modelAutoscaling.intervalSeconds=1",
         "--set", "gateway.logLevel=debug")
    after = {p["metadata"]["name"] for p in json.loads(kube("get", "pods", "-n", NAMESPACE, "-l",
                                                            "app.kubernetes.io/component=gateway", "-o", "json"))["items"]
             if not p["metadata"].get("deletionTimestamp")}  # the old ones may still drain (their preStop)
    assert after and not after & before
    wait_until(lambda: "small-0" in served(gateway), timeout=30, what="served after the upgrade")

    # the console shows the fleet it reads under its own ServiceAccount (models, pods, events, nodes)
    console_service = json.loads(kube("get", "service", f"{RELEASE}-console", "-n", NAMESPACE, "-o", "json"))
    console = f"http://{console_service['spec']['clusterIP']}:{console_service['spec']['ports'][0]['port']}"
    wait_until(lambda: "small-0" in httpx.get(console + "/", timeout=5).text, timeout=30,
               what="the console's fleet page listing the model")
    assert "Ready" in httpx.get(console + f"/models/{namespaces[0]}/small", timeout=5).text

    # nothing any component did was refused by the authorizer
    assert forbidden_lines(kube, "operator") == [] and forbidden_lines(kube, "gateway") == []
    assert forbidden_lines(kube, "console") == []

    # uninstall: the models first (the operator removes its finalizers), then the release; the CRD stays
    for namespace in namespaces:
        kube("delete", "md", "--all", "-n", namespace, "--timeout=90s")
    helm(cluster.kubeconfig, "uninstall", RELEASE, "-n", NAMESPACE, "--wait", "--timeout", "120s")
    # the release's pods, not the HA scenario's Redis (a Deployment of the test's own): the next scenario counts the
    # operator pods it installs
    wait_until(lambda: not json.loads(kube("get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}",
                                           "-o", "json"))["items"], timeout=60, what="the release's pods gone")
    assert kube.run("get", "crd", "modeldeployments.cxygpt.io", check=False).returncode == 0  # crds.keep
    if scenario == "ha":
        kube("delete", "-f", "-", stdin=yaml.safe_dump_all(redis()))
