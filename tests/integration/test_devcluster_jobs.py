"""The dev cluster's Job controller and volume provisioner (the pod runner) against the in-memory API: attempts as
local processes with the Job controller's status and conditions, claims as directories or Pending with the event."""
import base64
import os
import signal
import subprocess
import sys

import httpx
import pytest

from harness import REPO, ServerProcess, free_port, wait_until

pytestmark = pytest.mark.timeout(120)
NS = "default"


@pytest.fixture
def api(tmp_path):
    port = free_port()
    proc = ServerProcess([sys.executable, "-m", "cxygpt_dev.kubeapi", "--port", str(port), "--preload",
                          str(REPO / "deploy" / "crds"), "--pod-logs", str(tmp_path / "state" / "pod-logs")],
                         port=port, log_path=tmp_path / "kubeapi.log", health="/version").start()
    httpx.post(f"{proc.url}/apis/storage.k8s.io/v1/storageclasses", json={
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "provisioner": "cxygpt.io/local-directory",
        "metadata": {"name": "standard", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}}})
    log = open(tmp_path / "pods.log", "wb")
    runner = subprocess.Popen([sys.executable, "-m", "cxygpt_dev.podrunner", "--api", proc.url, "--state-dir",
                               str(tmp_path / "state")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    yield proc.url
    os.kill(runner.pid, signal.SIGTERM)
    runner.wait(timeout=30)
    log.close()
    proc.stop()


def job(name, script, *, backoff=1, policy_codes=(), deadline=None, env=(), claim=None):
    container = {"name": "main", "image": "python", "command": [sys.executable, "-c", script], "env": list(env),
                 "terminationMessagePath": "/dev/termination-log"}
    spec = {"backoffLimit": backoff, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}}
    if claim:
        container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
        spec["template"]["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
    if policy_codes:
        spec["podFailurePolicy"] = {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": "main", "operator": "In", "values": list(policy_codes)}}]}
    if deadline:
        spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": NS}, "spec": spec}


def get(api, path):
    return httpx.get(api + path).json()


def finished(api, name):
    def check():
        status = get(api, f"/apis/batch/v1/namespaces/{NS}/jobs/{name}").get("status") or {}
        done = [c for c in status.get("conditions") or [] if c["type"] in ("Complete", "Failed")]
        return (status, done[0]) if done else None
    return wait_until(check, timeout=40, interval=0.1, what=f"job {name} finished")


def pods_of(api, name):
    return get(api, f"/api/v1/namespaces/{NS}/pods?labelSelector=job-name={name}")["items"]


def test_jobs_run_as_local_processes_with_the_job_controllers_status(api):
    post = lambda body: httpx.post(f"{api}/apis/batch/v1/namespaces/{NS}/jobs", json=body).raise_for_status()
    post(job("ok", "import os; print('hello'); open(os.environ['OUT'], 'w').write('{\"done\": 1}')",
             env=[{"name": "OUT", "value": "/dev/termination-log"}]))
    post(job("flaky", "raise SystemExit(3)", backoff=1))
    post(job("fatal", "raise SystemExit(2)", backoff=5, policy_codes=[2]))
    post(job("slow", "import time; time.sleep(60)", deadline=2))
    status, cond = finished(api, "ok")
    assert (cond["type"], cond["reason"], status["succeeded"]) == ("Complete", "CompletionsReached", 1)
    pod = pods_of(api, "ok")[0]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Succeeded" and terminated["message"] == '{"done": 1}'
    assert httpx.get(f"{api}/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/log").text == "hello\n"
    status, cond = finished(api, "flaky")
    assert (cond["type"], cond["reason"], status["failed"]) == ("Failed", "BackoffLimitExceeded", 2)
    assert len(pods_of(api, "flaky")) == 2  # one pod per attempt (restartPolicy Never)
    status, cond = finished(api, "fatal")
    assert (cond["type"], cond["reason"], status["failed"]) == ("Failed", "PodFailurePolicy", 1)
    status, cond = finished(api, "slow")
    assert (cond["type"], cond["reason"]) == ("Failed", "DeadlineExceeded")


def test_claims_are_directories_or_pending_with_the_provisioners_event(api, tmp_path):
    claims = f"{api}/api/v1/namespaces/{NS}/persistentvolumeclaims"
    for name, cls in (("data", None), ("lost", "fast-ssd")):
        body = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": NS},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}},
                         **({"storageClassName": cls} if cls else {})}}
        httpx.post(claims, json=body).raise_for_status()
    wait_until(lambda: get(api, "/api/v1/namespaces/default/persistentvolumeclaims/data")["status"]["phase"] == "Bound",
               what="data bound")
    pvc = get(api, "/api/v1/namespaces/default/persistentvolumeclaims/data")
    assert pvc["spec"]["storageClassName"] == "standard" and pvc["spec"]["volumeName"].startswith("pvc-")
    directory = tmp_path / "state" / "volumes" / NS / "data"
    assert directory.is_dir() and get(api, f"/api/v1/persistentvolumes/{pvc['spec']['volumeName']}")["spec"][
        "hostPath"]["path"] == str(directory)
    events = wait_until(lambda: [e for e in get(api, f"/api/v1/namespaces/{NS}/events")["items"]
                                 if e["involvedObject"]["name"] == "lost"], what="the event")
    assert events[0]["type"] == "Warning" and events[0]["reason"] == "ProvisioningFailed" and \
        events[0]["message"] == 'storageclass.storage.k8s.io "fast-ssd" not found'
    assert get(api, "/api/v1/namespaces/default/persistentvolumeclaims/lost")["status"]["phase"] == "Pending"

    # a job's pod writes into the claim; one whose Secret is missing waits with kubelet's reason
    httpx.post(f"{api}/apis/batch/v1/namespaces/{NS}/jobs", json=job(
        "writer", "import os; open(os.environ['DATA'] + '/x', 'w').write(os.environ['TOKEN'])", claim="data",
        env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
             {"name": "DATA", "value": "/data"}])).raise_for_status()  # the mount's path, as this machine has it
    pod = wait_until(lambda: [p for p in pods_of(api, "writer") if p["status"].get("containerStatuses")],
                     what="the pod waiting")[0]
    assert pod["status"]["containerStatuses"][0]["state"]["waiting"] == {
        "reason": "CreateContainerConfigError", "message": 'secret "hf" not found'}
    httpx.post(f"{api}/api/v1/namespaces/{NS}/secrets", json={
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf", "namespace": NS},
        "data": {"token": base64.b64encode(b"t0k").decode()}}).raise_for_status()
    assert finished(api, "writer")[1]["type"] == "Complete"
    assert (directory / "x").read_text() == "t0k"

    httpx.delete(f"{claims}/data").raise_for_status()
    wait_until(lambda: not directory.exists(), what="the directory removed with its claim")
