"""The pod runner against the in-memory API with real engine processes: rollouts, scaling, crash loops, the cap."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from harness import console_script, wait_until

pytestmark = pytest.mark.timeout(150)
NS = "default"
APPS = f"/apis/apps/v1/namespaces/{NS}/deployments"


class Runner:
    def __init__(self, api, tmp, max_engines=8):
        self.log = open(tmp / "pods.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "cxygpt_dev.podrunner", "--api", api.url,
                                      "--max-engines", str(max_engines)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=timeout)
        self.log.close()


@pytest.fixture
def cluster(kube_api, tmp_path):
    runner = Runner(kube_api, tmp_path)
    yield kube_api
    runner.stop()
    assert runner.proc.returncode == 0, (tmp_path / "pods.log").read_text()


def deployment(name, replicas=1, *, args=(), surge=1, unavailable=0, drain_s=30, grace_s=40):
    container = {"name": "engine", "image": "cxygpt-sim", "command": ["cxygpt-sim", "serve"],
                 "args": ["Qwen/Qwen3-0.6B", "--served-model-name", name, "--ttft-ms", "5", "--itl-ms", "50", *args],
                 "lifecycle": {"preStop": {"sleep": {"seconds": drain_s}}}}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS, "labels": {"app.kubernetes.io/managed-by": "cxygpt-operator"}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "strategy": {"type": "RollingUpdate",
                                  "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [container], "terminationGracePeriodSeconds": grace_s}}}}


def create(api, dep):
    name = dep["metadata"]["name"]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
           "spec": {"selector": {"app": name}, "ports": [{"port": 8000}]}}
    assert httpx.post(f"{api.url}/api/v1/namespaces/{NS}/services", json=svc).status_code == 201
    assert httpx.post(api.url + APPS, json=dep).status_code == 201


def patch(api, name, body):
    r = httpx.patch(f"{api.url}{APPS}/{name}", json=body, headers={"Content-Type": "application/merge-patch+json"})
    assert r.status_code == 200, r.text


def status(api, name):
    return httpx.get(f"{api.url}{APPS}/{name}").json().get("status") or {}


def pods(api, name):
    return httpx.get(f"{api.url}/api/v1/namespaces/{NS}/pods", params={"labelSelector": f"app={name}"}).json()["items"]


def slices(api, name):
    return httpx.get(f"{api.url}/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
                     params={"labelSelector": f"kubernetes.io/service-name={name}"}).json()["items"]


def settled(api, name, replicas):
    s = status(api, name)
    return (s.get("updatedReplicas") == s.get("readyReplicas") == s.get("replicas") == replicas
            and s.get("terminatingReplicas") == 0 and len(pods(api, name)) == replicas and s)


def listening(port) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


class SliceWatch:
    """Every EndpointSlice event of one Service, time-stamped, from a watch stream."""

    def __init__(self, api, service):
        self.events, self.open = [], threading.Event()
        url = f"{api.url}/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
        params = {"watch": "true", "labelSelector": f"kubernetes.io/service-name={service}"}

        def run():
            try:
                with httpx.stream("GET", url, params=params, timeout=None) as r:
                    self.open.set()
                    for line in r.iter_lines():
                        if line:
                            e = json.loads(line)
                            self.events.append((time.monotonic(), e["type"], e["object"]["metadata"]["name"],
                                                e["object"]["endpoints"][0]["conditions"]))
            except httpx.HTTPError:
                pass  # the API stopped at the end of the test

        threading.Thread(target=run, daemon=True).start()
        assert self.open.wait(10)

    def over_time(self, condition="ready"):
        """How many endpoints have the condition (or, for "live", are not terminating) after each event."""
        state, counts = {}, []
        for _, kind, name, conditions in self.events:
            if kind == "DELETED":
                state.pop(name, None)
            else:
                state[name] = not conditions["terminating"] if condition == "live" else conditions[condition]
            counts.append(sum(state.values()))
        return counts


def test_rolling_update_starts_new_before_draining_old(cluster):
    create(cluster, deployment("roll", 2, drain_s=60, grace_s=70))
    first = wait_until(lambda: settled(cluster, "roll", 2), timeout=40, what="2 ready replicas")
    assert {c["type"]: c["status"] for c in first["conditions"]} == {"Available": "True", "Progressing": "True"}
    dep = httpx.get(f"{cluster.url}{APPS}/roll").json()
    old = {p["metadata"]["name"]: p for p in pods(cluster, "roll")}
    for name, pod in old.items():
        assert re.fullmatch(r"roll-[a-z0-9]{10}-[a-z0-9]{5}", name)
        assert pod["metadata"]["labels"]["pod-template-hash"] == name.split("-")[1]
        assert pod["metadata"]["ownerReferences"] == [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "roll",
                                                       "uid": dep["metadata"]["uid"], "controller": True,
                                                       "blockOwnerDeletion": True}]
        engine = pod["status"]["containerStatuses"][0]
        assert pod["status"]["phase"] == "Running" and engine["ready"] and engine["restartCount"] == 0
        assert "running" in engine["state"]
    ports = {s["endpoints"][0]["targetRef"]["name"]: s["ports"][0]["port"] for s in slices(cluster, "roll")}
    assert set(ports) == set(old)
    assert {s["endpoints"][0]["targetRef"]["uid"] for s in slices(cluster, "roll")} == {
        p["metadata"]["uid"] for p in old.values()}

    # a request in flight on an old engine when the rollout begins (10 s: longer than the new pods take to start)
    busy, busy_port = next(iter(ports.items()))
    result = {}

    def long_request():
        r = httpx.post(f"http://127.0.0.1:{busy_port}/v1/completions", timeout=60,
                       json={"model": "roll", "prompt": "hi", "max_tokens": 200, "ignore_eos": True})
        result.update(code=r.status_code, body=r.json(), done=time.monotonic())

    caller = threading.Thread(target=long_request)
    caller.start()
    wait_until(lambda: re.search(r"^vllm:num_requests_running\{.*\} 1\.0$", httpx.get(
        f"http://127.0.0.1:{busy_port}/metrics").text, re.M), what="request running on the old engine")
    watch = SliceWatch(cluster, "roll")
    began = time.monotonic()
    patch(cluster, "roll", {"spec": {"template": {"metadata": {"annotations": {"revision": "2"}}}}})
    wait_until(lambda: settled(cluster, "roll", 2) and not set(p["metadata"]["name"] for p in pods(cluster, "roll")) & set(old),
               timeout=60, what="rollout complete")
    took = time.monotonic() - began
    caller.join(30)

    assert result["code"] == 200 and result["body"]["usage"]["completion_tokens"] == 200
    # maxUnavailable 0: two endpoints ready at every moment of the rollout
    assert min(watch.over_time()[2:]) >= 2, "\n".join(map(str, watch.events))
    first_new_ready = min(t for t, kind, name, c in watch.events if name not in old and c["ready"])
    marks = {name: t for t, kind, name, c in watch.events
             if name in old and kind == "MODIFIED" and c == {"ready": False, "serving": True, "terminating": True}}
    assert set(marks) == set(old), watch.events
    assert first_new_ready < min(marks.values())
    # the busy engine left the endpoints while its request was still running, and stopped only after it ended
    assert marks[busy] < result["done"]
    gone = {name: t for t, kind, name, _ in watch.events if kind == "DELETED"}
    assert gone[busy] >= result["done"]
    # the preStop sleep (60 s) ended as soon as each old engine had nothing in flight
    assert took < 45
    assert not any(listening(p) for p in ports.values())


def test_replace_in_place_order(cluster):
    create(cluster, deployment("inplace", 2, surge=0, unavailable=1))
    wait_until(lambda: settled(cluster, "inplace", 2), timeout=40, what="2 ready replicas")
    old = {p["metadata"]["name"] for p in pods(cluster, "inplace")}
    watch = SliceWatch(cluster, "inplace")
    patch(cluster, "inplace", {"spec": {"template": {"metadata": {"annotations": {"revision": "2"}}}}})
    wait_until(lambda: settled(cluster, "inplace", 2) and not {p["metadata"]["name"] for p in pods(cluster, "inplace")} & old,
               timeout=60, what="rollout complete")
    # maxSurge 0: an old endpoint leaves before any new one comes; one replica is down meanwhile, never three up
    _, kind, name, conditions = watch.events[2]
    assert kind == "MODIFIED" and name in old and conditions["terminating"], watch.events
    counts = watch.over_time()[2:]
    assert min(counts) == 1 and max(counts) <= 2, watch.events
    assert max(watch.over_time("live")) <= 2, watch.events  # no surge: never a third pod beside the two


def test_scale_up_then_down_drains_the_extra_pods(cluster):
    create(cluster, deployment("scale", 1))
    wait_until(lambda: settled(cluster, "scale", 1), timeout=40, what="1 ready replica")
    [first] = pods(cluster, "scale")
    patch(cluster, "scale", {"spec": {"replicas": 3}})
    wait_until(lambda: settled(cluster, "scale", 3), timeout=40, what="3 ready replicas")
    assert first["metadata"]["name"] in {p["metadata"]["name"] for p in pods(cluster, "scale")}  # old ones stay
    ports = [s["ports"][0]["port"] for s in slices(cluster, "scale")]
    patch(cluster, "scale", {"spec": {"replicas": 1}})
    s = wait_until(lambda: settled(cluster, "scale", 1), timeout=40, what="1 replica left")
    assert s["availableReplicas"] == 1 and s["unavailableReplicas"] == 0
    assert sum(listening(p) for p in ports) == 1 and len(slices(cluster, "scale")) == 1


def test_crash_loop_shows_in_the_pod_status(cluster):
    create(cluster, deployment("crash", 1, args=["--max-num-seqs", "-5"]))

    def crash_looping():
        [pod] = pods(cluster, "crash")
        engine = pod["status"]["containerStatuses"][0]
        return engine["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff" and engine

    engine = wait_until(crash_looping, timeout=60, what="CrashLoopBackOff")
    assert engine["restartCount"] >= 1 and not engine["ready"]
    last = engine["lastState"]["terminated"]
    assert last["exitCode"] != 0 and last["reason"] == "Error" and "max-num-seqs" in last["message"]
    assert len(last["message"].encode()) <= 2048 and last["finishedAt"] >= last["startedAt"]
    conditions = {c["type"]: c for c in status(cluster, "crash")["conditions"]}
    assert conditions["Available"]["status"] == "False" and status(cluster, "crash")["unavailableReplicas"] == 1
    assert "ReplicaFailure" not in conditions
    # and as kubectl prints it
    kubectl = [console_script("kubectl"), "--kubeconfig", str(cluster.kubeconfig), "--cache-dir",
               str(cluster.kubeconfig.parent / "kc")]

    def printed(*args):
        return subprocess.run([*kubectl, "get", *args, "--no-headers"], capture_output=True, text=True,
                              timeout=30).stdout.split()

    row = wait_until(lambda: (r := printed("pods", "-l", "app=crash"))[2] == "CrashLoopBackOff" and r,
                     timeout=30, what="kubectl get pods: CrashLoopBackOff")
    assert row[1] == "0/1" and int(row[3]) >= 1
    assert printed("deployment", "crash")[:4] == ["crash", "0/1", "1", "0"]


def test_the_engine_cap_refuses_the_rest_and_stops_promptly(kube_api, tmp_path):
    runner = Runner(kube_api, tmp_path, max_engines=2)
    try:
        create(kube_api, deployment("huge", 100000))

        def capped():
            s = status(kube_api, "huge")
            conditions = {c["type"]: c for c in s.get("conditions", [])}
            return s.get("readyReplicas") == 2 and "ReplicaFailure" in conditions and conditions["ReplicaFailure"]

        failure = wait_until(capped, timeout=40, what="2 engines and a ReplicaFailure")
        assert failure["status"] == "True" and failure["reason"] == "FailedCreate"
        assert "99998 of 100000 replicas refused" in failure["message"] and "at most 2 engine" in failure["message"]
        assert len(pods(kube_api, "huge")) == 2
        ports = [s["ports"][0]["port"] for s in slices(kube_api, "huge")]
        began = time.monotonic()
        runner.stop(signal.SIGINT, timeout=15)  # Ctrl-C
        assert time.monotonic() - began < 10 and runner.proc.returncode == 0
        assert not any(listening(p) for p in ports)
        # scaled back within the cap: the condition goes
        runner = Runner(kube_api, tmp_path, max_engines=2)
        patch(kube_api, "huge", {"spec": {"replicas": 1}})
        s = wait_until(lambda: settled(kube_api, "huge", 1), timeout=40, what="1 replica")
        assert "ReplicaFailure" not in {c["type"] for c in s["conditions"]}
    finally:
        runner.stop()


def test_killed_or_deleted_engine_pod(cluster):
    create(cluster, deployment("victim", 1, drain_s=5))
    wait_until(lambda: settled(cluster, "victim", 1), timeout=40, what="1 ready replica")
    [pod] = pods(cluster, "victim")
    [port] = [s["ports"][0]["port"] for s in slices(cluster, "victim")]
    pid = int(subprocess.run(["pgrep", "-f", "--", f"--port {port}$"], capture_output=True, text=True).stdout.split()[0])
    os.kill(pid, signal.SIGKILL)

    def restarted():
        [again] = pods(cluster, "victim")
        engine = again["status"]["containerStatuses"][0]
        return engine["restartCount"] == 1 and engine["ready"] and engine

    engine = wait_until(restarted, timeout=30, what="restarted once")
    assert engine["lastState"]["terminated"]["exitCode"] == 137  # 128 + SIGKILL, as kubelet reports it
    assert engine["lastState"]["terminated"]["reason"] == "Error"

    # `kubectl delete pod`: the pod terminates (shown meanwhile) and the Deployment replaces it
    assert httpx.delete(f"{cluster.url}/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}").status_code == 200
    wait_until(lambda: settled(cluster, "victim", 1) and pods(cluster, "victim")[0]["metadata"]["name"]
               != pod["metadata"]["name"], timeout=40, what="a replacement pod")
