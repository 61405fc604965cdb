"""Where engines run (pure): GPUs of every kind from GPU Feature Discovery's labels (MIG slices too), pod settings
over the operator's defaults and what they may not set, the nodes they admit, spec.gpu; the sizing in the status;
engine exits that no restart fixes, failed at the first one."""
import asyncio
import logging

import pytest

from cxygpt_operator.cache import CacheSpec, cache_key, claim_differences
from cxygpt_operator.nodes import node_gpus
from cxygpt_operator.placement import (
    PodSettings,
    SettingsError,
    keeps_off,
    load_defaults,
    parse_pod_settings,
    tolerates,
)
from cxygpt_operator.resolve import Candidates, SpecError, candidates, parse_spec, resolve, schedulable_replicas
from cxygpt_operator.status import build_status, exit_cause, pod_failure
from cxygpt_profiles import GpuNode, NoFit, default_catalog, default_table

TABLE, CATALOG = default_table(), default_catalog()
SMALL = {"model": {"name": "qwen3-0.6b", "source": "hf://Qwen/Qwen3-0.6B"}}
H100 = {"nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "2", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
# GFD on an A100 80GB split into two 3g.40gb slices, mixed strategy: the full GPU's labels stay, its resource is 0
A100_MIG = {"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": "1", "nvidia.com/gpu.product":
            "NVIDIA-A100-SXM4-80GB", "nvidia.com/mig.strategy": "mixed", "nvidia.com/mig-3g.40gb.count": "2",
            "nvidia.com/mig-3g.40gb.memory": "40192", "nvidia.com/mig-3g.40gb.product":
            "NVIDIA-A100-SXM4-80GB-MIG-3g.40gb", "nvidia.com/mig-3g.40gb.slices.gi": "3",
            "nvidia.com/mig-3g.40gb.multiprocessors": "42"}


def node(name, labels, allocatable=None, taints=()):
    return {"metadata": {"name": name, "labels": labels}, "spec": {"taints": list(taints)},
            "status": {"allocatable": allocatable or {}, "conditions": [{"type": "Ready", "status": "True"}]}}


# --- GPUs of every kind ------------------------------------------------------------------------------------------

def test_mig_slices_of_the_mixed_strategy_are_a_kind_of_their_own():
    kinds = node_gpus(node("a100", A100_MIG, {"nvidia.com/gpu": "0", "nvidia.com/mig-3g.40gb": "2"}))
    assert [k.gpus for k in kinds] == [GpuNode(memory_mib=40192, count=2, name="a100",
                                               product="NVIDIA-A100-SXM4-80GB-MIG-3g.40gb",
                                               resource="nvidia.com/mig-3g.40gb", mig=True)]
    # a node with a whole GPU beside its slices has both kinds; the allocatable count wins over the label
    both = node_gpus(node("mixed", A100_MIG, {"nvidia.com/gpu": "1", "nvidia.com/mig-3g.40gb": "1"}))
    assert [(k.gpus.resource, k.gpus.count, k.gpus.memory_mib) for k in both] == [
        ("nvidia.com/gpu", 1, 81920), ("nvidia.com/mig-3g.40gb", 1, 40192)]


def test_mig_slices_of_the_single_strategy_are_nvidia_com_gpu_that_never_split():
    labels = {"nvidia.com/gpu.memory": "19968", "nvidia.com/gpu.count": "7", "nvidia.com/mig.strategy": "single",
              "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-MIG-2g.20gb"}
    (kind,) = node_gpus(node("a100", labels, {"nvidia.com/gpu": "7"}))
    assert (kind.gpus.resource, kind.gpus.count, kind.gpus.mig, kind.gpus.available) == ("nvidia.com/gpu", 7, True, 1)


def test_a_nodes_labels_and_taints_go_with_its_gpus():
    (kind,) = node_gpus(node("n", {**H100, "pool": "llm"}, {"nvidia.com/gpu": "2"},
                             taints=[{"key": "dedicated", "value": "llm", "effect": "NoSchedule"}]))
    assert kind.label_map["pool"] == "llm" and kind.taint_maps == [
        {"key": "dedicated", "value": "llm", "effect": "NoSchedule"}]


# --- pod settings --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine, message", [
    ({"podLabels": {"app.kubernetes.io/instance": "x"}}, "cannot set the operator's labels"),
    ({"podLabels": {"cxygpt.io/engine-access": "true"}}, "cannot set the operator's labels"),
    ({"podLabels": {"pod-template-hash": "x"}}, "cannot set the operator's labels"),
    ({"podAnnotations": {"cxygpt.io/config-hash": "x"}}, "cannot set cxygpt.io/\\* annotations"),
    ({"resources": {"requests": {"nvidia.com/gpu": 8}}}, "cannot name GPUs"),
    ({"resources": {"limits": {"nvidia.com/mig-1g.10gb": 1}}}, "cannot name GPUs"),
    ({"resources": {"claims": [{"name": "gpu"}]}}, "only requests and limits"),
    ({"runtimeClassName": "Nvidia Runtime"}, "runtimeClassName must be a lower-case DNS subdomain"),
    ({"nodeSelector": {f"k{i}": "v" for i in range(33)}}, "at most 32 entries"),
    ({"affinity": {"nodeAffinity": {}, "topologySpread": {}}}, "only nodeAffinity, podAffinity, podAntiAffinity"),
    ({"tolerations": ["dedicated"]}, "a list of at most 32 tolerations"),
])
def test_settings_that_would_override_what_the_operator_owns_are_refused(engine, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({**SMALL, "engine": engine})


def test_a_models_settings_override_the_defaults_key_by_key_and_add_tolerations():
    defaults = parse_pod_settings({"runtimeClassName": "nvidia", "nodeSelector": {"pool": "gpu", "tier": "a"},
                                   "tolerations": [{"key": "gpu-pool", "operator": "Exists"}],
                                   "resources": {"requests": {"cpu": 2}}, "podLabels": {"team": "platform"},
                                   "affinity": {"podAntiAffinity": {"x": 1}, "nodeAffinity": {"y": 1}}})
    spec = parse_spec({**SMALL, "engine": {"nodeSelector": {"tier": "b"}, "priorityClassName": "serving",
                                           "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                                           "resources": {"requests": {"memory": "8Gi"}},
                                           "affinity": {"nodeAffinity": {"z": 1}}}}, defaults)
    pod = spec.pod
    assert pod.node_selector == {"pool": "gpu", "tier": "b"} and pod.runtime_class == "nvidia"
    assert pod.priority_class == "serving" and pod.labels == {"team": "platform"}
    assert pod.requests == {"cpu": 2, "memory": "8Gi"}
    assert pod.affinity == {"podAntiAffinity": {"x": 1}, "nodeAffinity": {"z": 1}}  # part by part
    assert [t["key"] for t in spec.tolerations] == ["nvidia.com/gpu", "gpu-pool", "dedicated"]


def test_the_defaults_file_is_checked_at_start_naming_the_field(tmp_path):
    path = tmp_path / "engines.yaml"
    path.write_text("runtimeClassName: nvidia\ntolerations: [{key: a, operator: Exists}]\n")
    assert load_defaults(path) == PodSettings(runtime_class="nvidia", tolerations=({"key": "a", "operator": "Exists"},))
    for text, message in [("nodeSelectr: {a: b}\n", "unknown field(s) nodeSelectr"),
                          ("podLabels: {app.kubernetes.io/name: x}\n", "engines.podLabels cannot set"),
                          ("[1, 2]\n", "a map of nodeSelector"), ("a: [\n", "not valid YAML")]:
        path.write_text(text)
        with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_defaults(path)
    with pytest.raises(SettingsError, match="cannot read"):
        load_defaults(tmp_path / "missing.yaml")


@pytest.mark.parametrize("toleration, taint, expected", [
    ({"key": "a", "operator": "Exists"}, {"key": "a", "value": "x", "effect": "NoSchedule"}, True),
    ({"key": "a", "value": "x"}, {"key": "a", "value": "x", "effect": "NoSchedule"}, True),   # Equal by default
    ({"key": "a", "value": "y"}, {"key": "a", "value": "x", "effect": "NoSchedule"}, False),
    ({"key": "a", "operator": "Exists", "effect": "NoExecute"}, {"key": "a", "effect": "NoSchedule"}, False),
    ({"operator": "Exists"}, {"key": "anything", "effect": "NoExecute"}, True),               # empty key: every taint
    ({"key": "b", "operator": "Exists"}, {"key": "a", "effect": "NoSchedule"}, False),
])
def test_tolerations_match_taints_as_kubernetes_does(toleration, taint, expected):
    assert tolerates(toleration, taint) is expected


def test_node_affinity_expressions_as_kubernetes_reads_them():
    def required(*expressions, fields=()):
        terms = [{"matchExpressions": list(expressions), **({"matchFields": list(fields)} if fields else {})}]
        return PodSettings(affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": terms}}})
    labels = {"zone": "a", "gpus": "8"}
    on = {"labels": labels, "name": "n1", "taints": []}
    assert keeps_off(required({"key": "zone", "operator": "In", "values": ["a", "b"]}), [], **on) is None
    assert keeps_off(required({"key": "zone", "operator": "NotIn", "values": ["a"]}), [], **on)
    assert keeps_off(required({"key": "gpus", "operator": "Gt", "values": ["4"]}), [], **on) is None
    assert keeps_off(required({"key": "gpus", "operator": "Lt", "values": ["4"]}), [], **on)
    assert keeps_off(required({"key": "spot", "operator": "DoesNotExist"}), [], **on) is None
    assert keeps_off(required(fields=[{"key": "metadata.name", "operator": "In", "values": ["n2"]}]), [], **on)
    assert keeps_off(PodSettings(node_selector={"zone": "b"}), [], **on) == "nodeSelector zone=b"


# --- which nodes, then sizing --------------------------------------------------------------------------------------

def inventory():
    premium = [{"key": "dedicated", "value": "premium", "effect": "NoSchedule"}]
    return [*node_gpus(node("h100", {**H100, "pool": "a"}, {"nvidia.com/gpu": "2"})),
            *node_gpus(node("premium", {**H100, "pool": "b"}, {"nvidia.com/gpu": "2"}, taints=premium)),
            *node_gpus(node("a100", A100_MIG, {"nvidia.com/gpu": "0", "nvidia.com/mig-3g.40gb": "2"}))]


def test_only_the_nodes_the_settings_admit_are_sized_for():
    found = candidates(parse_spec(SMALL), inventory())
    assert sorted(g.name for g in found.gpus) == ["a100", "h100"]
    assert found.kept_off == ("premium: taint dedicated=premium:NoSchedule (not in spec.engine.tolerations)",)
    tolerant = parse_spec({**SMALL, "engine": {"tolerations": [{"key": "dedicated", "operator": "Exists"}],
                                               "nodeSelector": {"pool": "b"}}})
    assert [g.name for g in candidates(tolerant, inventory()).gpus] == ["premium"]
    sel = resolve(tolerant, candidates(tolerant, inventory()), TABLE, CATALOG)
    assert (sel.node.name, sel.gpu_count) == ("premium", 1)


def test_spec_gpu_requires_or_prefers_products_and_a_least_memory():
    mig = parse_spec({**SMALL, "gpu": {"products": ["NVIDIA-A100-SXM4-80GB-MIG-3g.40gb"], "productPolicy": "Require"}})
    found = candidates(mig, inventory())
    sel = resolve(mig, found, TABLE, CATALOG)
    assert (sel.node.resource, sel.profile.name, sel.gpu_count) == ("nvidia.com/mig-3g.40gb", "SRV_24G", 1)
    assert schedulable_replicas(sel, found.gpus) == 2  # two slices: two replicas
    # preferred, not required: the slice first, though a whole H100 would be a more capable profile
    prefer = parse_spec({**SMALL, "gpu": {"products": ["NVIDIA-A100-SXM4-80GB-MIG-3g.40gb"]}})
    assert resolve(prefer, candidates(prefer, inventory()), TABLE, CATALOG).node.name == "a100"
    assert resolve(parse_spec(SMALL), candidates(parse_spec(SMALL), inventory()), TABLE, CATALOG).node.name == "h100"
    big = parse_spec({**SMALL, "gpu": {"minMemoryMiB": 80000}})
    assert [g.name for g in candidates(big, inventory()).gpus] == ["h100"]


def test_nothing_admitted_is_pending_and_says_which_nodes_the_settings_keep_it_off():
    spec = parse_spec({**SMALL, "engine": {"nodeSelector": {"pool": "c"}}})
    with pytest.raises(NoFit) as err:
        resolve(spec, candidates(spec, inventory()), TABLE, CATALOG)
    assert (err.value.reason, err.value.permanent) == ("NoMatchingGPU", False)
    assert "kept off: a100 (nvidia.com/mig-3g.40gb): nodeSelector pool=c; h100: nodeSelector pool=c" in \
        err.value.message


def test_spec_gpu_is_checked_as_the_schema_checks_it():
    with pytest.raises(SpecError, match="productPolicy Require needs spec.gpu.products"):
        parse_spec({**SMALL, "gpu": {"productPolicy": "Require"}})
    with pytest.raises(SpecError, match="productPolicy must be one of Prefer, Require"):
        parse_spec({**SMALL, "gpu": {"products": ["x"], "productPolicy": "Only"}})
    with pytest.raises(SpecError, match="minMemoryMiB must be an integer"):
        parse_spec({**SMALL, "gpu": {"minMemoryMiB": "80G"}})


# --- the status says why this size ---------------------------------------------------------------------------------

OWNER = __import__("cxygpt_operator.manifests", fromlist=["Owner"]).Owner("m", "llm", "uid", 1)


def _status(spec, outcome, deployment=None, **kw):
    return build_status(OWNER, spec, outcome, table=TABLE, deployment=deployment, image="i", args=["a"], previous={},
                        now="2026-12-01T00:00:00Z", **kw)


def test_the_status_carries_the_sizing_and_the_condition_says_why():
    spec = parse_spec(SMALL)
    sel = resolve(spec, Candidates((GpuNode(81559, 2, "h100x2", "NVIDIA-H100-80GB-HBM3"),)), TABLE, CATALOG)
    status = _status(spec, sel)
    assert status["sizing"]["gpus"] == 1 and status["sizing"]["available"] == 2
    assert status["sizing"]["estimates"] == [{"gpus": 1, "fits": True, "maxModelLen": 16384, "weightsMiB": 1137,
                                              "kvTokenCapacity": 1313810, "message": sel.fit.message}]
    assert status["gpu"]["resource"] == "nvidia.com/gpu" and status["gpu"]["summary"] == "1x79GiB"
    selected = next(c for c in status["conditions"] if c["type"] == "ProfileSelected")
    assert "1 more of the node's 2 GPUs stays free" in selected["message"]
    # with nothing fitting, the closest miss's estimates
    huge = parse_spec({"model": {"name": "l", "source": "hf://meta-llama/Llama-3.1-70B-Instruct"}})
    with pytest.raises(NoFit) as err:
        resolve(huge, Candidates((GpuNode(46068, 1, "l40s", "NVIDIA-L40S"),)), TABLE, CATALOG)
    pending = _status(huge, err.value)
    assert pending["phase"] == "Pending" and pending["sizing"]["estimates"][0]["fits"] is False


# --- engine exits that no restart fixes ----------------------------------------------------------------------------

VLLM_NOT_FOUND = """(APIServer pid=1) huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error. (Request ID: Root=1-6)
(APIServer pid=1) Repository Not Found for url: https://huggingface.co/api/models/Qwen/Qwen3-0.6b-typo/tree/main.
(APIServer pid=1) The above exception was the direct cause of the following exception:
(APIServer pid=1) ValueError: Invalid repository ID or local directory specified: 'Qwen/Qwen3-0.6b-typo'.
(APIServer pid=1) Please verify the following requirements:
(APIServer pid=1) 1. Provide a valid Hugging Face repository ID.
(APIServer pid=1)    - For Mistral models: ensure the presence of a 'params.json'."""
VLLM_GATED = """(APIServer pid=1) huggingface_hub.errors.GatedRepoError: 401 Client Error. (Request ID: Root=1-6)
(APIServer pid=1) Cannot access gated repo for url https://huggingface.co/meta-llama/Llama-3.1-8B/resolve/main/config.json.
(APIServer pid=1) Access to model meta-llama/Llama-3.1-8B is restricted. You must have access to it and be authenticated.
(APIServer pid=1) ValueError: Invalid repository ID or local directory specified: 'meta-llama/Llama-3.1-8B'."""
VLLM_KV = """(EngineCore_DP0 pid=200) ValueError: To serve at least one request with the model's max seq len (131072), \
(16.00 GiB KV cache is needed, which is larger than the available KV cache memory (9.05 GiB). Based on the available \
memory, the estimated maximum model length is 74160. Try increasing `gpu_memory_utilization` or decreasing \
`max_model_len` when initializing the engine.
(APIServer pid=1) RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"""
VLLM_ARGS = "usage: vllm serve [model_tag] [options]\nvllm serve: error: unrecognized arguments: --enable-magic"
SIM_NOT_FOUND = ("cxygpt-sim: error: cannot get the weights of Qwen/Missing: RepositoryNotFoundError: 404 Client "
                 "Error. (Request ID: 0a1b)")


@pytest.mark.parametrize("log, reason", [
    (VLLM_NOT_FOUND, "ModelNotFound"), (VLLM_GATED, "ModelAccessDenied"), (VLLM_KV, "ModelDoesNotFit"),
    (VLLM_ARGS, "EngineArgumentRefused"), (SIM_NOT_FOUND, "ModelNotFound"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.2 GiB", "ModelDoesNotFit"),
    ("huggingface_hub.errors.RevisionNotFoundError: 404 Client Error.\nInvalid rev id: v9", "ModelNotFound"),
    ("cxygpt-sim: error: argument --max-num-seqs: invalid int value: 'many'", "EngineArgumentRefused"),
    ("cxygpt-sim: error: KV budget of 16 tokens cannot hold one sequence of max-model-len 16384; raise "
     "--num-gpu-blocks-override", "ModelDoesNotFit"),
])
def test_an_exit_no_restart_fixes_is_named_from_the_engines_own_words(log, reason):
    cause = exit_cause({"exitCode": 1, "message": log})
    assert cause is not None and cause[0] == reason
    assert len(cause[1]) < 600  # the line quoted, bounded


def test_other_exits_are_left_to_the_restarts():
    assert exit_cause({"exitCode": 137, "message": "Killed"}) is None
    assert exit_cause({"exitCode": 0, "message": VLLM_NOT_FOUND}) is None  # a clean stop
    assert exit_cause({"exitCode": 1}) is None


def test_a_missing_repository_fails_the_model_at_the_first_exit():
    spec = parse_spec(SMALL)
    sel = resolve(spec, Candidates((GpuNode(81559, 1, "h100", "NVIDIA-H100-80GB-HBM3"),)), TABLE, CATALOG)
    # restarted once already: running again, its first exit in lastState
    engine = {"name": "engine", "ready": False, "restartCount": 1, "state": {"running": {}},
              "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": VLLM_NOT_FOUND}}}
    pod = {"metadata": {"name": "m-1", "labels": {"pod-template-hash": "h"}},
           "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}],
                      "containerStatuses": [engine]}}
    assert pod_failure(pod)[0] == "ModelNotFound"
    status = _status(spec, sel, pods=[pod], deployment={"metadata": {"generation": 1},
                                                        "status": {"observedGeneration": 1}})
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert status["phase"] == "Failed" and degraded["reason"] == "ModelNotFound"
    assert degraded["message"].startswith("pod m-1: the engine exited with code 1 (1 restarts): the model's "
                                          "repository or revision does not exist")
    assert "Invalid repository ID or local directory specified: 'Qwen/Qwen3-0.6b-typo'" in degraded["message"]


# --- a cache claim made with other settings ------------------------------------------------------------------------

def claim(phase, storage_class="slow", size="10Gi", made_for="m"):
    return {"metadata": {"name": "c", "annotations": {"cxygpt.io/made-for": made_for}},
            "spec": {"storageClassName": storage_class, "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": size}}}, "status": {"phase": phase}}


def test_the_claims_settings_are_compared_with_the_spec():
    assert claim_differences(claim("Pending"), CacheSpec(enabled=True, storage_class="fast")) == [
        "storageClassName slow, not fast"]
    assert claim_differences(claim("Pending"), CacheSpec(enabled=True)) == []  # no class named: the default's
    assert claim_differences(claim("Bound"), CacheSpec(enabled=True, size="10240Mi",
                                                       access_mode="ReadWriteMany")) == [
        "accessMode ReadWriteOnce, not ReadWriteMany"]  # the same size, spelled otherwise


class _Kube:
    def __init__(self):
        self.deleted = []

    def delete(self, kind, namespace, name):
        self.deleted.append(kind)


@pytest.mark.parametrize("pvc, users, replaced", [
    (claim("Pending"), ["m"], True),                       # made for this model, still Pending: made again
    (claim("Pending", made_for="gone"), ["m"], True),      # made for a model no longer using it
    (claim("Pending", made_for="other"), ["m", "other"], False),  # another user's settings: theirs to change
    (claim("Bound"), ["m"], False),                        # Bound: kept, the status says how to move it
])
def test_a_pending_claim_made_for_this_model_is_replaced_when_its_spec_changes(pvc, users, replaced):
    from cxygpt_operator.cache import CacheUser
    from cxygpt_operator.manifests import Owner
    from cxygpt_operator.reconcile import _claim_note, _replace_pending_claim

    kube, key = _Kube(), cache_key("hf://Qwen/Qwen3-0.6B")
    ctx = type("Ctx", (), {"kube": kube})()
    differences = ["storageClassName slow, not fast"]
    done = asyncio.run(_replace_pending_claim(ctx, Owner("m", "llm", "uid"), key, pvc,
                                              [CacheUser(u, u) for u in users], differences, logging.getLogger("t")))
    assert (done is not None) is replaced
    assert kube.deleted == (["Job", "PersistentVolumeClaim"] if replaced else [])
    if replaced:
        assert (done.state.phase, done.state.reason) == ("Pending", "ClaimReplaced")
    else:
        note = _claim_note(key, "llm", pvc, differences)
        assert f"kubectl -n llm delete pvc,job -l cxygpt.io/cache={key.claim}" in note
        assert ("a Bound claim keeps them" in note) is (pvc["status"]["phase"] == "Bound")
