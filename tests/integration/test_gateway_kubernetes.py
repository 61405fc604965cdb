"""Kubernetes discovery against the in-memory API: ready endpoints serve, a served name with none is a 503 that
says why, names have one owner across the watched namespaces, deleted models go."""
from __future__ import annotations

import time

import httpx
import pytest
from kubernetes import client
from test_gateway_support import start_gateway, start_sim, wait_until

from cxygpt_profiles import default_table

GROUP, VERSION, PLURAL = "cxygpt.io", "v1alpha1", "modeldeployments"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def model_ids(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]]


def chat(url: str, model: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=10, json={"model": model, **CHAT})


def answered(url: str, model: str, status: int, words: str = ""):
    """Waits on what the gateway answers (the event itself), not on time."""
    def check():
        r = chat(url, model)
        return r if r.status_code == status and words in r.text else None
    return wait_until(check, timeout=10, what=f"{model} answered {status} {words!r}")


class Cluster:
    def __init__(self, api):
        self.custom, self.discovery = client.CustomObjectsApi(api), client.DiscoveryV1Api(api)
        self.core = client.CoreV1Api(api)

    def namespace(self, name):
        self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def modeldeployment(self, ns, name, served):
        self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment", "metadata": {"name": name},
            "spec": {"model": {"name": served, "source": "hf://Qwen/Qwen3-14B"}, "mode": "multi"}})

    def status(self, ns, name, profile="DEV_32G", **status):
        limits = default_table().get(profile).limits.model_dump(by_alias=True)
        # the Service's address is dead on purpose: traffic must follow the EndpointSlices to the engine pods
        body = {"mode": "multi", "profile": profile, "limits": limits, "endpoint": "http://127.0.0.1:9", **status}
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, {"status": body})

    def endpoints(self, ns, service, port, ready=True, terminating=False):
        body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": f"{service}-abcde", "namespace": ns,
                             "labels": {"kubernetes.io/service-name": service,  # and the Service's own labels
                                        "app.kubernetes.io/managed-by": "cxygpt-operator"}},
                "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["127.0.0.1"],
                               "conditions": {"ready": ready, "serving": ready or terminating,
                                              "terminating": terminating}}]}
        try:
            self.discovery.create_namespaced_endpoint_slice(ns, body)
        except client.ApiException:
            self.discovery.patch_namespaced_endpoint_slice(f"{service}-abcde", ns, body)


def test_ready_endpoints_serve_in_any_phase_and_a_model_without_one_is_503_saying_why(tmp_path, kube_api):
    sim = start_sim(tmp_path, "qwen3-14b", ttft_ms=5, itl_ms=1)
    gateway = start_gateway(tmp_path, {}, extra_args=("--kubernetes", "--kubeconfig", str(kube_api.kubeconfig)))
    api = kube_api.api_client()
    k = Cluster(api)
    try:
        assert model_ids(gateway.url) == []
        assert httpx.get(gateway.url + "/readyz").status_code == 503
        assert chat(gateway.url, "qwen3-14b").status_code == 404  # nothing serves that name yet

        k.modeldeployment("default", "qwen3-14b", "qwen3-14b")  # no status yet: a served name, not an unknown one
        r = answered(gateway.url, "qwen3-14b", 503, "being set up")
        assert r.json()["error"]["code"] == "no_ready_replica" and int(r.headers["Retry-After"]) >= 1

        k.status("default", "qwen3-14b", phase="Starting", ready="0/1")
        r = answered(gateway.url, "qwen3-14b", 503, "is starting (0/1 replicas ready")
        assert r.headers["Retry-After"] == "10"

        # a slice that is not an engine Service's (no operator label): not watched, not routed
        k.discovery.create_namespaced_endpoint_slice("default", {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "stray", "labels": {"kubernetes.io/service-name": "qwen3-14b"}},
            "ports": [{"name": "http", "port": sim.port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})
        k.status("default", "qwen3-14b", phase="Starting", ready="0/2")  # an event after the slice's
        answered(gateway.url, "qwen3-14b", 503, "is starting (0/2 replicas ready")
        k.endpoints("default", "qwen3-14b", sim.port)  # one replica ready, the rollout not done: it serves
        wait_until(lambda: model_ids(gateway.url) == ["qwen3-14b"], timeout=10, what="model listed")
        assert chat(gateway.url, "qwen3-14b").status_code == 200
        limits_view = httpx.get(gateway.url + "/v1/limits").json()
        assert (limits_view["profile"], limits_view["max_output_tokens"]) == ("DEV_32G", 256)

        k.status("default", "qwen3-14b", phase="PartiallyReady", ready="1/2")
        k.endpoints("default", "qwen3-14b", sim.port, ready=False, terminating=True)  # draining: no new requests
        answered(gateway.url, "qwen3-14b", 503, "is restarting")
        assert model_ids(gateway.url) == []

        k.endpoints("default", "qwen3-14b", sim.port)
        answered(gateway.url, "qwen3-14b", 200)
        k.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "qwen3-14b")
        answered(gateway.url, "qwen3-14b", 404, "does not exist")
        assert model_ids(gateway.url) == []
    finally:
        api.close()
        gateway.stop()
        sim.stop()


def test_watched_namespaces_share_one_name_space_and_the_oldest_modeldeployment_owns_a_name(tmp_path, kube_api):
    owner_sim = start_sim(tmp_path, "shared", ttft_ms=1, itl_ms=1)
    other_sim = start_sim(tmp_path, "shared", extra_names=("marker",), ttft_ms=1, itl_ms=1)
    api = kube_api.api_client()
    k = Cluster(api)
    for ns in ("tenant-b", "tenant-a", "elsewhere"):
        k.namespace(ns)
    gateway = start_gateway(tmp_path, {}, extra_args=(
        "--kubernetes", "--kubeconfig", str(kube_api.kubeconfig), "--namespace", "tenant-b", "--namespace", "tenant-a"))
    try:
        k.modeldeployment("tenant-b", "chat", "shared")
        k.status("tenant-b", "chat", "SRV_MULTI_80G", phase="Ready")
        k.endpoints("tenant-b", "chat", owner_sim.port)
        answered(gateway.url, "shared", 200)
        time.sleep(1.1)  # creationTimestamp has one-second granularity: the second one must be younger
        k.modeldeployment("tenant-a", "chat", "shared")  # alphabetically first, younger: it must not take the name
        k.status("tenant-a", "chat", "SRV_MULTI_80G", phase="Ready")
        k.endpoints("tenant-a", "chat", other_sim.port)
        k.modeldeployment("elsewhere", "lost", "unwatched")  # a namespace the gateway does not watch
        k.status("elsewhere", "lost", phase="Ready")
        # each watch delivers in order: once the gateway routes this marker, it has seen all of the above
        k.modeldeployment("tenant-a", "marker", "marker")
        k.status("tenant-a", "marker", "SRV_MULTI_80G", phase="Ready")
        k.endpoints("tenant-a", "marker", other_sim.port)
        answered(gateway.url, "marker", 200)
        before = sim_requests(other_sim)
        for _ in range(8):
            assert chat(gateway.url, "shared").status_code == 200
        assert sim_requests(owner_sim) >= 8 and sim_requests(other_sim) == before  # none reaches the younger one
        assert chat(gateway.url, "unwatched").status_code == 404

        k.custom.delete_namespaced_custom_object(GROUP, VERSION, "tenant-b", PLURAL, "chat")  # the owner goes
        wait_until(lambda: chat(gateway.url, "shared").status_code == 200 and sim_requests(other_sim) > before,
                   timeout=10, what="the name handed to the next oldest")
    finally:
        api.close()
        gateway.stop()
        owner_sim.stop()
        other_sim.stop()


def sim_requests(sim) -> float:
    """Requests an engine has finished, from its own vLLM metrics."""
    text = httpx.get(sim.url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def gateway_replicas(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("cxygpt_gateway_replicas ")))


def test_the_gateways_sharing_the_engines_are_counted_from_their_services_ready_endpoints(tmp_path, kube_api):
    api = kube_api.api_client()
    k = Cluster(api)
    for ns in ("llm", "cxygpt-system"):
        k.namespace(ns)
    # the gateway's own namespace is not one it watches for models: its Service's slices are read all the same
    gateway = start_gateway(tmp_path, {}, env={"CXYGPT_GATEWAY_SERVICE": "cxygpt-system/cxygpt-gateway",
                                               "CXYGPT_GATEWAY_REPLICAS": "3"},
                            extra_args=("--kubernetes", "--kubeconfig", str(kube_api.kubeconfig), "--namespace", "llm"))

    def slice_of(service, *pods):
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                "metadata": {"name": f"{service}-x", "labels": {"kubernetes.io/service-name": service}},
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": [f"10.0.0.{i}"], "conditions": conditions,
                               "targetRef": {"kind": "Pod", "namespace": "cxygpt-system", "name": f"{service}-{i}"}}
                              for i, conditions in enumerate(pods)]}
    try:
        assert gateway_replicas(gateway.url) == 3                 # nothing listed yet: the setting
        k.discovery.create_namespaced_endpoint_slice("cxygpt-system", slice_of(
            "other", *[{"ready": True}] * 5))                      # another Service's pods are not gateways
        ready, not_ready = {"ready": True}, {"ready": False}
        k.discovery.create_namespaced_endpoint_slice("cxygpt-system", slice_of(
            "cxygpt-gateway", ready, ready, not_ready))
        wait_until(lambda: gateway_replicas(gateway.url) == 2, timeout=10, what="two ready gateways counted")
        k.discovery.patch_namespaced_endpoint_slice("cxygpt-gateway-x", "cxygpt-system", slice_of(
            "cxygpt-gateway", ready, {"ready": False, "serving": True, "terminating": True}, not_ready))
        wait_until(lambda: gateway_replicas(gateway.url) == 1, timeout=10, what="a terminating gateway not counted")
        k.discovery.delete_namespaced_endpoint_slice("cxygpt-gateway-x", "cxygpt-system")
        wait_until(lambda: gateway_replicas(gateway.url) == 3, timeout=10, what="the setting again")
        assert model_ids(gateway.url) == []                        # and no slice of theirs became a route
    finally:
        api.close()
        gateway.stop()


def crd_has_adapters() -> bool:
    """Whether the CRD declares spec.adapters (the operator's side of issue 27: until it is merged, the API refuses a
    ModelDeployment with adapters)."""
    import yaml

    from harness import REPO
    crd = yaml.safe_load((REPO / "deploy/crds/modeldeployments.cxygpt.io.yaml").read_text())
    return all("adapters" in v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
               for v in crd["spec"]["versions"])


@pytest.mark.skipif(not crd_has_adapters(), reason="the CRD has no spec.adapters yet (issue 27's operator side)")
def test_a_modeldeployments_adapters_are_served_as_models_and_a_removed_one_goes(tmp_path, kube_api):
    from cxygpt_dev.hub import make_adapter_repo
    repo = make_adapter_repo(tmp_path / "repos", "t/sql", base_model="Qwen/Qwen3-14B")
    sim = start_sim(tmp_path, "qwen3-14b", ttft_ms=5, itl_ms=1,
                    extra_args=("--enable-lora", "--max-loras", "2", "--lora-modules", f"sql={repo}"))
    gateway = start_gateway(tmp_path, {"engine_metrics_interval_s": 0.2, "adapter_wait_s": 1},
                            extra_args=("--kubernetes", "--kubeconfig", str(kube_api.kubeconfig)))
    api = kube_api.api_client()
    k = Cluster(api)
    try:
        k.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment", "metadata": {"name": "qwen3-14b"},
            "spec": {"model": {"name": "qwen3-14b", "source": "hf://Qwen/Qwen3-14B"}, "mode": "multi",
                     "adapters": [{"name": "sql", "source": "hf://t/sql@main"},
                                  {"name": "support", "source": "hf://t/support@main"}]}})
        r = answered(gateway.url, "sql", 503, "adapter sql of model qwen3-14b")  # no status yet: 503, not 404
        assert r.json()["error"]["code"] == "no_ready_replica"
        k.status("default", "qwen3-14b", phase="Ready", ready="1/1")
        k.endpoints("default", "qwen3-14b", sim.port)
        wait_until(lambda: set(model_ids(gateway.url)) == {"qwen3-14b", "sql", "support"}, timeout=10,
                   what="the base and its adapters listed")
        cards = {m["id"]: m for m in httpx.get(gateway.url + "/v1/models", timeout=5).json()["data"]}
        assert (cards["sql"]["parent"], cards["sql"]["root"]) == ("qwen3-14b", "hf://t/sql@main")
        r = answered(gateway.url, "sql", 200)
        assert r.json()["model"] == "sql" and r.headers["x-cxygpt-model"] == "sql"
        # listed, not loaded on the engine (the operator loads it): a 503 that says so, never a 404
        r = answered(gateway.url, "support", 503, "not loaded on any ready replica")
        assert r.json()["error"]["code"] == "adapter_not_loaded"

        k.custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "qwen3-14b",
                                                {"spec": {"adapters": [{"name": "support", "source": "hf://t/support@main"}]}})
        answered(gateway.url, "sql", 404, "does not exist")   # removed, nothing of it in flight: unknown now
        assert "sql" not in model_ids(gateway.url)
    finally:
        api.close()
        gateway.stop()
        sim.stop()
