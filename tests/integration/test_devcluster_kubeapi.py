"""The in-memory API as kubectl and client-go see a real one: OpenAPI, Status errors, scale, built-in kinds."""
import json
import subprocess
import threading

import httpx
import orjson
import pytest
import yaml

from cxygpt_gateway.discovery.kubernetes import WAKE_PATCH
from harness import REPO, console_script

pytestmark = pytest.mark.timeout(120)


def kubectl(api, *args, stdin=None):
    return subprocess.run([console_script("kubectl"), "--kubeconfig", str(api.kubeconfig), "--cache-dir",
                           str(api.kubeconfig.parent / "kc"), *args], capture_output=True, text=True, input=stdin,
                          timeout=60)


def sim_md(name, replicas=1):
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"name": name, "source": "hf://Qwen/Qwen3-0.6B"}, "replicas": replicas,
                     "engine": {"kind": "sim"}}}


def test_plain_apply_validates_and_explain_documents(kube_api):
    out = kubectl(kube_api, "apply", "-f", str(REPO / "examples"))
    assert out.returncode == 0, out.stderr
    assert "namespace/llm created" in out.stdout and "modeldeployment.cxygpt.io/qwen3-small created" in out.stdout
    # strict validation reaches the server: an unknown field is refused, not dropped
    bad = sim_md("typo")
    bad["spec"]["replicaz"] = 2
    out = kubectl(kube_api, "apply", "-f", "-", stdin=yaml.safe_dump(bad))
    assert out.returncode != 0 and "replicaz" in out.stderr

    out = kubectl(kube_api, "explain", "modeldeployment.spec")
    assert out.returncode == 0, out.stderr
    assert "KIND:       ModelDeployment" in out.stdout and "replicas" in out.stdout
    out = kubectl(kube_api, "explain", "modeldeployment.spec.model")
    assert out.returncode == 0 and "The model to serve." in out.stdout
    out = kubectl(kube_api, "explain", "deployment.spec.strategy.rollingUpdate")
    assert out.returncode == 0 and "maxSurge" in out.stdout

    root = httpx.get(kube_api.url + "/openapi/v3").json()["paths"]
    assert {"api/v1", "apis/apps/v1", "apis/cxygpt.io/v1alpha1", "apis/networking.k8s.io/v1"} <= set(root)
    v2 = httpx.get(kube_api.url + "/openapi/v2").json()
    assert v2["swagger"] == "2.0" and "io.cxygpt.v1alpha1.ModelDeployment" in v2["definitions"]


def test_errors_are_status_objects(kube_api):
    out = kubectl(kube_api, "get", "md", "nope")
    assert out.returncode == 1
    assert out.stderr.strip() == 'Error from server (NotFound): modeldeployments.cxygpt.io "nope" not found'
    status = httpx.get(kube_api.url + "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments/nope").json()
    assert status == {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": 404,
                      "reason": "NotFound", "message": 'modeldeployments.cxygpt.io "nope" not found',
                      "details": {"name": "nope", "group": "cxygpt.io", "kind": "modeldeployments"}}
    missing_pod = httpx.delete(kube_api.url + "/api/v1/namespaces/default/pods/p").json()
    assert missing_pod["message"] == 'pods "p" not found' and missing_pod["details"]["group"] == ""
    assert kubectl(kube_api, "apply", "-f", "-", stdin=yaml.safe_dump(sim_md("twice"))).returncode == 0
    out = kubectl(kube_api, "create", "-f", "-", stdin=yaml.safe_dump(sim_md("twice")))
    assert out.stderr.strip() == ('Error from server (AlreadyExists): error when creating "STDIN": '
                                  'modeldeployments.cxygpt.io "twice" already exists')
    assert "kmock" not in out.stderr + json.dumps(status)


def test_a_json_patch_that_does_not_apply_is_a_422(kube_api):
    """kopf removes finalizers with a JSON patch that first tests the resourceVersion it read; a newer version
    must answer 422 (kopf then re-reads), never a 500 (kopf resent the same stale patch for half a minute)."""
    assert kubectl(kube_api, "apply", "-f", "-", stdin=yaml.safe_dump(sim_md("patched"))).returncode == 0
    url = kube_api.url + "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments/patched"
    version = httpx.get(url).json()["metadata"]["resourceVersion"]
    headers = {"Content-Type": "application/json-patch+json"}
    ok = httpx.patch(url, headers=headers, json=[{"op": "test", "path": "/metadata/resourceVersion", "value": version},
                                                 {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}])
    assert ok.status_code == 200 and ok.json()["metadata"]["labels"] == {"a": "b"}
    stale = httpx.patch(url, headers=headers, json=[{"op": "test", "path": "/metadata/resourceVersion",
                                                     "value": version}, {"op": "remove", "path": "/metadata/labels"}])
    assert stale.status_code == 422 and stale.json()["kind"] == "Status", stale.text
    missing = httpx.patch(url, headers=headers, json=[{"op": "remove", "path": "/metadata/nothing"}])
    assert missing.status_code == 422
    assert httpx.get(url).json()["metadata"]["labels"] == {"a": "b"}  # nothing of the refused patches applied


def test_kubectl_scale(kube_api):
    assert kubectl(kube_api, "apply", "-f", "-", stdin=yaml.safe_dump(sim_md("big"))).returncode == 0
    out = kubectl(kube_api, "scale", "md", "big", "--replicas=3")
    assert (out.returncode, out.stdout.strip()) == (0, "modeldeployment.cxygpt.io/big scaled"), out.stderr
    md = json.loads(kubectl(kube_api, "get", "md", "big", "-o", "json").stdout)
    assert md["spec"]["replicas"] == 3 and md["metadata"]["generation"] == 2
    scale = httpx.get(kube_api.url + "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments/big/scale").json()
    assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1" and scale["spec"] == {"replicas": 3}

    # a conditional write, as a gateway waking a model from zero makes it: a JSON patch of the Scale
    headers = {"Content-Type": "application/json-patch+json"}
    from_zero = orjson.loads(WAKE_PATCH)
    stale = httpx.patch(kube_api.url + "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments/big/scale",
                        headers=headers, json=from_zero)
    assert stale.status_code == 422 and stale.json()["kind"] == "Status"
    assert kubectl(kube_api, "scale", "md", "big", "--replicas=0").returncode == 0
    woken = httpx.patch(kube_api.url + "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments/big/scale",
                        headers=headers, json=from_zero)
    assert woken.status_code == 200 and woken.json()["spec"] == {"replicas": 1}
    md = json.loads(kubectl(kube_api, "get", "md", "big", "-o", "json").stdout)
    assert md["spec"]["replicas"] == 1 and md["metadata"]["generation"] == 4

    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
                  "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                           "template": {"metadata": {"labels": {"app": "web"}},
                                        "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
    assert kubectl(kube_api, "apply", "-f", "-", stdin=yaml.safe_dump(deployment)).returncode == 0
    out = kubectl(kube_api, "scale", "deployment", "web", "--replicas=2")
    assert (out.returncode, out.stdout.strip()) == (0, "deployment.apps/web scaled"), out.stderr
    assert json.loads(kubectl(kube_api, "get", "deployment", "web", "-o", "json").stdout)["spec"]["replicas"] == 2


@pytest.mark.parametrize("path,kind,api_version", [
    ("/api/v1/namespaces/default/pods", "Pod", "v1"),
    ("/apis/networking.k8s.io/v1/namespaces/default/networkpolicies", "NetworkPolicy", "networking.k8s.io/v1"),
    ("/api/v1/namespaces/default/events", "Event", "v1"),
    ("/apis/events.k8s.io/v1/namespaces/default/events", "Event", "events.k8s.io/v1"),
])
def test_builtin_kinds_the_operator_uses(kube_api, path, kind, api_version):
    url = kube_api.url + path
    seen = []
    watching = threading.Event()

    def watch():
        with httpx.stream("GET", url, params={"watch": "true", "labelSelector": "app=a"}, timeout=30) as r:
            watching.set()
            for line in r.iter_lines():
                if line:
                    event = json.loads(line)
                    seen.append((event["type"], event["object"]["metadata"]["name"]))
                    if event["type"] == "DELETED":
                        return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(10)
    for name, app in (("one", "a"), ("two", "b")):
        body = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "labels": {"app": app}}}
        assert httpx.post(url, json=body).status_code == 201
    listed = httpx.get(url, params={"labelSelector": "app=a"}).json()
    assert listed["kind"] == f"{kind}List" and [i["metadata"]["name"] for i in listed["items"]] == ["one"]
    patched = httpx.patch(f"{url}/one", json={"metadata": {"annotations": {"x": "y"}}},
                          headers={"Content-Type": "application/merge-patch+json"}).json()
    assert patched["metadata"]["annotations"] == {"x": "y"}
    assert httpx.delete(f"{url}/one").status_code == 200
    watcher.join(10)
    assert seen == [("ADDED", "one"), ("MODIFIED", "one"), ("DELETED", "one")]
    assert httpx.get(f"{url}/one").status_code == 404


def test_protobuf_bodies_are_refused_clearly(kube_api):
    # kubectl's imperative `create namespace|configmap` sends protobuf, which the in-memory API cannot decode
    out = kubectl(kube_api, "create", "namespace", "pb")
    assert out.returncode == 1 and "Error from server (UnsupportedMediaType)" in out.stderr, out.stderr
    assert kubectl(kube_api, "apply", "-f", "-", stdin=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "pb"}})).returncode == 0


def test_field_selectors_pick_the_named_object(kube_api):
    """kubectl wait and rollout status watch one object through metadata.name: another must not answer for it."""
    for name in ("aa-other", "zz-named"):
        assert kubectl(kube_api, "apply", "-f", "-", stdin=yaml.safe_dump(sim_md(name))).returncode == 0
    base = kube_api.url + "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments"
    names = lambda selector: [o["metadata"]["name"] for o in httpx.get(base, params={"fieldSelector": selector}).json()["items"]]  # noqa: E731
    assert names("metadata.name=zz-named") == ["zz-named"]
    assert names("metadata.name!=zz-named") == ["aa-other"]
    assert names("metadata.name=zz-named,metadata.namespace=default") == ["zz-named"]
    assert names("metadata.namespace=elsewhere") == []
    httpx.patch(base + "/aa-other/status", headers={"Content-Type": "application/merge-patch+json"},
                json={"status": {"conditions": [{"type": "Available", "status": "True"}]}}).raise_for_status()
    out = kubectl(kube_api, "wait", "--for=condition=Available", "md/zz-named", "--timeout=2s")
    assert out.returncode != 0 and "aa-other" not in out.stdout  # nothing reconciles here: it times out
