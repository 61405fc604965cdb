"""The operator on the real control plane, driven with kubectl as a user types it; and the scheduler's part: two
single-GPU models on a one-GPU node, one Pending with the scheduler's reason in its status until a node is added."""
from __future__ import annotations

import ipaddress
import json
import ssl
import time

import httpx
import pytest
import yaml

from cxygpt_dev import network
from cxygpt_dev.cluster import Cluster, kind_nodes
from cxygpt_dev.controlplane import free_port
from cxygpt_dev.kubelet import Node
from cxygpt_gateway.discovery.kubernetes import WAKE_PATCH
from harness import REPO, ServerProcess, console_script, wait_until
from kube import Kubectl

pytestmark = pytest.mark.timeout(300)
H100 = kind_nodes(network.Plan(0))[1].labels  # one 80 GiB GPU


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    """A cluster whose only node has one GPU, the CRD applied, the operator running with the admin's kubeconfig."""
    root = tmp_path_factory.mktemp("one-gpu")
    plan = network.next_plan()
    cluster = Cluster(root=root, plan=plan, nodes=[Node("gpu-a", H100, plan.node(0), gpus=1)]).start()
    kube = Kubectl(cluster.kubeconfig, "default", cache=root / "kubectl-cache")
    port = free_port()
    operator = ServerProcess([console_script("cxygpt-operator"), "--kubeconfig", str(cluster.kubeconfig),
                              "--liveness", f"http://127.0.0.1:{port}/healthz", "--metrics-port", "0",
                              "--log-format", "text"], port=port, health="/healthz", log_path=root / "operator.log")
    try:
        kube("apply", "-f", str(REPO / "deploy" / "crds"))
        kube.wait_established("modeldeployments.cxygpt.io")
        operator.start()
        yield cluster, kube, operator
    finally:
        operator.stop()
        cluster.stop()


def model(name: str, served: str, **spec) -> dict:
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
            "spec": {"model": {"name": served, "source": "hf://Qwen/Qwen3-0.6B"}, **spec}}


def status(kube: Kubectl, name: str) -> dict:
    return json.loads(kube("get", "md", name, "-o", "json")).get("status") or {}


def condition(status_: dict, kind: str) -> dict:
    return next((c for c in status_.get("conditions") or [] if c["type"] == kind), {})


def test_two_single_gpu_models_on_one_gpu_wait_for_the_scheduler_and_run_when_a_node_is_added(one_gpu):
    cluster, kube, _ = one_gpu
    # vLLM engines (the simulator runs in their place here): each pod requests one nvidia.com/gpu
    kube.apply(model("first", "first", mode="single"))
    kube("wait", "--for=jsonpath={.status.phase}=Ready", "md/first", "--timeout=90s")
    time.sleep(1.05)  # the second one is younger
    kube.apply(model("second", "second", mode="single"))
    pending = wait_until(lambda: (s := status(kube, "second")).get("phase") == "Pending" and s, timeout=60,
                         interval=0.5, what="the second model Pending")
    available = condition(pending, "Available")
    assert available["reason"] == "Unschedulable", available
    assert "Insufficient nvidia.com/gpu" in available["message"], available  # the scheduler's own words
    assert condition(pending, "Progressing")["reason"] == "Unschedulable"
    pod = kube.items("pods", "-l", "app.kubernetes.io/instance=second")[0]
    assert pod["status"]["phase"] == "Pending" and "nodeName" not in pod["spec"]

    cluster.add_node(Node("gpu-b", H100, cluster.plan.node(1), gpus=1))
    kube("wait", "--for=jsonpath={.status.phase}=Ready", "md/second", "--timeout=90s")
    placed = {p["metadata"]["labels"]["app.kubernetes.io/instance"]: p["spec"]["nodeName"]
              for p in kube.items("pods", "-l", "app.kubernetes.io/name=cxygpt-engine")}
    assert placed == {"first": "gpu-a", "second": "gpu-b"}
    kube("delete", "md", "first", "second", "--timeout=60s")


def test_the_gateways_wake_patch_takes_a_model_from_zero_and_only_from_zero(one_gpu):
    """What the gateway sends to wake a model at zero, against the real scale subresource (autoscaling/v1 leaves
    spec.replicas out at 0): it applies at zero, and is refused (422) once another writer woke it."""
    cluster, kube, _ = one_gpu
    kube.apply(model("sleeper", "sleeper", engine={"kind": "sim"}, replicas=0))
    api = "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments/sleeper/scale"
    assert json.loads(kube("get", "--raw", api))["spec"] == {}
    ctx = ssl.create_default_context(cafile=str(cluster.plane.ca.pair.cert))
    ctx.load_cert_chain(str(cluster.plane.admin.cert), str(cluster.plane.admin.key))

    def wake() -> httpx.Response:
        return httpx.patch(cluster.plane.url + api, content=WAKE_PATCH, verify=ctx, timeout=10,
                           headers={"Content-Type": "application/json-patch+json"})

    woken = wake()
    assert woken.status_code == 200 and woken.json()["spec"] == {"replicas": 1}
    assert wake().status_code == 422  # already awake: the test of the patch fails
    assert json.loads(kube("get", "md", "sleeper", "-o", "json"))["spec"]["replicas"] == 1
    kube("delete", "md", "sleeper", "--timeout=60s")


def test_kubectl_as_a_user_types_it(one_gpu, tmp_path):
    cluster, kube, _ = one_gpu
    sim = model("chat", "chat", engine={"kind": "sim"}, replicas=1)
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(sim))
    assert "modeldeployment.cxygpt.io/chat created" in kube("apply", "-f", str(path))
    explained = kube("explain", "modeldeployment.spec.model.cache")
    assert "FIELDS:" in explained and "accessMode" in explained and "tokenSecretRef" in explained
    kube("wait", "--for=condition=Available", "md/chat", "--timeout=90s")
    assert "modeldeployment.cxygpt.io/chat scaled" in kube("scale", "md", "chat", "--replicas=2")
    kube("wait", "--for=jsonpath={.status.readyReplicas}=2", "md/chat", "--timeout=90s")
    # server-side printing of the built-in kinds: the wide columns of a cluster
    wide = kube("get", "pods", "-l", "app.kubernetes.io/instance=chat", "-o", "wide").splitlines()
    assert wide[0].split()[:8] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE", "NOMINATED"]
    nodes = set(kube("get", "nodes", "-o", "name").replace("node/", "").split())
    pods = ipaddress.ip_network(cluster.plan.cluster_cidr)
    assert len(wide) == 3 and all(ipaddress.ip_address(line.split()[5]) in pods and line.split()[6] in nodes
                                  for line in wide[1:])
    md_row = kube("get", "md", "chat", "-o", "wide").splitlines()[1].split()
    assert md_row[1:6] == ["chat", "SRV_80G", "1x79GiB", "2/2", "Ready"]
    # an imperative create sends protobuf: the real server takes it
    assert "secret/hf created" in kube("create", "secret", "generic", "hf", "--from-literal=token=hf_x")
    pod = kube.items("pods", "-l", "app.kubernetes.io/instance=chat")[0]["metadata"]["name"]
    assert "serving Qwen/Qwen3-0.6B as chat" in kube("logs", pod, "-c", "engine")
    assert "serving" in kube("logs", "deployment/chat", "--tail=20")
    kube("delete", "-f", str(path), "--timeout=60s")
    kube("delete", "secret", "hf")

