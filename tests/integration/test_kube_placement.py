"""Placement on the real control plane, with the real scheduler counting GPUs: engines sized by the model share a node's
GPUs without double booking, two models on the MIG slices of one GPU, a taint only some models tolerate, pod
settings on the pods the scheduler places; and a missing repository failed at the engine's first exit."""
from __future__ import annotations

import json
import sys

import pytest

from cxygpt_dev import network
from cxygpt_dev.cluster import Cluster
from cxygpt_dev.controlplane import free_port
from cxygpt_dev.kubelet import Node
from harness import REPO, ServerProcess, console_script, wait_until
from kube import Kubectl

pytestmark = pytest.mark.timeout(400)
H100 = {"nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "2", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
MIG_PRODUCT = "NVIDIA-A100-SXM4-80GB-MIG-3g.40gb"
# GPU Feature Discovery's labels of an A100 80GB split into two 3g.40gb slices (mixed strategy); the device plugin
# advertises the slices as nvidia.com/mig-3g.40gb and no whole GPU
A100_MIG = {"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": "1", "nvidia.com/gpu.product":
            "NVIDIA-A100-SXM4-80GB", "nvidia.com/mig.strategy": "mixed", "nvidia.com/mig-3g.40gb.count": "2",
            "nvidia.com/mig-3g.40gb.memory": "40192", "nvidia.com/mig-3g.40gb.product": MIG_PRODUCT}
PREMIUM = [{"key": "dedicated", "value": "premium", "effect": "NoSchedule"}]


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    """A cluster of a node of two H100s, an A100 in two MIG slices and a tainted node of two H100s kept for some
    models; a Hub the engines download from; the CRD; the operator with engine defaults, as the chart gives them."""
    root = tmp_path_factory.mktemp("placement")
    plan = network.next_plan()
    cluster = Cluster(root=root, plan=plan, nodes=[
        Node("gpu-2x80g", {**H100, "pool": "shared"}, plan.node(0), gpus=2),
        Node("a100-mig", A100_MIG, plan.node(1), resources={"nvidia.com/gpu": "0", "nvidia.com/mig-3g.40gb": "2"}),
        Node("premium", {**H100, "pool": "premium"}, plan.node(2), gpus=2, taints=PREMIUM)]).start()
    kube = Kubectl(cluster.kubeconfig, "default", cache=root / "kubectl-cache")
    hub_port = free_port(plan.host)  # where the pods reach it: the cluster's host address
    hub = ServerProcess([sys.executable, "-m", "cxygpt_dev.hub", "--root", str(root / "hub"), "--host",
                         plan.host, "--port", str(hub_port), "--catalog-stand-ins", "1"], port=hub_port,
                        host=plan.host, log_path=root / "hub.log")
    defaults = root / "engines.yaml"
    defaults.write_text("podLabels: {cost-center: ml}\npriorityClassName: llm-serving\n")
    port = free_port()
    operator = ServerProcess([console_script("cxygpt-operator"), "--kubeconfig", str(cluster.kubeconfig),
                              "--liveness", f"http://127.0.0.1:{port}/healthz", "--metrics-port", "0",
                              "--log-format", "text", "--hf-endpoint", hub.url, "--engine-defaults", str(defaults)],
                             port=port, health="/healthz", log_path=root / "operator.log")
    try:
        hub.start()
        kube("apply", "-f", str(REPO / "deploy" / "crds"))
        kube.wait_established("modeldeployments.cxygpt.io")
        kube.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "llm-serving"},
                    "value": 1000, "description": "model serving"})
        operator.start()
        yield cluster, kube
    finally:
        operator.stop()
        hub.stop()
        cluster.stop()


def model(name: str, source: str = "hf://Qwen/Qwen3-0.6B", **spec) -> dict:
    """A vLLM engine (our kubelet runs the simulator in its place): it requests the GPUs sizing chose."""
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name},
            "spec": {"model": {"name": name, "source": source}, **spec}}


def status(kube: Kubectl, name: str) -> dict:
    return json.loads(kube("get", "md", name, "-o", "json")).get("status") or {}


def condition(status_: dict, kind: str) -> dict:
    return next((c for c in status_.get("conditions") or [] if c["type"] == kind), {})


def pods_of(kube: Kubectl, name: str) -> list[dict]:
    return kube.items("pods", "-l", f"app.kubernetes.io/instance={name}")


def ready(kube: Kubectl, *names: str) -> None:
    for name in names:
        kube("wait", "--for=jsonpath={.status.phase}=Ready", f"md/{name}", "--timeout=120s")


def pending_with(kube: Kubectl, name: str, *words: str) -> dict:
    return wait_until(lambda: (s := status(kube, name)).get("phase") == "Pending"
                      and all(w in condition(s, "Available").get("message", "") + condition(s, "ProfileSelected")
                              .get("message", "") for w in words) and s,
                      timeout=90, interval=0.5, what=f"{name} Pending ({', '.join(words)})")


def test_small_models_take_one_gpu_each_and_share_a_node_without_double_booking(placed):
    _, kube = placed
    kube.apply(model("small-a"), model("small-b"))
    ready(kube, "small-a", "small-b")
    for name in ("small-a", "small-b"):
        s = status(kube, name)
        assert (s["profile"], s["gpu"]["count"], s["sizing"]["available"]) == ("SRV_80G", 1, 2), s["sizing"]
        (pod,) = pods_of(kube, name)
        assert pod["spec"]["nodeName"] == "gpu-2x80g"
        assert pod["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == "1"
        # the chart's defaults reach every engine pod
        assert pod["metadata"]["labels"]["cost-center"] == "ml" and pod["spec"]["priorityClassName"] == "llm-serving"
    # the node's two GPUs are taken: a third engine waits for the scheduler, which says why
    kube.apply(model("small-c"))
    pending = pending_with(kube, "small-c", "Insufficient nvidia.com/gpu")
    assert condition(pending, "Available")["reason"] == "Unschedulable"
    kube("delete", "md", "small-a", "--timeout=60s")  # a GPU comes free: the waiting one takes it
    ready(kube, "small-c")
    assert pods_of(kube, "small-c")[0]["spec"]["nodeName"] == "gpu-2x80g"
    kube("delete", "md", "small-b", "small-c", "--timeout=60s")


def test_two_models_on_the_mig_slices_of_one_gpu(placed):
    _, kube = placed
    on_slices = {"gpu": {"products": [MIG_PRODUCT], "productPolicy": "Require"}}
    kube.apply(model("slice-a", **on_slices), model("slice-b", **on_slices))
    ready(kube, "slice-a", "slice-b")
    for name in ("slice-a", "slice-b"):
        s = status(kube, name)
        assert (s["gpu"]["resource"], s["gpu"]["memoryMiB"], s["profile"]) == (
            "nvidia.com/mig-3g.40gb", 40192, "SRV_24G")
        (pod,) = pods_of(kube, name)
        assert pod["spec"]["nodeName"] == "a100-mig"
        requests = pod["spec"]["containers"][0]["resources"]["requests"]
        assert requests["nvidia.com/mig-3g.40gb"] == "1" and "nvidia.com/gpu" not in requests
    kube.apply(model("slice-c", **on_slices))
    pending_with(kube, "slice-c", "Insufficient nvidia.com/mig-3g.40gb")
    kube("delete", "md", "slice-a", "slice-b", "slice-c", "--timeout=60s")


def test_a_taint_only_some_models_tolerate(placed):
    _, kube = placed
    tolerant = {"nodeSelector": {"pool": "premium"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "premium", "effect": "NoSchedule"}]}
    kube.apply(model("premium-a", engine=tolerant),
               model("premium-b", engine={"nodeSelector": {"pool": "premium"}}))
    ready(kube, "premium-a")
    (pod,) = pods_of(kube, "premium-a")
    assert pod["spec"]["nodeName"] == "premium"
    assert {"key": "dedicated", "operator": "Equal", "value": "premium", "effect": "NoSchedule"} in \
        pod["spec"]["tolerations"]
    # the one that does not tolerate it is sized for no node, and says which setting keeps it off
    pending = pending_with(kube, "premium-b", "premium: taint dedicated=premium:NoSchedule")
    assert condition(pending, "ProfileSelected")["reason"] == "NoMatchingGPU"
    assert pods_of(kube, "premium-b") == []  # no engine pod holds a place in the queue meanwhile
    # its settings fixed, it goes
    kube("patch", "md", "premium-b", "--type=merge", "-p", json.dumps({"spec": {"engine": tolerant}}))
    ready(kube, "premium-b")
    assert pods_of(kube, "premium-b")[0]["spec"]["nodeName"] == "premium"
    kube("delete", "md", "premium-a", "premium-b", "--timeout=60s")


def test_every_pod_setting_reaches_the_pods_the_scheduler_places(placed):
    _, kube = placed
    kube.apply(model("dressed", engine={
        "nodeSelector": {"pool": "shared"},
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 10,
                     "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                         "labelSelector": {"matchLabels": {"team": "search"}}}}]}},
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
        "podLabels": {"team": "search"}, "podAnnotations": {"example.com/owner": "search"}}))
    ready(kube, "dressed")
    (pod,) = pods_of(kube, "dressed")
    assert pod["spec"]["nodeName"] == "gpu-2x80g" and pod["spec"]["nodeSelector"] == {"pool": "shared"}
    assert pod["metadata"]["labels"]["team"] == "search" and pod["metadata"]["labels"]["cost-center"] == "ml"
    assert pod["metadata"]["annotations"]["example.com/owner"] == "search"
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}
    assert resources["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "1"}
    assert pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0][
        "weight"] == 10
    explained = kube("explain", "modeldeployment.spec.engine")
    for name in ("nodeSelector", "affinity", "tolerations", "runtimeClassName", "priorityClassName", "resources",
                 "podLabels", "podAnnotations"):
        assert name in explained, name
    assert "requiredDuringSchedulingIgnoredDuringExecution" in kube(
        "explain", "modeldeployment.spec.engine.affinity.nodeAffinity")
    assert "GPU Feature Discovery" in kube("explain", "modeldeployment.spec.gpu.products")
    kube("delete", "md", "dressed", "--timeout=60s")


def test_a_missing_repository_is_failed_at_the_engines_first_exit(placed):
    _, kube = placed
    kube.apply(model("typo", source="hf://Qwen/Qwen3-0.6B-Typo", replicas=1, gpu={"minMemoryMiB": 80000},
                     engine={"nodeSelector": {"pool": "shared"}}))

    def failed():
        s = status(kube, "typo")
        degraded = condition(s, "Degraded")
        return s.get("phase") == "Failed" and degraded.get("reason") == "ModelNotFound" and (s, degraded)
    s, degraded = wait_until(failed, timeout=90, interval=0.25, what="typo Failed with ModelNotFound")
    # failed at its first exit (the engine restarted once at most meanwhile), not after a crash loop's restarts
    assert "the engine exited with code 1 (0 restarts)" in degraded["message"] or \
        "the engine exited with code 1 (1 restarts)" in degraded["message"], degraded
    assert "RepositoryNotFoundError" in degraded["message"] and "Qwen/Qwen3-0.6B-Typo" in degraded["message"]
    assert condition(s, "Available")["reason"] == "ModelNotFound"
    events = kube.items("events", "--field-selector", "involvedObject.name=typo,reason=ModelNotFound")
    assert events and events[0]["type"] == "Warning"
    kube("delete", "md", "typo", "--timeout=60s")
