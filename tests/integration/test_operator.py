"""The real cxygpt-operator process against the in-memory Kubernetes API over HTTP, driven with real kubectl."""
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes import client

from harness import REPO, ServerProcess, console_script, free_port, wait_until

NODES = {
    "gpu-32g": {"nvidia.com/gpu.memory": "32607", "nvidia.com/gpu.count": "1",
                "nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-5090"},
    "gpu-80g": {"nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "1",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "gpu-2x80g": {"nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "2",
                  "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
}


class Cluster:
    def __init__(self, kube_api, tmp: Path):
        self.kube_api, self.tmp = kube_api, tmp
        self.api = kube_api.api_client()
        self.core, self.apps = client.CoreV1Api(self.api), client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.operator = None

    def kubectl(self, *args, check=True, stdin=None) -> subprocess.CompletedProcess:
        out = subprocess.run([console_script("kubectl"), "--kubeconfig", str(self.kube_api.kubeconfig),
                              "--cache-dir", str(self.tmp / "kubectl-cache"), *args],
                             capture_output=True, text=True, input=stdin, timeout=30)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {out.stderr}")
        return out

    def apply(self, docs: list[dict] | dict, check=True):
        docs = docs if isinstance(docs, list) else [docs]
        return self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs), check=check)

    def add_node(self, name):
        self.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": NODES[name]}})

    def start_operator(self, *extra):
        port, self.metrics_port = free_port(), free_port()
        self.operator = ServerProcess(
            [console_script("cxygpt-operator"), "--kubeconfig", str(self.kube_api.kubeconfig),
             "--liveness", f"http://127.0.0.1:{port}/healthz", "--metrics-host", "127.0.0.1",
             "--metrics-port", str(self.metrics_port), *extra],
            port=port, log_path=self.tmp / "operator.log", health="/healthz").start()

    def md(self, name, ns="default"):
        return self.custom.get_namespaced_custom_object("cxygpt.io", "v1alpha1", ns, "modeldeployments", name)

    def wait_status(self, name, predicate, ns="default", timeout=15, what="status"):
        def check():
            status = self.md(name, ns).get("status") or {}
            return status if predicate(status) else None
        try:
            return wait_until(check, timeout=timeout, what=f"{name} {what}")
        except AssertionError:
            raise AssertionError(f"{what}: {json.dumps(self.md(name, ns).get('status'), indent=1)}\n"
                                 f"operator log:\n{self.operator.log() if self.operator else ''}") from None

    def deployment(self, name, ns="default"):
        return self.api.sanitize_for_serialization(self.apps.read_namespaced_deployment(name, ns))

    def args(self, name, ns="default"):
        return self.deployment(name, ns)["spec"]["template"]["spec"]["containers"][0]["args"]


def md(name, *, mode="multi", profile="auto", replicas=1, source="hf://Qwen/Qwen3-14B", int4=True, **extra):
    model = {"name": name, "source": source}
    if int4:
        model["variants"] = {"int4": "hf://Qwen/Qwen3-14B-GPTQ-Int4"}
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": model, "mode": mode, "profile": profile, "replicas": replicas, **extra}}


def flag(args, name):
    return args[args.index(name) + 1]


@pytest.fixture
def cluster(kube_api, tmp_path):
    c = Cluster(kube_api, tmp_path)
    yield c
    if c.operator:
        c.operator.stop()


def test_create_update_and_delete(cluster):
    cluster.add_node("gpu-80g")
    cluster.start_operator()
    cluster.apply(md("chat"))
    status = cluster.wait_status("chat", lambda s: s.get("phase") == "Starting")
    assert status["profile"] == "SRV_80G" and status["mode"] == "multi"
    assert status["gpu"] == {"product": "NVIDIA-H100-80GB-HBM3", "memoryMiB": 81559, "count": 1,
                             "resource": "nvidia.com/gpu", "node": "gpu-80g", "summary": "1x79GiB"}
    assert status["sizing"]["gpus"] == 1 and status["sizing"]["estimates"][0]["fits"] is True
    assert status["fit"]["fits"] and status["fit"]["kvBytesPerToken"] == 81920
    assert status["limits"]["maxInputTokens"] == 16128 and status["endpoint"] == "http://chat.default.svc:8000"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "ProfileSelected": "True", "Available": "False", "Progressing": "True", "Degraded": "False"}

    dep = cluster.deployment("chat")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == status["engineArgs"] and flag(args, "--max-model-len") == "16384"
    assert dep["metadata"]["ownerReferences"][0]["uid"] == cluster.md("chat")["metadata"]["uid"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    svc = cluster.core.read_namespaced_service("chat", "default")
    assert svc.spec.ports[0].port == 8000 and svc.spec.selector == dep["spec"]["selector"]["matchLabels"]

    # the printer columns, as a user sees them
    table = cluster.kubectl("get", "md", "chat").stdout.split("\n")
    assert table[0].split() == ["NAME", "MODEL", "PROFILE", "GPU", "READY", "PHASE", "AGE"]
    assert table[1].split()[:6] == ["chat", "chat", "SRV_80G", "1x79GiB", "0/1", "Starting"]

    # the engine reports ready (the Deployment controller's job on a real cluster)
    cluster.apps.patch_namespaced_deployment_status("chat", "default", {"status": {"replicas": 1, "readyReplicas": 1}})
    status = cluster.wait_status("chat", lambda s: s.get("phase") == "Ready")
    assert status["ready"] == "1/1"

    metrics = wait_until(lambda: (m := httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics").text)
                         and 'phase="Ready"' in m and m, what="operator metrics")
    assert 'cxygpt_operator_model_deployments{phase="Ready",profile="SRV_80G"} 1.0' in metrics
    assert 'cxygpt_operator_gpu_nodes{memory_class="79GiB"} 1.0' in metrics
    assert 'cxygpt_operator_gpus{memory_class="79GiB"} 1.0' in metrics
    assert "cxygpt_operator_time_to_ready_seconds_count 1.0" in metrics
    assert float(metrics.split('cxygpt_operator_reconciles_total{result="ok"} ')[1].split()[0]) >= 2
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

    # a spec update rolls the Deployment with the new profile's args
    old_hash = dep["metadata"]["annotations"]["cxygpt.io/config-hash"]
    cluster.kubectl("patch", "md", "chat", "--type=merge", "-p", '{"spec": {"mode": "single"}}')
    status = cluster.wait_status("chat", lambda s: s.get("observedGeneration") == 2 and s.get("profile") == "SINGLE_80G")
    dep = cluster.deployment("chat")
    assert dep["metadata"]["annotations"]["cxygpt.io/config-hash"] != old_hash
    # one user on an 80 GB card: the model's whole context, a bf16 KV cache
    assert flag(cluster.args("chat"), "--max-model-len") == "40960"
    assert flag(cluster.args("chat"), "--kv-cache-dtype") == "auto"
    assert flag(cluster.args("chat"), "--gpu-memory-utilization") == "0.95"
    assert "context 40960 tokens, the model's own maximum" in status["sizing"]["reason"]

    # kubectl scale goes through the scale subresource's spec path
    cluster.kubectl("patch", "md", "chat", "--type=merge", "-p", '{"spec": {"replicas": 3}}')
    wait_until(lambda: cluster.deployment("chat")["spec"]["replicas"] == 3, what="scaled Deployment")
    assert cluster.deployment("chat")["metadata"]["annotations"]["cxygpt.io/config-hash"] == \
        dep["metadata"]["annotations"]["cxygpt.io/config-hash"]  # scaling does not roll pods

    # delete: kopf releases its finalizer, ownerReferences take the engine objects with it
    cluster.kubectl("delete", "md", "chat", "--timeout=20s")
    assert cluster.kubectl("get", "deployment,service", "-o", "name").stdout.strip() == ""


def test_pending_until_a_node_fits_then_scheduled(cluster):
    cluster.start_operator()
    cluster.apply(md("wait", source="hf://meta-llama/Llama-3.1-70B-Instruct", int4=False))
    status = cluster.wait_status("wait", lambda s: s.get("phase") == "Pending")
    cond = next(c for c in status["conditions"] if c["type"] == "ProfileSelected")
    assert cond["reason"] == "NoMatchingGPU" and "no schedulable GPU node" in cond["message"]
    assert cluster.kubectl("get", "deployment", "-o", "name").stdout.strip() == ""

    cluster.add_node("gpu-2x80g")  # a node event, not a timer, wakes the waiting model
    status = cluster.wait_status("wait", lambda s: s.get("phase") == "Starting", timeout=10)
    assert status["profile"] == "SRV_MULTI_80G"  # 70B: one 80 GB card cannot hold it, two can
    assert flag(cluster.args("wait"), "--tensor-parallel-size") == "2"


def test_profile_follows_hardware(cluster):
    for node in NODES:
        cluster.add_node(node)
    cluster.start_operator()
    cluster.apply([md("multi"), md("single", mode="single"), md("forced", profile="SRV_48G", int4=False),
                   md("large", source="hf://meta-llama/Llama-3.1-70B-Instruct", int4=False)])
    # 14B on one GPU, of the smallest node that has it; 70B on the two of the other
    status = cluster.wait_status("multi", lambda s: s.get("profile") == "SRV_80G")
    assert status["gpu"]["node"] == "gpu-80g" and status["gpu"]["count"] == 1
    status = cluster.wait_status("large", lambda s: s.get("profile") == "SRV_MULTI_80G")
    assert status["gpu"] == {**status["gpu"], "node": "gpu-2x80g", "count": 2}
    cluster.wait_status("single", lambda s: s.get("profile") == "SINGLE_80G")
    # a forced profile needs a matching node: no 48 GB node, but 80 GB ones satisfy its minimum
    cluster.wait_status("forced", lambda s: s.get("profile") == "SRV_48G")

    cluster.kubectl("delete", "node", "gpu-2x80g")
    status = cluster.wait_status("large", lambda s: s.get("phase") == "Pending")
    message = next(c for c in status["conditions"] if c["type"] == "ProfileSelected")["message"]
    assert "closest: SRV_80G on gpu-80g: not on 1 GPU of 81559 MiB: bf16 weights need 134571 MiB" in message
    assert status["sizing"]["estimates"][0]["fits"] is False
    cluster.kubectl("delete", "node", "gpu-80g")
    status = cluster.wait_status("multi", lambda s: s.get("profile") == "DEV_32G")
    assert status["engineArgs"][0] == "Qwen/Qwen3-14B-GPTQ-Int4"
    assert flag(status["engineArgs"], "--max-model-len") == "4096"
    cluster.wait_status("single", lambda s: s.get("profile") == "SINGLE_32G")
    # the forced 48 GB profile has nowhere to go: Pending, its running engine left alone
    status = cluster.wait_status("forced", lambda s: s.get("phase") == "Pending")
    assert status["profile"] == "SRV_48G"


def test_operator_restart_changes_nothing(cluster):
    cluster.add_node("gpu-80g")
    cluster.start_operator()
    cluster.apply(md("steady"))
    cluster.wait_status("steady", lambda s: s.get("phase") == "Starting")

    def versions():
        return {"md": cluster.md("steady")["metadata"]["resourceVersion"],
                "deployment": cluster.deployment("steady")["metadata"]["resourceVersion"],
                "service": cluster.core.read_namespaced_service("steady", "default").metadata.resource_version}
    before = versions()
    cluster.operator.stop()
    cluster.start_operator()
    # a model created after the restart is reconciled after the existing ones were resumed
    cluster.apply(md("sentinel"))
    cluster.wait_status("sentinel", lambda s: s.get("phase") == "Starting")
    assert versions() == before
    assert sorted(cluster.kubectl("get", "deployments", "-o", "name").stdout.split()) == [
        "deployment.apps/sentinel", "deployment.apps/steady"]


def test_bad_specs_are_rejected_or_explained(cluster):
    cluster.add_node("gpu-32g")
    cluster.start_operator()
    bad = md("bad", replicas=-1, profile="SRV_99G")
    out = cluster.apply(bad, check=False)
    assert out.returncode != 0
    assert "replicas must be >= 0" in out.stderr and "profile must be auto or one of" in out.stderr
    typo = md("typo")
    typo["spec"]["modee"] = "single"
    assert "'modee' was unexpected" in cluster.apply(typo, check=False).stderr
    hostile = md("hostile", engine={"args": ["--port=9000", "--trust-remote-code"],
                                    "env": [{"name": "LD_PRELOAD", "value": "/tmp/x.so"}]})
    out = cluster.apply(hostile, check=False)
    assert out.returncode != 0
    for message in ("--port, --host, --served-model-name, --model and --api-key are set by the operator",
                    "set spec.engine.trustRemoteCode: true", "LD_* loader variables"):
        assert message in out.stderr, out.stderr
    assert "spec.replicas: Invalid value: 100000 is greater than the maximum of 64" in \
        cluster.apply(md("many", replicas=100000), check=False).stderr

    # valid but impossible: a forced profile the weights cannot fit (SRV_80G runs on one GPU; 70B needs two)
    cluster.apply(md("huge", profile="SRV_80G", source="hf://meta-llama/Llama-3.1-70B-Instruct", int4=False))
    status = cluster.wait_status("huge", lambda s: s.get("phase") == "Failed")
    cond = next(c for c in status["conditions"] if c["type"] == "ProfileSelected")
    assert cond["reason"] == "InsufficientGPUMemory" and "weights need" in cond["message"]
    assert status["fit"]["fits"] is False

    # a name taken by someone else's Deployment is not overwritten
    cluster.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "taken", "namespace": "default"},
                   "spec": {"selector": {"matchLabels": {"a": "b"}},
                            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}})
    cluster.apply(md("taken"))
    status = cluster.wait_status("taken", lambda s: s.get("phase") == "Failed")
    assert next(c for c in status["conditions"] if c["type"] == "Degraded")["reason"] == "ResourceConflict"
    assert cluster.deployment("taken")["spec"]["template"]["spec"]["containers"][0]["image"] == "x"


def test_examples_apply_with_kubectl(cluster):
    for node in NODES:
        cluster.add_node(node)
    cluster.start_operator()
    cluster.kubectl("apply", "-f", str(REPO / "examples"))
    names = {"llm": ["my-llm", "qwen3-14b", "qwen3-14b-solo"], "default": ["qwen3-small", "qwen3-adapters"]}
    for ns, items in names.items():
        for name in items:
            cluster.wait_status(name, lambda s: s.get("phase") == "Starting", ns=ns)
    # the cached one waits for its weights (this cluster has no StorageClass: it says so)
    status = cluster.wait_status("qwen3-cached", lambda s: s.get("cache", {}).get("reason") == "NoDefaultStorageClass")
    assert status["phase"] == "Pending"
    rows = cluster.kubectl("get", "md", "-A", "--no-headers").stdout.strip().split("\n")
    assert len(rows) == 6 and sum("Starting" in r for r in rows) == 5 and sum("Pending" in r for r in rows) == 1


def test_namespaced_operator_leaves_other_namespaces_alone(cluster):
    cluster.add_node("gpu-80g")
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}})
    cluster.start_operator("--namespace", "team-a")
    mine = md("mine")
    mine["metadata"]["namespace"] = "team-a"
    cluster.apply([mine, md("theirs")])
    cluster.wait_status("mine", lambda s: s.get("phase") == "Starting", ns="team-a")
    # one model in default, then one in team-a: an operator that saw default would have reconciled the first
    # by the time it finishes the second (one watch stream, in order); this one must not see it at all
    cluster.apply(md("sentinel-b"))
    late = md("late")
    late["metadata"]["namespace"] = "team-a"
    cluster.apply(late)
    cluster.wait_status("late", lambda s: s.get("phase") == "Starting", ns="team-a")
    assert "status" not in cluster.md("theirs") and "status" not in cluster.md("sentinel-b")
    assert sorted(cluster.kubectl("get", "deployments", "-A", "-o", "name").stdout.split()) == [
        "deployment.apps/late", "deployment.apps/mine"]


def test_broken_profile_table_stops_the_operator_with_the_field_named(tmp_path):
    table = yaml.safe_load((REPO / "profiles/profiles.yaml").read_text())
    table["profiles"][5]["engine"]["max_model_len"] = -5
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(table))
    out = subprocess.run([console_script("cxygpt-operator"), "--profiles", str(path)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "profiles[5](SRV_48G).engine.max_model_len: Input should be greater than 0" in out.stderr


def engine_pod(cluster, md_name, pod_name, *, ready=False, crash_exit=None, ns="default"):
    """A Pod shaped as kubelet (or the dev pod runner) publishes it, standing in for both."""
    dep = cluster.deployment(md_name, ns)
    labels = {**dep["spec"]["template"]["metadata"]["labels"], "pod-template-hash": "abc123"}
    engine = {"name": "engine", "ready": ready, "restartCount": 0, "image": "x", "imageID": "x", "started": ready,
              "state": {"running": {"startedAt": "2026-11-21T00:00:00Z"}}}
    if crash_exit is not None:
        engine.update(restartCount=2, state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
                      lastState={"terminated": {"exitCode": crash_exit, "reason": "Error",
                                                "message": "INFO loading\nValueError: max_num_seqs must be > 0\n"}})
    cond = "True" if ready else "False"
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": ns, "labels": labels,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": md_name,
                                              "uid": dep["metadata"]["uid"], "controller": True}]},
            "spec": {"containers": [{"name": "engine", "image": "x"}]},
            "status": {"phase": "Running", "podIP": "127.0.0.1", "containerStatuses": [engine],
                       "conditions": [{"type": "Ready", "status": cond}, {"type": "ContainersReady", "status": cond}]}}


def put_pod(cluster, pod):
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    try:
        cluster.core.read_namespaced_pod(name, ns)
        cluster.core.patch_namespaced_pod_status(name, ns, {"status": pod["status"]})
    except client.ApiException as e:
        if e.status != 404:
            raise
        cluster.core.create_namespaced_pod(ns, pod)


def test_pods_drive_availability_crash_loops_fail_loudly(cluster):
    for node in ("gpu-80g", "gpu-2x80g"):  # room for three one-GPU replicas
        cluster.add_node(node)
    cluster.start_operator("--metrics-namespace", "monitoring")
    cluster.apply(md("chat", replicas=2, profile="SRV_80G"))
    status = cluster.wait_status("chat", lambda s: s.get("phase") == "Starting")
    assert "warning" not in next(c for c in status["conditions"] if c["type"] == "ProfileSelected")["message"]
    policy = cluster.api.sanitize_for_serialization(
        client.NetworkingV1Api(cluster.api).read_namespaced_network_policy("chat", "default"))
    assert policy["spec"]["podSelector"]["matchLabels"] == cluster.deployment("chat")["spec"]["selector"]["matchLabels"]
    assert [f.get("namespaceSelector") for f in policy["spec"]["ingress"][0]["from"]] == [
        {}, {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}]

    # the first engine turns ready: the model serves with fewer replicas, and kubectl wait sees it
    put_pod(cluster, engine_pod(cluster, "chat", "chat-abc123-aaaaa", ready=True))
    cluster.kubectl("wait", "--for=condition=Available", "md/chat", "--timeout=15s")
    status = cluster.wait_status("chat", lambda s: s.get("phase") == "PartiallyReady")
    assert status["ready"] == "1/2"

    # the second crash-loops: Degraded with the exit code and the last log line, an Event, a count
    put_pod(cluster, engine_pod(cluster, "chat", "chat-abc123-bbbbb", crash_exit=1))
    status = cluster.wait_status("chat", lambda s: any(c["type"] == "Degraded" and c["status"] == "True"
                                                       for c in s.get("conditions", [])))

    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "EngineCrashLoop" and status["phase"] == "PartiallyReady"
    assert "exited with code 1" in degraded["message"] and "ValueError: max_num_seqs must be > 0" in degraded["message"]

    # the ready one crashes too: no replica serves, Failed (not Starting)
    put_pod(cluster, engine_pod(cluster, "chat", "chat-abc123-aaaaa", crash_exit=1))
    status = cluster.wait_status("chat", lambda s: s.get("phase") == "Failed")
    assert next(c for c in status["conditions"] if c["type"] == "Available")["status"] == "False"

    events = wait_until(lambda: [e for e in cluster.core.list_namespaced_event("default").items
                                 if e.reason == "EngineCrashLoop" and e.involved_object.name == "chat"],
                        what="EngineCrashLoop event")
    assert events[0].type == "Warning" and "exited with code 1" in events[0].message
    metrics = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics").text
    assert 'cxygpt_operator_model_failures_total{reason="EngineCrashLoop"} 1.0' in metrics


def test_the_oldest_model_owns_a_served_name(cluster):
    cluster.add_node("gpu-80g")
    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-b"}})
    cluster.start_operator("--no-network-policy")
    cluster.apply(md("first"))
    first = cluster.wait_status("first", lambda s: s.get("phase") == "Starting")
    wait_until(lambda: cluster.md("first")["metadata"]["creationTimestamp"] < _utc_now(), what="the next second")
    second = md("second")
    second["metadata"]["namespace"] = "team-b"
    second["spec"]["model"]["name"] = "first"
    cluster.apply(second)
    status = cluster.wait_status("second", lambda s: s.get("phase") == "Failed", ns="team-b")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "ModelNameConflict" and "default/first" in degraded["message"]
    assert cluster.kubectl("get", "deployments", "-n", "team-b", "-o", "name").stdout.strip() == ""
    assert cluster.kubectl("get", "networkpolicies", "-A", "-o", "name").stdout.strip() == ""  # --no-network-policy
    assert cluster.wait_status("first", lambda s: s.get("phase") == "Starting") == first

    # the owner goes: the name passes to the next oldest, which now gets its engine objects
    cluster.kubectl("delete", "md", "first", "--timeout=20s")
    cluster.wait_status("second", lambda s: s.get("phase") == "Starting", ns="team-b")
    assert cluster.deployment("second", "team-b")["spec"]["replicas"] == 1


def test_a_model_renamed_onto_a_served_name_loses_however_old_it_is(cluster):
    cluster.add_node("gpu-80g")
    cluster.start_operator("--no-network-policy")
    cluster.apply(md("elder"))
    cluster.wait_status("elder", lambda s: s.get("phase") == "Starting")
    wait_until(lambda: cluster.md("elder")["metadata"]["creationTimestamp"] < _utc_now(), what="the next second")
    young = md("young")
    young["spec"]["model"]["name"] = "live"
    cluster.apply(young)
    claim = cluster.wait_status("young", lambda s: s.get("phase") == "Starting")["nameClaim"]
    assert claim == {"name": "live", "since": cluster.md("young")["metadata"]["creationTimestamp"]}

    cluster.kubectl("patch", "md", "elder", "--type=merge", "-p", '{"spec": {"model": {"name": "live"}}}')
    status = cluster.wait_status("elder", lambda s: s.get("phase") == "Failed")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "ModelNameConflict" and "default/young" in degraded["message"]
    assert "nameClaim" not in status
    wait_until(lambda: cluster.kubectl("get", "deployment", "elder", check=False).returncode != 0,
               what="the renamed model's engines removed")
    assert cluster.md("young")["status"]["nameClaim"] == claim and cluster.deployment("young", "default")


def _utc_now() -> str:
    import datetime
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
