"""The model cache's pure core: spec, claim names and sizes, the claim and download Job (golden YAML, strict schema),
engine mounts and environment, the cache's state from its objects, and the model's status while it downloads."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxygpt_operator.cache import (
    CacheKey,
    CacheState,
    CacheUser,
    build_claim,
    cache_key,
    cache_state,
    claim_metadata,
    default_size,
    download_deadline_s,
    fills,
    metadata_differs,
    owner_references,
    progress_from_log,
    quantity_bytes,
    record,
)
from cxygpt_operator.manifests import EngineImages, Owner, build_cache_job, build_deployment, claims_of, engine_cache
from cxygpt_operator.resolve import Candidates, SpecError, parse_spec, resolve
from cxygpt_operator.status import build_status
from cxygpt_profiles import GpuNode, default_catalog, default_table

TABLE, CATALOG = default_table(), default_catalog()
IMAGES = EngineImages(vllm=TABLE.vllm.image, sim="cxygpt/cxygpt-sim:test", loader="cxygpt/cxygpt-operator:test")
GOLDEN = Path(__file__).parent / "golden"
OWNER = Owner(name="qwen3-14b", namespace="llm", uid="0000-uid", generation=1)
H100 = GpuNode(81559, 1, "h100", "NVIDIA-H100-80GB-HBM3")
RTX = GpuNode(32607, 1, "ws", "NVIDIA-GeForce-RTX-5090")
NOW = "2026-12-02T00:00:00Z"
SPEC = {"model": {"name": "qwen3-14b", "source": "hf://Qwen/Qwen3-14B",
                  "variants": {"int4": "hf://Qwen/Qwen3-14B-GPTQ-Int4@v2"},
                  "cache": {"enabled": True, "storageClassName": "fast", "tokenSecretRef": {"name": "hf"}}}}
KEY = CacheKey("Qwen/Qwen3-14B", "main")


def _selected(raw=SPEC, nodes=(H100,)):
    spec = parse_spec(raw)
    return spec, resolve(spec, Candidates(tuple(nodes)), TABLE, CATALOG)


def _engine(dep):
    return dep["spec"]["template"]["spec"]["containers"][0]


# --- spec --------------------------------------------------------------------------------------------------------

def test_cache_spec_with_defaults_and_its_source():
    spec, sel = _selected()
    assert (spec.cache.enabled, spec.cache.access_mode, spec.cache.retain, spec.cache.token_key) == \
        (True, "ReadWriteOnce", False, "token")
    assert engine_cache(spec, sel) == KEY  # bf16 on an H100: the source; no revision is main
    spec, sel = _selected(nodes=(RTX,))
    assert engine_cache(spec, sel) == CacheKey("Qwen/Qwen3-14B-GPTQ-Int4", "v2")  # DEV_32G runs the int4 variant
    assert engine_cache(parse_spec({"model": {"name": "m", "source": "pvc://models/m"}, "profile": "SRV_80G"}),
                        sel) is None


@pytest.mark.parametrize("raw, message", [
    ({"model": {"name": "m", "source": "pvc://models/../etc"}}, "must not contain '..'"),
    ({"model": {"name": "m", "source": "pvc://Models/x"}}, "must be hf://<org>/<repo>[@<revision>] or pvc://"),
    ({"model": {"name": "m", "source": "pvc://" + "a" * 254 + "/x"}}, "longer than 253"),
    ({"model": {"name": "m", "source": "hf://a/b", "variants": {"int4": "pvc://m/a/.."}}}, "variants.int4"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"enabled": True}}, "cacheClaim": "c"}, "exclude"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"size": "-3"}}}, "not a storage quantity"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"accessMode": "ReadOnlyMany"}}}, "accessMode"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"size": "99999999999999999999999999999Pi"}}},
     "not a storage quantity of at most 1Pi"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"tokenSecretRef": {"name": "kube-system/hf-token"}}}},
     "no namespace/ prefix"),
])
def test_specs_the_schema_refuses_are_refused_by_the_operator_too(raw, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(raw)


def test_quantities():
    assert quantity_bytes("40Gi") == 40 * 2**30 and quantity_bytes("1.5G") == 1_500_000_000
    assert quantity_bytes("0") is None and quantity_bytes("lots") is None
    assert quantity_bytes("1Pi") == 2**50 and quantity_bytes("1025Ti") is None  # beyond any model's weights
    # the largest size the operator takes still makes a deadline a Job can carry (int64)
    assert download_deadline_s("1Pi", TABLE.cache) < 2**63


# --- names, sizes, owners ------------------------------------------------------------------------------------------

def test_claim_names_are_deterministic_labels_per_source_and_revision():
    names = {CacheKey("Qwen/Qwen3-14B", rev).claim for rev in ("main", "v2", "0" * 40)}
    assert len(names) == 3
    assert CacheKey("Qwen/Qwen3-14B", "main").claim == cache_key("hf://Qwen/Qwen3-14B").claim == \
        "cxygpt-cache-qwen3-14b-" + CacheKey("Qwen/Qwen3-14B", "main").claim.rsplit("-", 1)[1]
    long = CacheKey("org/" + "A_very.long-Name" * 10, "main").claim
    assert len(long) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", long)
    assert all(re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", n) and len(n) <= 63 for n in names)


def test_default_size_is_the_weight_estimate_plus_the_margin():
    _, sel = _selected()
    weights_gib = sel.fit.weights_mib / 1024
    size = default_size(sel.fit.weights_mib, TABLE.cache)
    assert size == "35Gi" and 27 < weights_gib < 28  # 27.5 GiB x 1.2 + 1 GiB, rounded up
    assert default_size(None, TABLE.cache) is None
    assert download_deadline_s("35Gi", TABLE.cache) == 3600 + 35 * 1024 // 20


def test_every_user_owns_the_cache_unless_one_retains_it():
    users = [CacheUser("b", "uid-b"), CacheUser("a", "uid-a"), CacheUser("a", "uid-a")]
    assert [r["uid"] for r in owner_references(users)] == ["uid-a", "uid-b"]
    assert all("controller" not in r and "blockOwnerDeletion" not in r for r in owner_references(users))
    assert owner_references([*users, CacheUser("c", "uid-c", retain=True)]) == []
    metadata = claim_metadata(KEY, users)
    assert metadata["annotations"]["cxygpt.io/users"] == "a,b" and metadata["annotations"]["cxygpt.io/retain"] is None
    claim = build_claim(KEY, "llm", parse_spec(SPEC).cache, "35Gi", users, made_for="qwen3-14b")
    assert not metadata_differs(claim, metadata)
    assert metadata_differs(claim, claim_metadata(KEY, users[:1]))
    assert metadata_differs(claim, claim_metadata(KEY, [*users, CacheUser("c", "uid-c", retain=True)]))


# --- manifests ------------------------------------------------------------------------------------------------------

class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def _manifests():
    spec, sel = _selected()
    users = [CacheUser("qwen3-14b", "0000-uid")]
    return [build_claim(KEY, "llm", spec.cache, "35Gi", users, made_for="qwen3-14b"),
            build_cache_job(KEY, "llm", spec, sel, "35Gi", users, TABLE, IMAGES, hf_endpoint="http://hub.local",
                            claim_uid="1111-claim-uid"),
            build_deployment(OWNER, spec, sel, TABLE, IMAGES, hf_endpoint="http://hub.local")]


def test_claim_job_and_engine_match_golden():
    text = yaml.dump_all(_manifests(), Dumper=_NoAliases, sort_keys=True)
    path = GOLDEN / "srv80g-cache.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs (UPDATE_GOLDEN=1 to accept)"


def test_claim_job_and_engine_pass_kubernetes_validate_strict(tmp_path):
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump_all(_manifests()))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    out = subprocess.run([str(exe), "-k", "1.31.0", "--strict", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" passed for resource ") == 3


def test_the_download_job_pins_resumes_and_fails_fast_on_what_no_retry_fixes():
    claim, job, _ = _manifests()
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem", "storageClassName": "fast",
                             "resources": {"requests": {"storage": "35Gi"}}}
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["cxygpt-cache-load"] and container["image"] == "cxygpt/cxygpt-operator:test"
    assert container["args"][:4] == ["--repo", "Qwen/Qwen3-14B", "--revision", "main"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["HF_ENDPOINT"] == "http://hub.local" and env["HF_HUB_DISABLE_XET"] == "1"
    assert spec["backoffLimit"] == TABLE.cache.download_retries and spec["activeDeadlineSeconds"] > 3600
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["volumes"] == [{"name": "cache", "persistentVolumeClaim": {"claimName": KEY.claim}}]
    # placed like the engines, so the volume is provisioned where they can mount it
    assert pod["affinity"] == _manifests()[2]["spec"]["template"]["spec"]["affinity"]
    assert job["metadata"]["ownerReferences"] == claim["metadata"]["ownerReferences"]


def test_engines_mount_the_cache_read_only_offline_and_never_download():
    dep = _manifests()[2]
    engine = _engine(dep)
    env = {e["name"]: e["value"] for e in engine["env"]}
    assert engine["args"][0] == "/models/weights/Qwen/Qwen3-14B"
    assert env["HF_HUB_OFFLINE"] == "1" and "HF_ENDPOINT" not in env and "--revision" not in engine["args"]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-weights"]["persistentVolumeClaim"] == {"claimName": KEY.claim, "readOnly": True}
    assert {"name": "model-weights", "mountPath": "/models/weights", "readOnly": True} in engine["volumeMounts"]
    assert claims_of(dep) == {KEY.claim}


def test_without_the_cache_engines_download_from_the_configured_hub_at_the_pinned_revision():
    raw = {"model": {"name": "m", "source": "hf://Qwen/Qwen3-14B@abc123"}}
    spec, sel = _selected(raw)
    engine = _engine(build_deployment(OWNER, spec, sel, TABLE, IMAGES, hf_endpoint="http://mirror"))
    env = {e["name"]: e["value"] for e in engine["env"]}
    assert engine["args"][0] == "Qwen/Qwen3-14B" and engine["args"][-2:] == ["--revision", "abc123"]
    assert env["HF_ENDPOINT"] == "http://mirror" and "HF_HUB_OFFLINE" not in env
    assert "HF_ENDPOINT" not in {e["name"] for e in _engine(build_deployment(OWNER, spec, sel, TABLE, IMAGES))["env"]}


# --- state --------------------------------------------------------------------------------------------------------

PVC_PENDING = {"metadata": {"name": KEY.claim, "annotations": {}}, "status": {"phase": "Pending"}}
PVC_BOUND = {"metadata": {"name": KEY.claim, "annotations": {}}, "status": {"phase": "Bound"}}


def _pod(name, phase, *, created="2026-12-02T00:00:0{}Z", n=1, terminated=None, waiting=None, scheduled=True):
    state = {"terminated": terminated} if terminated else {"waiting": waiting} if waiting else {"running": {}}
    conditions = [] if scheduled else [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                        "message": "0/3 nodes are available: pod has unbound PVCs."}]
    return {"metadata": {"name": name, "creationTimestamp": created.format(n)},
            "status": {"phase": phase, "conditions": conditions,
                       "containerStatuses": [{"name": "download", "state": state}]}}


def _job(condition=None, failed=0, reason="BackoffLimitExceeded", claim_uid=None):
    status = {"failed": failed}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": reason}]
    annotations = {"cxygpt.io/claim-uid": claim_uid} if claim_uid else {}
    return {"metadata": {"name": KEY.claim, "annotations": annotations}, "status": status}


PVC_NEW = {"metadata": {"name": KEY.claim, "uid": "uid-new", "annotations": {}}, "status": {"phase": "Bound"}}


def test_a_job_fills_the_claim_whose_uid_it_records_or_one_not_newer_than_itself():
    pvc = {"metadata": {"uid": "u2", "creationTimestamp": "2026-12-06T10:00:00Z"}}
    assert fills({"metadata": {"annotations": {"cxygpt.io/claim-uid": "u2"}}}, pvc)
    assert not fills({"metadata": {"annotations": {"cxygpt.io/claim-uid": "u1"}}}, pvc)
    assert fills({"metadata": {"creationTimestamp": "2026-12-06T10:00:01Z"}}, pvc)  # made before the record
    assert not fills({"metadata": {"creationTimestamp": "2026-12-06T09:00:00Z"}}, pvc)
    assert not fills(None, pvc) and not fills({"metadata": {}}, None)


@pytest.mark.parametrize("case, args, kw, expected", [
    ("recorded", ({**PVC_BOUND, "metadata": {"annotations": {"cxygpt.io/cache-state": record(
        {"revision": "abc", "bytes": 2**30, "files": 7})}}}, None, []), {},
     ("Ready", "Downloaded", "abc", 2**30)),
    ("complete", (PVC_BOUND, _job("Complete", reason="CompletionsReached"), [_pod("p", "Succeeded", terminated={
        "exitCode": 0, "message": '{"bytes": 100, "files": 3, "revision": "def"}'})]), {},
     ("Ready", "Downloaded", "def", 100)),
    ("repo missing", (PVC_BOUND, _job("Failed", 1, "PodFailurePolicy"), [_pod("p", "Failed", terminated={
        "exitCode": 2, "message": '{"reason": "RepositoryNotFound", "message": "Org/X is not on the Hub"}'})]), {},
     ("Failed", "RepositoryNotFound", None, None)),
    ("crashed", (PVC_BOUND, _job("Failed", 5), [_pod("p", "Failed", terminated={
        "exitCode": 137, "reason": "Error", "message": "Killed\n"})]), {}, ("Failed", "Error", None, None)),
    ("no class", (PVC_PENDING, _job(), []), {"storage_problem": ("StorageClassNotFound", "no such class")},
     ("Pending", "StorageClassNotFound", None, None)),
    ("provisioning", (PVC_PENDING, _job(), []), {"claim_events": [
        {"type": "Normal", "reason": "WaitForFirstConsumer", "message": "waiting"},
        {"type": "Warning", "reason": "ProvisioningFailed", "message": "quota exceeded"}]},
     ("Pending", "ProvisioningFailed", None, None)),
    ("first consumer", (PVC_PENDING, _job(), [_pod("p", "Pending", scheduled=False)]), {},
     ("Pending", "DownloadUnschedulable", None, None)),
    ("no secret", (PVC_BOUND, _job(), [_pod("p", "Pending", waiting={
        "reason": "CreateContainerConfigError", "message": 'secret "hf" not found'})]), {},
     ("Failed", "DownloadCannotStart", None, None)),
    ("downloading", (PVC_BOUND, _job(failed=1), [_pod("a", "Failed", n=1, terminated={"exitCode": 1}),
                                                 _pod("b", "Running", n=2)]),
     {"progress": {"bytesDone": 3 * 2**20, "bytesTotal": 8 * 2**20, "revision": "abc"}},
     ("Downloading", "Downloading", "abc", 3 * 2**20)),
    ("retry pending", (PVC_BOUND, _job(failed=1), [_pod("a", "Failed", terminated={"exitCode": 1})]), {},
     ("Pending", "DownloadStarting", None, None)),
    ("no claim yet", (None, None, []), {}, ("Pending", "CreatingClaim", None, None)),
    # a claim deleted by hand and made again is another claim: the Job that filled the old one does not fill it
    ("claim made again", (PVC_NEW, _job("Complete", reason="CompletionsReached", claim_uid="uid-old"),
                          [_pod("p", "Succeeded", terminated={"exitCode": 0, "message": '{"bytes": 100}'})]), {},
     ("Pending", "ReplacingJob", None, None)),
    ("its own Job", (PVC_NEW, _job("Complete", reason="CompletionsReached", claim_uid="uid-new"),
                     [_pod("p", "Succeeded", terminated={"exitCode": 0, "message": '{"bytes": 100}'})]), {},
     ("Ready", "Downloaded", None, 100)),
    ("claim deleting", ({**PVC_NEW, "metadata": {**PVC_NEW["metadata"], "deletionTimestamp": "2026-12-06T00:00:00Z"}},
                        _job("Complete", reason="CompletionsReached", claim_uid="uid-new"), []), {},
     ("Pending", "ClaimDeleting", None, None)),
])
def test_cache_state_from_claim_job_and_pods(case, args, kw, expected):
    state = cache_state(KEY, *args, **kw)
    assert (state.phase, state.reason, state.revision, state.bytes_done) == expected, state


def test_failure_messages_say_what_happened_and_how_to_retry():
    state = cache_state(KEY, PVC_BOUND, _job("Failed", 1, "PodFailurePolicy"), [_pod("p", "Failed", terminated={
        "exitCode": 2, "message": '{"reason": "RepositoryNotFound", "message": "Org/X is not on the Hub"}'})])
    assert state.message == (f"the download Job {KEY.claim} failed (PodFailurePolicy after 1 attempt): "
                             "Org/X is not on the Hub; delete the Job to retry")
    assert cache_state(KEY, PVC_BOUND, _job(), [_pod("b", "Running")], progress={
        "bytesDone": 3 * 2**30, "bytesTotal": 8 * 2**30}).message == \
        f"downloading Qwen/Qwen3-14B@main into {KEY.claim}: 3.00 GiB of 8.00 GiB"


def test_progress_is_the_last_progress_line_of_the_log():
    log = '{"event": "resolved"}\nnot json\n{"event": "progress", "bytesDone": 1}\n{"event": "progress", ' \
          '"bytesDone": 5, "bytesTotal": 9}\nWARNING something\n'
    assert progress_from_log(log) == {"event": "progress", "bytesDone": 5, "bytesTotal": 9}
    assert progress_from_log("") is None


# --- the model's status ---------------------------------------------------------------------------------------------

def _status(state, *, deployment=None, pods=(), previous=None):
    spec, sel = _selected()
    return build_status(OWNER, spec, sel, table=TABLE, deployment=deployment, image="i", args=["a"],
                        previous=previous or {}, now=NOW, pods=list(pods), cache=(KEY, state, "35Gi"))


def _conditions(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_a_downloading_model_is_pending_not_starting():
    status = _status(CacheState("Downloading", "Downloading", "downloading: 1.00 GiB of 27.00 GiB", "abc", 2**30,
                                27 * 2**30))
    assert status["phase"] == "Pending"
    assert status["cache"] == {"phase": "Downloading", "claimName": KEY.claim, "source": "hf://Qwen/Qwen3-14B",
                               "requestedRevision": "main", "revision": "abc", "size": "35Gi", "bytesDone": 2**30,
                               "bytesTotal": 27 * 2**30, "reason": "Downloading",
                               "message": "downloading: 1.00 GiB of 27.00 GiB"}
    assert _conditions(status) == {"ProfileSelected": ("True", "AutoSelected"), "Available": ("False", "CacheNotReady"),
                                   "Progressing": ("True", "CacheDownloading"), "Degraded": ("False", "AsExpected"),
                                   "CacheReady": ("False", "Downloading")}


def test_a_failed_download_fails_the_model_and_a_missing_class_is_pending_but_degraded():
    status = _status(CacheState("Failed", "RepositoryNotFound", "Org/X is not on the Hub"))
    assert status["phase"] == "Failed"
    assert _conditions(status)["Degraded"] == ("True", "CacheDownloadFailed")
    assert _conditions(status)["Progressing"] == ("False", "CacheDownloadFailed")
    status = _status(CacheState("Pending", "StorageClassNotFound", 'storageclass "fast" not found'))
    assert status["phase"] == "Pending" and _conditions(status)["Degraded"] == ("True", "CacheClaimFailed")
    assert "storageclass" in next(c for c in status["conditions"] if c["type"] == "Degraded")["message"]


def test_engines_of_an_older_revision_keep_serving_while_a_new_cache_downloads():
    deployment = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1,
                                                             "updatedReplicas": 1}}
    status = _status(CacheState("Downloading", "Downloading", "downloading"), deployment=deployment)
    # every replica serves the old weights: Ready, with the change shown as progressing
    assert status["phase"] == "Ready" and _conditions(status)["Available"] == ("True", "MinimumReplicasAvailable")
    assert _conditions(status)["Progressing"] == ("True", "CacheDownloading")
    ready = _status(CacheState("Ready", "Downloaded", "done", "abc"), deployment=deployment)
    assert ready["phase"] == "Ready" and _conditions(ready)["CacheReady"] == ("True", "Downloaded")
