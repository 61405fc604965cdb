"""The console's Kubernetes access is exactly what the chart grants it: the real console process, configured by the
chart's Deployment, reaches the API only through a proxy that enforces the chart's rules for its ServiceAccount (as
the API server's RBAC authorizer would); every page is used; nothing it does is refused, every grant is used, and
nothing it sends is a write.

On the real control plane (kube-apiserver with RBAC, the chart installed by helm) the same check runs with the
console authenticated as its ServiceAccount (a token from the TokenRequest API in its kubeconfig): the API server then
refuses what the chart does not grant, and the proxy only records (`authorize` allows everything)."""
from __future__ import annotations

import json

import httpx
import pytest
from test_helm_install import Install, local_args
from test_helm_rbac import RecordingProxy, allowed, attributes, rule_allows, rules_for

from cxygpt_dev.kubeapi import write_kubeconfig
from harness import ServerProcess, console_script, free_port, wait_until

RELEASE, NAMESPACE = "cxygpt", "cxygpt"
SERVED = "rbac-model"
READS = {"get", "list", "watch"}


def sse_events(url: str, event: str, count: int = 1, timeout: float = 20) -> list[str]:
    """The data of the first `count` events named `event` of a server-sent events stream."""
    found = []
    with httpx.stream("GET", url, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        name, data = None, []
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line and name:
                if name == event:
                    found.append("\n".join(data))
                    if len(found) == count:
                        return found
                name, data = None, []
    return found


def model_objects(namespace: str, engine_port: int) -> list[dict]:
    """A ModelDeployment as the operator leaves it (status with its selector), one engine pod, its Service's
    EndpointSlice (the engine a token count goes to) and an Event about it."""
    name = f"m-{namespace}"
    selector = {"app.kubernetes.io/name": "cxygpt-engine", "app.kubernetes.io/instance": name}
    return [
        {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name, "namespace": namespace},
         "spec": {"model": {"name": f"{SERVED}-{namespace}", "source": "hf://Qwen/Qwen3-0.6B"}, "engine": {"kind": "sim"}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-5d8f7c9b6a-x1y2z", "namespace": namespace,
                                                         "labels": selector},
         "spec": {"containers": [{"name": "engine", "image": "cxygpt/cxygpt-sim:0.1.0"}]},
         "status": {"phase": "Running", "containerStatuses": [{"name": "engine", "ready": True, "restartCount": 0,
                                                               "image": "x", "imageID": "x", "state": {"running": {}}}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
         "metadata": {"name": f"{name}-engine", "namespace": namespace,
                      "labels": {"kubernetes.io/service-name": name, "app.kubernetes.io/managed-by": "cxygpt-operator"}},
         "ports": [{"name": "http", "port": engine_port, "protocol": "TCP"}],
         "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}]},
        {"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{name}.1", "namespace": namespace},
         "involvedObject": {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "name": name,
                            "namespace": namespace},
         "reason": "ProfileSelected", "message": "chosen", "type": "Normal", "count": 1,
         "lastTimestamp": "2026-12-01T10:00:00Z"},
    ]


@pytest.mark.parametrize("watched", [[], ["llm", "team-b"]], ids=["cluster-wide", "watch-namespaces"])
def test_the_console_uses_exactly_what_the_chart_grants(watched, kube_api, tmp_path):
    sets = ["console.enabled=true", *([f"operator.watchNamespaces={{{','.join(watched)}}}"] if watched else [])]
    install = Install(kube_api, tmp_path, NAMESPACE, *sets)
    rules = rules_for(install.objects, f"{RELEASE}-console")
    assert rules, "no rules bound to the console's ServiceAccount"
    proxy = RecordingProxy(kube_api.url, lambda a: allowed(rules, a)).start()
    namespaces = watched or ["default"]
    engine_port = free_port()  # the first namespace's model's engine (a token count goes there)
    engine = ServerProcess([console_script("cxygpt-sim"), "serve", "org/m", "--served-model-name",
                            f"{SERVED}-{namespaces[0]}", "--host",
                            "127.0.0.1", "--port", str(engine_port), "--ttft-ms", "0", "--itl-ms", "0"],
                           port=engine_port, log_path=tmp_path / "sim.log").start()
    try:
        install.install(*watched)
        install.apply([{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-node", "labels": {
            "nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "2", "nvidia.com/gpu.product": "NVIDIA-H100"}}}]
                      + [o for ns in namespaces for o in model_objects(ns, engine_port)])
        for ns in namespaces:  # the status the operator writes (the subresource: a plain apply leaves it out)
            install.kubectl("patch", "md", f"m-{ns}", "-n", ns, "--subresource=status", "--type=merge", "-p", json.dumps(
                {"status": {"phase": "Ready", "readyReplicas": 1, "replicas": 1, "ready": "1/1",
                            "selector": f"app.kubernetes.io/name=cxygpt-engine,app.kubernetes.io/instance=m-{ns}",
                            "limits": {"maxInputTokens": 1000}, "gpu": {"node": "gpu-node", "count": 2}}}))

        # the console as the chart runs it: the Deployment's args, local ports, through the enforcing proxy
        c = install.container("console")
        port = free_port()
        kubeconfig = write_kubeconfig(tmp_path / "console.kubeconfig", proxy.url)
        console = ServerProcess([console_script(c["command"][0]), *local_args(c["args"], {
            "--host": "127.0.0.1", "--port": str(port), "--gateway-url": f"http://127.0.0.1:{free_port()}"}),
            "--kubeconfig", str(kubeconfig)], port=port, health="/healthz", log_path=tmp_path / "console.log")
        install.processes.append(console.start())

        # every page and API the console has
        fleet = wait_until(lambda: (lambda t: all(f"m-{ns}" in t for ns in namespaces) and t)(
            httpx.get(console.url + "/", timeout=10).text), timeout=20, what="the models on the fleet page")
        assert "gpu-node" in httpx.get(console.url + "/gpus", timeout=10).text and fleet
        for ns in namespaces:
            page = httpx.get(f"{console.url}/models/{ns}/m-{ns}", timeout=10)
            assert page.status_code == 200 and "ProfileSelected" in page.text, page.text[:2000]
            assert sse_events(f"{console.url}/events/logs/{ns}/m-{ns}-5d8f7c9b6a-x1y2z", "lines")
        counted = httpx.post(console.url + "/api/tokenize", timeout=10, json={
            "model": f"{SERVED}-{namespaces[0]}", "messages": [{"role": "user", "content": "How many tokens is this?"}]})
        assert counted.status_code == 200 and counted.json()["count"] > 0, counted.text
        assert f"m-{namespaces[0]}" in sse_events(console.url + "/events/fleet", "fleet")[0]
        wait_until(lambda: any(a.resource == "endpointslices" and a.namespace == NAMESPACE
                               for call in proxy.calls for a in attributes(call)), timeout=10,
                   what="the gateway Service's slices read")
    finally:
        install.stop()
        engine.stop()
        proxy.stop()

    denied = sorted({str(a) for a in proxy.denied})
    assert denied == [], f"the chart's RBAC refuses calls the console makes: {denied}"
    calls = [a for call in proxy.calls for a in attributes(call)]
    assert {call.method for call in proxy.calls} == {"GET"}, "the console wrote to the API server"
    assert {a.verb for a in calls if a.resource} <= READS
    assert not any(a.resource.startswith("secrets") for a in calls)
    # every grant is used: each verb on each resource of each rule allows some call the console made (a proxy that
    # records nothing fails here)
    for scope, rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    atom = {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
                    assert any((scope is None or scope == a.namespace) and rule_allows(atom, a) for a in calls), \
                        f"granted but never used: {verb} {group or 'core'}/{resource} in {scope or 'the cluster'}"
    if watched:  # namespaced calls only in the watched namespaces, and the release's for the gateway's slices
        assert {a.namespace for a in calls if a.namespace} == {*watched, NAMESPACE}
        assert {a.resource for a in calls if a.namespace == NAMESPACE} == {"endpointslices"}
