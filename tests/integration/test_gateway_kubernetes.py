"""Kubernetes discovery against the in-memory API: Ready ModelDeployments appear in /v1/models, deleted ones go."""
from __future__ import annotations

import httpx
from cxygpt_profiles import default_table
from kubernetes import client
from test_gateway_support import start_gateway, start_sim, wait_until

GROUP, VERSION, PLURAL, NS = "cxygpt.io", "v1alpha1", "modeldeployments", "default"


def model_ids(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]]


def test_ready_modeldeployment_is_routed_through_its_endpointslice_and_deleting_it_removes_it(tmp_path, kube_api):
    sim = start_sim(tmp_path, "qwen3-14b", ttft_ms=5, itl_ms=1)
    gateway = start_gateway(tmp_path, {}, extra_args=("--kubernetes", "--kubeconfig", str(kube_api.kubeconfig)))
    api = kube_api.api_client()
    custom, discovery = client.CustomObjectsApi(api), client.DiscoveryV1Api(api)
    try:
        assert model_ids(gateway.url) == []
        assert httpx.get(gateway.url + "/readyz").status_code == 503
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment", "metadata": {"name": "qwen3-14b"},
            "spec": {"model": {"name": "qwen3-14b", "source": "hf://Qwen/Qwen3-14B"}, "mode": "multi"}})
        limits = default_table().get("DEV_32G").limits.model_dump(by_alias=True)
        # the Service's address is dead on purpose: traffic must follow the EndpointSlice to the engine pod
        status = {"phase": "Starting", "mode": "multi", "profile": "DEV_32G", "limits": limits,
                  "endpoint": "http://127.0.0.1:9"}
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "qwen3-14b", {"status": status})
        discovery.create_namespaced_endpoint_slice(NS, {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "qwen3-14b-abcde", "labels": {"kubernetes.io/service-name": "qwen3-14b"}},
            "ports": [{"name": "http", "port": sim.port, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]})
        assert model_ids(gateway.url) == []  # Starting is not routable
        custom.patch_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "qwen3-14b",
                                                     {"status": {**status, "phase": "Ready"}})
        wait_until(lambda: model_ids(gateway.url) == ["qwen3-14b"], timeout=10, what="model listed")
        r = httpx.post(gateway.url + "/v1/chat/completions", timeout=10, json={
            "model": "qwen3-14b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
        limits_view = httpx.get(gateway.url + "/v1/limits").json()
        assert (limits_view["profile"], limits_view["max_output_tokens"]) == ("DEV_32G", 256)
        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "qwen3-14b")
        wait_until(lambda: model_ids(gateway.url) == [], timeout=10, what="model gone")
        assert httpx.post(gateway.url + "/v1/chat/completions", timeout=10, json={
            "model": "qwen3-14b", "messages": [{"role": "user", "content": "hi"}]}).status_code == 404
    finally:
        api.close()
        gateway.stop()
        sim.stop()
