"""The model cache with the real cxygpt-operator against the in-memory API over HTTP: one claim and Job shared by the
models that name a source, engines only once it is Ready, failures and missing storage shown with their reason,
garbage collection with the last user (or not, with retain), and an operator restart in the middle of a download.
The test stands in for the Job controller and the volume provisioner (the e2e test runs the real ones)."""
import json
import sys

import httpx
import pytest
from kubernetes import client
from test_operator import Cluster, md

from conftest import KubeApi
from cxygpt_dev.kubeapi import write_kubeconfig
from harness import REPO, ServerProcess, free_port, wait_until

STANDARD = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "standard", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "example.com/any", "volumeBindingMode": "Immediate"}


@pytest.fixture
def cluster(tmp_path):
    port = free_port()
    proc = ServerProcess([sys.executable, "-m", "cxygpt_dev.kubeapi", "--port", str(port), "--preload",
                          str(REPO / "deploy" / "crds"), "--pod-logs", str(tmp_path / "pod-logs")],
                         port=port, log_path=tmp_path / "kubeapi.log", health="/version").start()
    c = Cluster(KubeApi(proc, write_kubeconfig(tmp_path / "kubeconfig", proc.url)), tmp_path)
    c.add_node("gpu-80g")
    yield c
    if c.operator:
        c.operator.stop()
    proc.stop()


def cached(name, *, served=None, revision=None, **cache):
    body = md(name, int4=False, source="hf://Qwen/Qwen3-14B" + (f"@{revision}" if revision else ""),
              engine={"kind": "sim"})
    body["spec"]["model"]["cache"] = {"enabled": True, **cache}
    body["spec"]["model"]["name"] = served or name
    return body


def names(cluster, kinds="pvc,job,deployment") -> list[str]:
    return sorted(cluster.kubectl("get", kinds, "-o", "name").stdout.split())


def claim(cluster, name) -> dict:
    return cluster.api.sanitize_for_serialization(cluster.core.read_namespaced_persistent_volume_claim(name, "default"))


def bind(cluster, name):
    cluster.core.patch_namespaced_persistent_volume_claim_status(name, "default", {"status": {"phase": "Bound"}})


def job_pod(cluster, claim_name, pod, phase, *, terminated=None, log_lines=()):
    """A download pod as the Job controller and kubelet publish it (and its log file, as kubelet writes it)."""
    state = {"terminated": terminated} if terminated else {"running": {"startedAt": "2026-12-02T00:00:00Z"}}
    body = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": "default", "labels": {"cxygpt.io/cache": claim_name}},
            "spec": {"containers": [{"name": "download", "image": "x"}]},
            "status": {"phase": phase, "containerStatuses": [{"name": "download", "state": state, "ready": True,
                                                              "restartCount": 0, "image": "x", "imageID": "x"}]}}
    try:
        cluster.core.read_namespaced_pod(pod, "default")
        cluster.core.patch_namespaced_pod_status(pod, "default", {"status": body["status"]})
    except client.ApiException:
        cluster.core.create_namespaced_pod("default", body)
    log = cluster.tmp / "pod-logs" / "default" / pod / "download.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in log_lines)


def job_status(cluster, name, condition, reason, failed=0):
    cluster.batch.patch_namespaced_job_status(name, "default", {"status": {
        "failed": failed, "succeeded": int(condition == "Complete"),
        "conditions": [{"type": condition, "status": "True", "reason": reason}]}})


def condition(status, kind):
    return next(c for c in status["conditions"] if c["type"] == kind)


@pytest.fixture(autouse=True)
def _batch(cluster):
    cluster.batch = client.BatchV1Api(cluster.api)


def test_two_models_share_one_cache_and_their_engines_wait_for_it(cluster):
    cluster.apply(STANDARD)
    cluster.start_operator()
    cluster.apply([cached("alpha"), cached("beta")])
    status = cluster.wait_status("alpha", lambda s: s.get("cache", {}).get("claimName"))
    name = status["cache"]["claimName"]
    assert status["phase"] == "Pending" and status["cache"]["phase"] == "Pending"
    assert status["cache"]["size"] == "35Gi" and status["cache"]["requestedRevision"] == "main"
    assert condition(status, "Available")["reason"] == "CacheNotReady"
    # one claim and one Job for both, owned by both; no engine before the weights are there
    wait_until(lambda: sorted(r["name"] for r in claim(cluster, name)["metadata"].get("ownerReferences") or [])
               == ["alpha", "beta"], what="both users own the claim")
    assert claim(cluster, name)["metadata"]["annotations"]["cxygpt.io/users"] == "alpha,beta"
    assert names(cluster) == [f"job.batch/{name}", f"persistentvolumeclaim/{name}"]
    job = cluster.batch.read_namespaced_job(name, "default")
    assert sorted(r.name for r in job.metadata.owner_references) == ["alpha", "beta"]

    # the volume is bound, the download runs: bytes from the loader's progress lines (its pod's log)
    bind(cluster, name)
    job_pod(cluster, name, f"{name}-aaaaa", "Running", log_lines=[
        {"event": "resolved", "revision": "c0ffee"},
        {"event": "progress", "revision": "c0ffee", "bytesDone": 3 << 30, "bytesTotal": 28 << 30}])
    status = cluster.wait_status("beta", lambda s: s.get("cache", {}).get("phase") == "Downloading")
    assert status["phase"] == "Pending" and status["cache"]["bytesDone"] == 3 << 30
    assert status["cache"]["revision"] == "c0ffee" and "3.00 GiB of 28.00 GiB" in status["cache"]["message"]
    assert condition(status, "Progressing")["reason"] == "CacheDownloading"
    assert names(cluster, "deployment") == []

    # done: the claim records what it holds, both models start their engines on it
    job_pod(cluster, name, f"{name}-aaaaa", "Succeeded", terminated={
        "exitCode": 0, "reason": "Completed", "message": '{"bytes": 30064771072, "files": 12, "revision": "c0ffee"}'})
    job_status(cluster, name, "Complete", "CompletionsReached")
    for model in ("alpha", "beta"):
        status = cluster.wait_status(model, lambda s: s.get("phase") == "Starting")
        assert status["cache"]["phase"] == "Ready" and condition(status, "CacheReady")["status"] == "True"
    state = json.loads(claim(cluster, name)["metadata"]["annotations"]["cxygpt.io/cache-state"])
    assert state == {"phase": "Ready", "revision": "c0ffee", "bytes": 30064771072, "files": 12}
    volumes = cluster.deployment("alpha")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-weights", "persistentVolumeClaim": {"claimName": name, "readOnly": True}} in volumes
    events = wait_until(lambda: [e for e in cluster.core.list_namespaced_event("default").items
                                 if e.reason == "CacheReady" and e.involved_object.name == "alpha"], what="event")
    assert events[0].type == "Normal"
    metrics = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics").text
    assert 'cxygpt_operator_model_caches{phase="Ready"} 1.0' in metrics

    # the first user goes: the cache stays (the same claim, still Ready) with the other; the last goes: the
    # garbage collector takes it
    uid = claim(cluster, name)["metadata"]["uid"]
    cluster.kubectl("delete", "md", "alpha", "--timeout=20s")
    wait_until(lambda: [r["name"] for r in claim(cluster, name)["metadata"].get("ownerReferences") or []] == ["beta"],
               what="alpha's reference gone")
    assert claim(cluster, name)["metadata"]["uid"] == uid and cluster.md("beta")["status"]["cache"]["phase"] == "Ready"
    cluster.kubectl("delete", "md", "beta", "--timeout=20s")
    wait_until(lambda: names(cluster, "pvc,job") == [], what="the cache deleted with its last user")


def test_a_failed_download_fails_the_model_with_the_loaders_reason(cluster):
    cluster.apply(STANDARD)
    cluster.start_operator()
    cluster.apply(cached("broken", revision="nope"))
    name = cluster.wait_status("broken", lambda s: s.get("cache", {}).get("claimName"))["cache"]["claimName"]
    bind(cluster, name)
    job_pod(cluster, name, f"{name}-bbbbb", "Failed", terminated={
        "exitCode": 2, "reason": "Error",
        "message": '{"reason": "RevisionNotFound", "message": "Qwen/Qwen3-14B has no revision \'nope\'"}'})
    job_status(cluster, name, "Failed", "PodFailurePolicy", failed=1)
    status = cluster.wait_status("broken", lambda s: s.get("phase") == "Failed")
    assert status["cache"]["phase"] == "Failed" and status["cache"]["reason"] == "RevisionNotFound"
    degraded = condition(status, "Degraded")
    assert degraded["reason"] == "CacheDownloadFailed" and "has no revision 'nope'" in degraded["message"]
    assert "delete the Job to retry" in degraded["message"]
    events = wait_until(lambda: [e for e in cluster.core.list_namespaced_event("default").items
                                 if e.reason == "CacheDownloadFailed"], what="the Warning event")
    assert events[0].type == "Warning"
    metrics = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics").text
    assert 'cxygpt_operator_model_failures_total{reason="CacheDownloadFailed"} 1.0' in metrics
    assert names(cluster, "deployment") == []


def test_missing_storage_is_pending_with_the_reason_never_starting(cluster):
    cluster.start_operator()
    cluster.apply([cached("nodefault"), cached("typo", revision="r2", storageClassName="fast-ssd")])
    status = cluster.wait_status("nodefault", lambda s: s.get("cache", {}).get("reason") == "NoDefaultStorageClass")
    assert status["phase"] == "Pending" and condition(status, "Degraded")["reason"] == "CacheClaimFailed"
    status = cluster.wait_status("typo", lambda s: s.get("cache", {}).get("reason") == "StorageClassNotFound")
    assert status["phase"] == "Pending" and 'storageclass.storage.k8s.io "fast-ssd" not found' in \
        condition(status, "Degraded")["message"]
    # and a claim whose provisioner reports a failure shows its Warning Event
    cluster.apply({**STANDARD, "metadata": {"name": "fast-ssd"}})
    name = status["cache"]["claimName"]
    cluster.core.create_namespaced_event("default", {
        "metadata": {"generateName": f"{name}."}, "type": "Warning", "reason": "ProvisioningFailed",
        "message": "exceeded quota: storage", "involvedObject": {"kind": "PersistentVolumeClaim", "name": name,
                                                                  "namespace": "default"}})
    status = cluster.wait_status("typo", lambda s: s.get("cache", {}).get("reason") == "ProvisioningFailed",
                                 timeout=25)
    assert "exceeded quota" in status["cache"]["message"] and status["phase"] == "Pending"
    # deleting a model whose cache never got a volume hangs on nothing
    cluster.kubectl("delete", "md", "typo", "nodefault", "--timeout=20s")
    wait_until(lambda: names(cluster, "pvc,job") == [], what="the caches gone with their users")


def test_a_pending_claim_is_made_again_when_the_spec_is_fixed_and_a_bound_one_is_kept_with_a_note(cluster):
    cluster.start_operator()
    cluster.apply([STANDARD, cached("fix", storageClassName="fast-sdd")])  # a typo'd class
    status = cluster.wait_status("fix", lambda s: s.get("cache", {}).get("reason") == "StorageClassNotFound")
    name = status["cache"]["claimName"]
    first = claim(cluster, name)
    assert first["metadata"]["annotations"]["cxygpt.io/made-for"] == "fix"
    # fixed: the claim, still Pending, is made again with the class the spec names now (and its Job with it)
    cluster.kubectl("patch", "md", "fix", "--type=merge", "-p",
                    json.dumps({"spec": {"model": {"cache": {"storageClassName": "standard"}}}}))
    made = wait_until(lambda: (c := claim_or_none(cluster, name)) and c["metadata"]["uid"] != first["metadata"]["uid"]
                      and c, timeout=20, what="the claim made again")
    assert made["spec"]["storageClassName"] == "standard"
    status = cluster.wait_status("fix", lambda s: s.get("cache", {}).get("reason") not in (
        "StorageClassNotFound", "ClaimReplaced", "ClaimDeleting", "CreatingClaim"))
    assert "note" not in status["cache"]
    # Bound: a later change keeps it, and the status says how to move it
    bind(cluster, name)
    cluster.kubectl("patch", "md", "fix", "--type=merge", "-p",
                    json.dumps({"spec": {"model": {"cache": {"accessMode": "ReadWriteMany"}}}}))
    status = cluster.wait_status("fix", lambda s: "note" in s.get("cache", {}))
    note = status["cache"]["note"]
    assert "accessMode ReadWriteOnce, not ReadWriteMany (a Bound claim keeps them)" in note
    assert f"kubectl -n default delete pvc,job -l cxygpt.io/cache={name}" in note
    assert note in condition(status, "CacheReady")["message"]
    assert claim(cluster, name)["metadata"]["uid"] == made["metadata"]["uid"]
    cluster.kubectl("delete", "md", "fix", "--timeout=20s")


def claim_or_none(cluster, name) -> dict | None:
    try:
        return claim(cluster, name)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def test_a_retained_cache_outlives_its_users_and_a_restart_mid_download_keeps_everything(cluster):
    cluster.apply(STANDARD)
    cluster.start_operator()
    cluster.apply(cached("keeper", retain=True))
    name = cluster.wait_status("keeper", lambda s: s.get("cache", {}).get("claimName"))["cache"]["claimName"]
    wait_until(lambda: claim(cluster, name)["metadata"]["annotations"].get("cxygpt.io/retain") == "true",
               what="retained")
    assert not claim(cluster, name)["metadata"].get("ownerReferences")
    bind(cluster, name)
    job_pod(cluster, name, f"{name}-ccccc", "Running",
            log_lines=[{"event": "progress", "bytesDone": 1 << 30, "bytesTotal": 4 << 30}])
    cluster.wait_status("keeper", lambda s: s.get("cache", {}).get("phase") == "Downloading")
    job_uid = cluster.batch.read_namespaced_job(name, "default").metadata.uid

    cluster.operator.stop()
    job_pod(cluster, name, f"{name}-ccccc", "Running",
            log_lines=[{"event": "progress", "bytesDone": 2 << 30, "bytesTotal": 4 << 30}])
    cluster.start_operator()
    status = cluster.wait_status("keeper", lambda s: s.get("cache", {}).get("bytesDone") == 2 << 30)
    assert status["cache"]["phase"] == "Downloading" and status["cache"]["claimName"] == name
    assert cluster.batch.read_namespaced_job(name, "default").metadata.uid == job_uid  # the same download goes on

    cluster.kubectl("delete", "md", "keeper", "--timeout=20s")
    assert names(cluster, "pvc,job") == [f"job.batch/{name}", f"persistentvolumeclaim/{name}"]


def test_a_new_revision_downloads_beside_the_old_which_goes_once_the_engines_moved(cluster):
    cluster.apply(STANDARD)
    cluster.start_operator()
    cluster.apply(cached("mover"))
    old = cluster.wait_status("mover", lambda s: s.get("cache", {}).get("claimName"))["cache"]["claimName"]
    bind(cluster, old)
    job_pod(cluster, old, f"{old}-ddddd", "Succeeded", terminated={"exitCode": 0, "message": '{"revision": "a1"}'})
    job_status(cluster, old, "Complete", "CompletionsReached")
    cluster.wait_status("mover", lambda s: s.get("phase") == "Starting")

    cluster.apply(cached("mover", revision="v2"))
    new = cluster.wait_status("mover", lambda s: s.get("cache", {}).get("claimName") not in (None, old))["cache"]
    assert new["requestedRevision"] == "v2"
    # the engines keep the old weights meanwhile
    assert {v.get("persistentVolumeClaim", {}).get("claimName") for v in
            cluster.deployment("mover")["spec"]["template"]["spec"]["volumes"]} >= {old}
    assert f"persistentvolumeclaim/{old}" in names(cluster, "pvc")
    bind(cluster, new["claimName"])
    job_pod(cluster, new["claimName"], f"{new['claimName']}-eeeee", "Succeeded",
            terminated={"exitCode": 0, "message": '{"revision": "b2"}'})
    job_status(cluster, new["claimName"], "Complete", "CompletionsReached")
    cluster.wait_status("mover", lambda s: s.get("cache", {}).get("revision") == "b2")
    wait_until(lambda: names(cluster, "pvc,job") == [f"job.batch/{new['claimName']}",
                                                      f"persistentvolumeclaim/{new['claimName']}"],
               what="the old cache deleted once no engine mounts it")


def test_a_claim_deleted_by_hand_is_made_again_and_filled_again_before_it_is_ready(cluster):
    """The old Job (Complete) filled the old claim: the new one of the same name is empty until a Job fills it."""
    cluster.apply(STANDARD)
    cluster.start_operator()
    cluster.apply(cached("alpha"))
    name = cluster.wait_status("alpha", lambda s: s.get("cache", {}).get("claimName"))["cache"]["claimName"]
    first_uid = claim(cluster, name)["metadata"]["uid"]
    job = cluster.batch.read_namespaced_job(name, "default")
    assert job.metadata.annotations["cxygpt.io/claim-uid"] == first_uid
    bind(cluster, name)
    job_pod(cluster, name, f"{name}-aaaaa", "Succeeded", terminated={
        "exitCode": 0, "reason": "Completed", "message": '{"bytes": 1000, "files": 2, "revision": "c0ffee"}'})
    job_status(cluster, name, "Complete", "CompletionsReached")
    cluster.wait_status("alpha", lambda s: s.get("cache", {}).get("phase") == "Ready")

    cluster.kubectl("delete", "pvc", name, "--timeout=20s")
    new = wait_until(lambda: (c := claim(cluster, name))["metadata"]["uid"] != first_uid and c, timeout=20,
                     what="the claim made again")
    assert "cxygpt.io/cache-state" not in (new["metadata"].get("annotations") or {})
    status = cluster.wait_status("alpha", lambda s: s.get("cache", {}).get("phase") == "Pending")
    assert status["cache"]["reason"] in ("ReplacingJob", "DownloadStarting", "WaitingForVolume")
    # the old Job is replaced by one that fills the new claim; never Ready on the old Job's word
    new_job = wait_until(lambda: (j := cluster.batch.read_namespaced_job(name, "default")).metadata.annotations.get(
        "cxygpt.io/claim-uid") == new["metadata"]["uid"] and j, timeout=20, what="a Job for the new claim")
    assert not (new_job.status and new_job.status.conditions)
    assert cluster.md("alpha")["status"]["cache"]["phase"] != "Ready"
    bind(cluster, name)
    job_pod(cluster, name, f"{name}-bbbbb", "Succeeded", terminated={
        "exitCode": 0, "reason": "Completed", "message": '{"bytes": 1000, "files": 2, "revision": "c0ffee"}'})
    job_status(cluster, name, "Complete", "CompletionsReached")
    cluster.wait_status("alpha", lambda s: s.get("cache", {}).get("phase") == "Ready")
    assert "cxygpt.io/cache-state" in claim(cluster, name)["metadata"]["annotations"]
