"""The adapters' cache in the operator's pure core: the claim the engines mount when the model uses the model cache,
one download Job per adapter revision (the weights' loader, placed with the engines), its state, and the plan that
loads an adapter from it only once its files are there."""
import pytest

from cxygpt_operator.adapter_cache import (
    ADAPTER_CACHE_LABEL,
    DOWNLOAD_LABEL,
    Loader,
    build_claim,
    build_job,
    claim_name,
    download_state,
    files_dir,
    job_name,
    mounted_claim,
)
from cxygpt_operator.adapters import Adapter, Engine, blocked_adapters, plan
from cxygpt_operator.cache import CacheKey, CacheSpec, parse_cache
from cxygpt_operator.manifests import EngineImages, Owner, build_deployment
from cxygpt_operator.resolve import Candidates, parse_spec, resolve
from cxygpt_profiles import GpuNode, default_catalog, default_table

TABLE, CATALOG = default_table(), default_catalog()
IMAGES = EngineImages(vllm=TABLE.vllm.image, sim="cxygpt/cxygpt-sim:test")
OWNER = Owner(name="qwen3", namespace="llm", uid="uid-1")
H100 = GpuNode(81559, 1, "h100", "NVIDIA-H100-80GB-HBM3")
KEY = CacheKey("cxygpt-demo/sql-lora", "0123abcd")
LOADER = Loader("cxygpt/cxygpt-operator:test", "http://hub.local", "16Gi", 4000, 4)
SQL = {"name": "sql", "source": "hf://cxygpt-demo/sql-lora@0123abcd"}


def deployment(cache: bool, adapters=(SQL,), adapter_cache=None):
    raw = {"model": {"name": "qwen3-0.6b", "source": "hf://Qwen/Qwen3-0.6B", "cache": {"enabled": cache}},
           "engine": {"kind": "sim"}, "adapters": list(adapters)}
    parsed = parse_spec(raw)
    return build_deployment(OWNER, parsed, resolve(parsed, Candidates((H100,)), TABLE, CATALOG), TABLE, IMAGES,
                            adapter_cache=adapter_cache)


def test_engines_mount_the_adapter_cache_they_are_given_whatever_the_adapters():
    claim = claim_name(OWNER.name, OWNER.uid)
    with_one = deployment(True, adapter_cache=claim)["spec"]["template"]
    assert mounted_claim(with_one["spec"]) == claim
    [mount] = [m for m in with_one["spec"]["containers"][0]["volumeMounts"] if m["name"] == "adapter-cache"]
    assert mount == {"name": "adapter-cache", "mountPath": "/models/adapter-cache", "readOnly": True}
    # another adapter, or another revision, changes nothing in the pod template: no restart
    other = {"name": "support", "source": "hf://cxygpt-demo/support-lora@v2"}
    assert deployment(True, [SQL, other], adapter_cache=claim)["spec"]["template"] == with_one
    # none given (no model cache, or the API server refused the claim): the engines start without it
    assert mounted_claim(deployment(True)["spec"]["template"]["spec"]) is None
    assert mounted_claim(deployment(True, [], adapter_cache=claim)["spec"]["template"]["spec"]) is None


def test_names_are_dns_labels_another_for_each_model_and_revision():
    claim = claim_name("m" * 200, "uid-1")
    assert len(claim) <= 63 and claim.startswith("cxygpt-adapters-") and claim != claim_name("m" * 200, "uid-2")
    job = job_name(claim, KEY)
    assert len(job) <= 63 and job != job_name(claim, CacheKey(KEY.repo, "main"))
    assert files_dir(claim, KEY) == f"/models/adapter-cache/{job}/cxygpt-demo/sql-lora"


def test_the_claim_and_jobs_belong_to_the_model_only():
    cache = parse_cache({"enabled": True, "storageClassName": "fast", "accessMode": "ReadWriteMany"})
    pvc = build_claim("c", "llm", "qwen3", "uid-1", cache, "16Gi")
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "volumeMode": "Filesystem", "storageClassName": "fast",
                           "resources": {"requests": {"storage": "16Gi"}}}
    assert [(r["name"], r["uid"], r["controller"]) for r in pvc["metadata"]["ownerReferences"]] == [
        ("qwen3", "uid-1", True)]
    assert pvc["metadata"]["labels"][ADAPTER_CACHE_LABEL] == "c"


def test_the_download_job_is_the_loaders_into_its_own_directory_placed_with_the_engines():
    template = deployment(True, adapter_cache="c")["spec"]["template"]["spec"]
    template["tolerations"] = [{"key": "gpu", "operator": "Exists"}]
    cache = CacheSpec(enabled=True, token_secret="hf", token_key="t")
    job = build_job(KEY, "c", "llm", "qwen3", "uid-1", cache, LOADER, template_spec=template,
                    engine_labels={"app.kubernetes.io/instance": "qwen3"})
    name = job_name("c", KEY)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert job["metadata"]["name"] == name and job["spec"]["backoffLimit"] == 4
    assert job["spec"]["activeDeadlineSeconds"] == 4000
    assert container["command"] == ["cxygpt-cache-load"] and container["image"] == LOADER.image
    assert container["args"][:6] == ["--repo", KEY.repo, "--revision", KEY.revision, "--dir", f"/cache/{name}"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_ENDPOINT"]["value"] == "http://hub.local"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "t"}}
    assert pod["volumes"] == [{"name": "cache", "persistentVolumeClaim": {"claimName": "c"}}]
    assert pod["affinity"]["nodeAffinity"] == template["affinity"]["nodeAffinity"]
    assert pod["tolerations"] == template["tolerations"]
    [near] = pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert near["podAffinityTerm"]["labelSelector"] == {"matchLabels": {"app.kubernetes.io/instance": "qwen3"}}
    assert job["spec"]["template"]["metadata"]["labels"][DOWNLOAD_LABEL] == name


def _job(condition=None):
    return {"metadata": {"name": "j"}, "status": {"conditions": [{"type": condition, "status": "True",
                                                                  "reason": "x"}] if condition else []}}


def _failed_pod(message):
    return {"metadata": {"name": "j-1", "creationTimestamp": "t"}, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "download", "state": {"terminated": {"exitCode": 2, "message": message}}}]}}


@pytest.mark.parametrize("job, pods, phase, reason", [
    (None, [], "Downloading", "Downloading"),
    (_job(), [], "Downloading", "Downloading"),
    (_job("Complete"), [], "Ready", "Downloaded"),
    (_job("Failed"), [_failed_pod('{"reason": "RevisionNotFound", "message": "no revision v9"}')], "Failed",
     "RevisionNotFound"),
    (_job(), [{"metadata": {"name": "j-1"}, "status": {"containerStatuses": [
        {"name": "download", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}}], "Failed",
     "DownloadCannotStart"),
])
def test_a_downloads_state(job, pods, phase, reason):
    found = download_state(KEY, job, pods)
    assert (found.phase, found.reason) == (phase, reason)
    if phase == "Failed" and reason == "RevisionNotFound":
        assert "no revision v9" in found.message and "delete the Job to retry" in found.message


def test_a_pinned_revision_needs_the_adapter_cache():
    pinned = Adapter("sql", SQL["source"])
    assert blocked_adapters([pinned], base_names={}, other_adapters={})["sql"].reason == "RevisionNotSupported"
    assert "spec.model.cache.enabled" in blocked_adapters([pinned], base_names={}, other_adapters={})["sql"].message
    # through the cache, offline engines take Hub adapters at any revision
    assert blocked_adapters([pinned, Adapter("b", "hf://o/b")], base_names={}, other_adapters={}, offline=True,
                            cache=True) == {}


def test_an_adapter_is_loaded_from_the_cache_once_downloaded_and_never_before():
    downloading = Adapter("sql", SQL["source"])
    engine = Engine("u1", "p1", {})
    step = plan([downloading], [engine], {}, {}, now=0, max_calls=9, waiting={"sql": "downloading it"})
    assert step.calls == () and step.status[0]["reason"] == "Downloading"
    assert step.status[0]["message"] == "downloading it"
    ready = Adapter("sql", SQL["source"], cached="/models/adapter-cache/j/cxygpt-demo/sql-lora")
    [call] = plan([ready], [engine], {}, {}, now=0, max_calls=9).calls
    assert (call.action, call.path) == ("load", ready.cached)
    # loaded from the Hub before the cache was on: kept while the cache downloads, then loaded again from it
    hub = Engine("u1", "p1", {"sql": "cxygpt-demo/sql-lora"})
    assert plan([downloading], [hub], {}, {}, now=0, max_calls=9, waiting={"sql": "downloading"}).calls == ()
    [again] = plan([ready], [hub], {}, {}, now=0, max_calls=9).calls
    assert again.inplace and again.path == ready.cached
