"""Our kubelet on the real control plane: the real controllers make the pods, the real scheduler binds them, the
kubelet runs them on addresses of their own, and the rest of Kubernetes (EndpointSlices, Jobs, PV binding) follows
what it reports."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import httpx

from kube import Kubectl

PYTHON_SERVER = ["python", "-m", "http.server", "8000", "--bind", "0.0.0.0"]


def deployment(name: str, replicas: int, container: dict, **pod_spec) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "main", "image": "python:3", **container}],
                                           **pod_spec}}}}


def job(name: str, command: list[str], **spec) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, **spec, "template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "main", "image": "python:3", "command": command}]}}}}


def condition(obj: dict, kind: str) -> str | None:
    return next((c["status"] for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == kind), None)


def test_pods_run_on_addresses_of_their_own_behind_their_service(cluster, kube):
    kube.apply(deployment("web", 2, {"command": PYTHON_SERVER, "ports": [{"name": "http", "containerPort": 8000}],
                                     "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}}),
               {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
    kube("rollout", "status", "deployment/web", "--timeout=60s")
    pods = kube.items("pods", "-l", "app=web")
    addresses = {p["status"]["podIP"] for p in pods}
    assert len(addresses) == 2 and all(ipaddress.ip_address(a) in ipaddress.ip_network(cluster.plan.cluster_cidr)
                                       for a in addresses)
    for pod in pods:  # each pod's own port 8000, on its own address; its node's address as hostIP
        assert httpx.get(f"http://{pod['status']['podIP']}:8000/", timeout=5).status_code == 200
        node = kube.get("node", pod["spec"]["nodeName"])
        assert pod["status"]["hostIP"] == node["status"]["addresses"][0]["address"]
        assert pod["status"]["containerStatuses"][0]["ready"] and condition(pod, "Ready") == "True"
    # the EndpointSlice controller publishes what the kubelet reported
    kube.wait_for(lambda: {a for s in kube.items("endpointslices", "-l", "kubernetes.io/service-name=web")
                           for e in s["endpoints"] if e["conditions"]["ready"] for a in e["addresses"]} == addresses,
                  "the Service's ready endpoints")
    # a pod reaches the Service by its DNS name and cluster IP, as in a cluster (the Job controller counts it)
    kube.apply(job("client", ["python", "-c", f"import urllib.request; print(urllib.request.urlopen("
                                              f"'http://web.{kube.namespace}.svc:80/').status)"]))
    kube("wait", "--for=condition=Complete", "job/client", "--timeout=60s")
    assert kube("logs", "job/client").strip() == "200"


def test_a_crashing_container_restarts_and_keeps_its_last_state(kube):
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crash"}, "spec": {"containers": [{
        "name": "main", "image": "python:3", "terminationMessagePolicy": "FallbackToLogsOnError",
        "command": ["python", "-c", "import sys; print('boom', flush=True); sys.exit(3)"]}]}})

    def crashed_twice():
        status = kube.get("pod", "crash")["status"]["containerStatuses"][0]
        return status if status["restartCount"] >= 2 else None

    status = kube.wait_for(crashed_twice, "two restarts")
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert "boom" in status["lastState"]["terminated"]["message"]  # the tail of the output (FallbackToLogsOnError)
    assert kube("logs", "crash", "--previous").strip() == "boom"
    kube.wait_for(lambda: (kube.get("pod", "crash")["status"]["containerStatuses"][0]["state"].get("waiting") or {})
                  .get("reason") == "CrashLoopBackOff", "CrashLoopBackOff")


def test_readiness_follows_the_probe_and_deletion_runs_the_pre_stop_hook(kube, tmp_path):
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probed", "labels": {"app": "probed"}},
                "spec": {"terminationGracePeriodSeconds": 20, "containers": [{
                    "name": "main", "image": "python:3", "command": PYTHON_SERVER,
                    "readinessProbe": {"exec": {"command": ["test", "-e", str(ready)]}, "periodSeconds": 1},
                    "lifecycle": {"preStop": {"exec": {"command": ["touch", str(stopped)]}}}}]}})
    kube("wait", "--for=jsonpath={.status.phase}=Running", "pod/probed", "--timeout=60s")
    assert condition(kube.get("pod", "probed"), "Ready") == "False"
    ready.touch()
    kube("wait", "--for=condition=Ready", "pod/probed", "--timeout=30s")
    ready.unlink()
    kube("wait", "--for=condition=Ready=false", "pod/probed", "--timeout=30s")
    kube("delete", "pod", "probed", "--timeout=30s")  # returns once the kubelet has removed it
    assert stopped.exists()


def test_a_readiness_gate_holds_a_ready_container_until_its_condition_is_set(kube):
    """As the real kubelet: Ready needs the containers ready and every readiness gate's condition True (which
    another controller sets in the pod's status, here as the operator sets cxygpt.io/adapters-loaded)."""
    kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gated"}, "spec": {
        "readinessGates": [{"conditionType": "example.com/warmed"}],
        "containers": [{"name": "main", "image": "python:3", "command": PYTHON_SERVER}]}})
    kube.wait_for(lambda: condition(kube.get("pod", "gated"), "ContainersReady") == "True", "containers ready")
    pod = kube.get("pod", "gated")
    assert condition(pod, "Ready") == "False"
    assert next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")["reason"] == "ReadinessGatesNotReady"
    kube("patch", "pod", "gated", "--subresource=status", "--type=strategic", "-p",
         '{"status": {"conditions": [{"type": "example.com/warmed", "status": "True"}]}}')
    kube("wait", "--for=condition=Ready", "pod/gated", "--timeout=30s")
    assert condition(kube.get("pod", "gated"), "example.com/warmed") == "True"  # the kubelet's writes keep it


def test_a_claim_is_provisioned_bound_mounted_and_released(kube):
    # the path as an argument: the kubelet makes a mount's path in arguments and environment the volume's directory
    writer = job("writer", ["python", "-c", "import sys; open(sys.argv[1], 'w').write('hi')", "/data/hello"])
    writer["spec"]["template"]["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    writer["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    kube.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}, writer)
    kube("wait", "--for=condition=Complete", "job/writer", "--timeout=60s")
    claim = kube.get("pvc", "data")
    assert claim["status"]["phase"] == "Bound" and claim["spec"]["storageClassName"] == "standard"  # the default
    volume = kube.get("pv", claim["spec"]["volumeName"])
    assert volume["spec"]["claimRef"]["name"] == "data"
    directory = Path(volume["spec"]["hostPath"]["path"])
    assert (directory / "hello").read_text() == "hi"
    kube("delete", "job", "writer", "--cascade=foreground", "--timeout=30s")  # its pod no longer uses the claim
    kube("delete", "pvc", "data", "--timeout=30s")
    kube.wait_for(lambda: kube.run("get", "pv", volume["metadata"]["name"], check=False).returncode != 0,
                  "the released volume deleted")
    assert not directory.exists()


def test_a_job_fails_at_once_on_an_exit_code_its_pod_failure_policy_names(kube):
    kube.apply(job("fatal", ["python", "-c", "import sys; sys.exit(2)"], backoffLimit=4, podFailurePolicy={
        "rules": [{"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [2]}}]}))
    kube("wait", "--for=condition=Failed", "job/fatal", "--timeout=60s")
    failed = next(c for c in kube.get("job", "fatal")["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy" and kube.get("job", "fatal")["status"]["failed"] == 1


def test_the_nodes_stay_ready_with_their_leases_renewed(cluster):
    kube = Kubectl(cluster.kubeconfig, "kube-node-lease")
    leases = {lease["metadata"]["name"]: lease["spec"]["renewTime"] for lease in kube.items("leases")}
    assert set(leases) >= {n.name for n in cluster.nodes}
    kube.wait_for(lambda: all(lease["spec"]["renewTime"] != leases[lease["metadata"]["name"]]
                              for lease in kube.items("leases") if lease["metadata"]["name"] in leases),
                  "every lease renewed", timeout=30)
    gpus = {n["metadata"]["name"]: n["status"]["allocatable"].get("nvidia.com/gpu") for n in kube.items("nodes")}
    assert gpus == {"cxygpt-worker": "1", "cxygpt-worker2": "1", "cxygpt-worker3": "2"}
