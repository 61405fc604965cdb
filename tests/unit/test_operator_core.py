"""Operator pure core: GPU nodes from labels, spec checks, effective args and model facts, manifests (golden YAML),
status from the Deployment and its Pods, name ownership."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxygpt_operator.manifests import (
    CONFIG_HASH,
    EngineImages,
    Owner,
    build_deployment,
    build_network_policy,
    build_service,
)
from cxygpt_operator.nodes import NodeGpus, node_gpus
from cxygpt_operator.reconcile import status_patch
from cxygpt_operator.resolve import (
    Candidates,
    NameClaim,
    SpecError,
    engine_overrides,
    model_facts,
    name_owner,
    parse_spec,
    schedulable_replicas,
)
from cxygpt_operator.resolve import resolve as resolve_among
from cxygpt_operator.status import build_failed_status, build_status, failure_of
from cxygpt_profiles import GpuNode, NoFit, default_catalog, default_table

TABLE, CATALOG = default_table(), default_catalog()
IMAGES = EngineImages(vllm=TABLE.vllm.image, sim="cxygpt/cxygpt-sim:test")
GOLDEN = Path(__file__).parent / "golden"
OWNER = Owner(name="qwen3-14b", namespace="llm", uid="0000-uid", generation=3)
NOW = "2026-11-21T00:00:00Z"


def resolve(spec, gpus, table, catalog):
    """The decision among these GPUs, every one a candidate."""
    return resolve_among(spec, Candidates(tuple(gpus)), table, catalog)


def _node(name, labels, allocatable=None, ready="True", unschedulable=False, taints=()):
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"unschedulable": unschedulable, "taints": list(taints)},
            "status": {"allocatable": allocatable or {}, "conditions": [{"type": "Ready", "status": ready}]}}


def gpu_node(node):
    """The node's only kind of GPU, or None."""
    found = node_gpus(node)
    assert len(found) <= 1
    return found[0].gpus if found else None


GFD_H100 = {"nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "8", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


# --- nodes --------------------------------------------------------------------------------------------------

def test_gpu_node_from_gfd_labels_and_allocatable():
    node = gpu_node(_node("n1", GFD_H100, {"nvidia.com/gpu": "4"}))
    assert node == GpuNode(memory_mib=81559, count=4, name="n1", product="NVIDIA-H100-80GB-HBM3")


def test_gpu_count_falls_back_to_the_label_without_a_device_plugin():
    assert gpu_node(_node("kind", GFD_H100)).count == 8


def test_override_label_wins_and_serves_nodes_without_gfd():
    assert gpu_node(_node("n", {**GFD_H100, "cxygpt.io/gpu-memory-mib": "40000"})).memory_mib == 40000
    assert gpu_node(_node("n", {"cxygpt.io/gpu-memory-mib": "24576"})) == GpuNode(24576, 1, "n", "unknown")


@pytest.mark.parametrize("node", [
    _node("cpu", {}),
    _node("garbage", {"nvidia.com/gpu.memory": "lots"}),
    _node("zero", GFD_H100, {"nvidia.com/gpu": "0"}),
    _node("cordoned", GFD_H100, unschedulable=True),
    _node("down", GFD_H100, ready="False"),
    {"metadata": {"name": "bare"}},
])
def test_nodes_without_usable_gpus_are_ignored(node):
    assert gpu_node(node) is None


# --- spec ---------------------------------------------------------------------------------------------------

EXAMPLE = yaml.safe_load((Path(__file__).parents[2] / "examples/qwen3-14b.yaml").read_text())


def test_parse_spec_with_defaults():
    spec = parse_spec({"model": {"name": "m", "source": "hf://A/B"}})
    assert (spec.mode, spec.profile, spec.replicas, spec.engine_kind) == ("multi", "auto", 1, "vllm")
    assert spec.weight_formats == {"bf16"}


M = {"name": "m", "source": "hf://a/b"}


@pytest.mark.parametrize("raw, message", [
    ({}, "required"), ({"model": {"name": "m"}}, "required"),
    ({"model": M, "replicas": -2}, "from 0 to 64"), ({"model": M, "replicas": 65}, "from 0 to 64"),
    ({"model": M, "rollout": {"strategy": "Recreate"}}, "spec.rollout.strategy"),
    ({"model": {**M, "task": "classify"}}, "spec.model.task must be one of generate, embed"),
    ({"model": M, "engine": {"args": ["--port=1"]}}, "--port is set by the operator"),
    ({"model": M, "engine": {"args": ["--served_model_name", "x"]}}, "--served-model-name is set by the operator"),
    ({"model": M, "engine": {"args": ["--trust-remote-code"]}}, "spec.engine.trustRemoteCode: true"),
    ({"model": M, "engine": {"env": [{"name": "LD_PRELOAD", "value": "x"}]}}, "LD_PRELOAD changes the code"),
    ({"model": M, "engine": {"env": [{"name": "HF_HOME"}]}}, "HF_HOME is set by the operator"),
    ({"model": M, "engine": {"env": [{"name": "A-B"}]}}, "not a C identifier"),
    ({"model": M, "engine": {"env": [{"name": "A"}, {"name": "A"}]}}, "unique"),
])
def test_parse_spec_refuses_what_the_schema_would(raw, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_remote_code_is_emitted_only_when_asked():
    raw = {**EXAMPLE["spec"], "engine": {"trustRemoteCode": True}}
    spec = parse_spec(raw)
    args = build_deployment(OWNER, spec, resolve(spec, [H100], TABLE, CATALOG), TABLE, IMAGES)[
        "spec"]["template"]["spec"]["containers"][0]["args"]
    assert args.count("--trust-remote-code") == 1
    assert "--trust-remote-code" not in _manifests("srv80g-vllm")[0]["spec"]["template"]["spec"]["containers"][0]["args"]


def test_an_embedding_model_runs_the_pooling_runner():
    def args(model: dict) -> list[str]:
        spec = parse_spec({**EXAMPLE["spec"], "model": model})
        return build_deployment(OWNER, spec, resolve(spec, [H100], TABLE, CATALOG), TABLE, IMAGES)[
            "spec"]["template"]["spec"]["containers"][0]["args"]
    assert parse_spec(EXAMPLE["spec"]).task == "generate"
    embed = args({**EXAMPLE["spec"]["model"], "task": "embed"})
    assert embed[embed.index("--runner") + 1] == "pooling" and embed.count("--runner") == 1
    assert "--runner" not in args({**EXAMPLE["spec"]["model"], "task": "generate"})


def test_engine_overrides_read_every_spelling_and_skip_values_the_engine_refuses():
    assert engine_overrides(("--max-model-len", "8k", "--max_num_seqs=16", "--gpu-memory-utilization=0.8",
                             "--enable-prefix-caching")) == {
        "max_model_len": 8000, "max_num_seqs": 16, "gpu_memory_utilization": 0.8}
    assert engine_overrides(("--max-model-len=32K",)) == {"max_model_len": 32768}
    assert engine_overrides(("--max-num-seqs", "-5", "--gpu-memory-utilization", "2", "--max-model-len=0")) == {}
    assert engine_overrides(("--max-model-len", "4096", "--max-model-len", "nope")) == {}  # the last one wins


def test_fit_and_limits_use_the_effective_args():
    base = parse_spec(EXAMPLE["spec"])
    plain = resolve(base, [H100], TABLE, CATALOG)
    longer = resolve(parse_spec({**EXAMPLE["spec"], "engine": {"args": ["--max-model-len=32768", "--max-num-seqs", "8"]}}),
                     [H100], TABLE, CATALOG)
    assert longer.max_model_len == 32768 and longer.fit.message.endswith("at 32768 tokens")
    assert longer.limits.max_input_tokens == 32768 - longer.limits.max_output_tokens
    assert longer.limits.max_concurrency == 8 and plain.limits.max_concurrency == 64
    # less memory for the engine: the estimate says so
    tight = resolve(parse_spec({**EXAMPLE["spec"], "engine": {"args": ["--gpu-memory-utilization", "0.5"]}}),
                    [H100], TABLE, CATALOG)
    assert tight.fit.usable_mib < plain.fit.usable_mib
    with pytest.raises(NoFit, match="weights need"):
        resolve(parse_spec({**EXAMPLE["spec"], "profile": "SRV_80G", "engine": {"args": ["--gpu-memory-utilization=0.2"]}}),
                [H100], TABLE, CATALOG)


def test_model_facts_from_catalog_and_spec_overrides():
    spec = parse_spec(EXAMPLE["spec"])
    assert model_facts(spec, CATALOG) == CATALOG.lookup("Qwen/Qwen3-14B")
    spec = parse_spec({**EXAMPLE["spec"], "model": {**EXAMPLE["spec"]["model"], "facts": {"maxContext": 8192}}})
    assert model_facts(spec, CATALOG).max_context == 8192
    unknown = parse_spec({"model": {"name": "x", "source": "pvc://models/x"}})
    assert model_facts(unknown, CATALOG) is None
    custom = yaml.safe_load((Path(__file__).parents[2] / "examples/custom-model-pvc.yaml").read_text())
    assert model_facts(parse_spec(custom["spec"]), CATALOG).parameters == 7241732096


# --- manifests (golden) ----------------------------------------------------------------------------------------

H100 = GpuNode(81559, 1, "h100", "NVIDIA-H100-80GB-HBM3")
H100x2 = GpuNode(81559, 2, "h100x2", "NVIDIA-H100-80GB-HBM3")
H100x8 = GpuNode(81559, 8, "h100x8", "NVIDIA-H100-80GB-HBM3")
RTX = GpuNode(32607, 1, "ws", "NVIDIA-GeForce-RTX-5090")

CASES = {
    "srv80g-vllm": ({**EXAMPLE["spec"]}, [H100]),
    "dev32g-int4": ({**EXAMPLE["spec"]}, [RTX]),
    # 70B on a node of eight: the fewest that hold it, two (tensor parallel 2)
    "multi80g-tp2": ({"model": {"name": "llama-3.1-70b", "source": "hf://meta-llama/Llama-3.1-70B-Instruct"},
                      "replicas": 2}, [H100x8]),
    # every pod setting, over the operator's: joined node affinity, added tolerations, resources key by key
    "pod-settings": ({**EXAMPLE["spec"], "gpu": {"products": ["NVIDIA-H100-80GB-HBM3"], "productPolicy": "Require",
                                                  "minMemoryMiB": 80000},
                      "engine": {"nodeSelector": {"pool": "llm"},
                                 "affinity": {
                                     "nodeAffinity": {
                                         "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                                             {"matchExpressions": [{"key": "topology.kubernetes.io/zone",
                                                                    "operator": "In", "values": ["a", "b"]}]}]},
                                         "preferredDuringSchedulingIgnoredDuringExecution": [
                                             {"weight": 10, "preference": {"matchExpressions": [
                                                 {"key": "spot", "operator": "DoesNotExist"}]}}]},
                                     "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                                         {"weight": 100, "podAffinityTerm": {
                                             "topologyKey": "topology.kubernetes.io/zone",
                                             "labelSelector": {"matchLabels": {"app.kubernetes.io/instance":
                                                                               "qwen3-14b"}}}}]}},
                                 "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm",
                                                  "effect": "NoSchedule"}],
                                 "runtimeClassName": "nvidia", "priorityClassName": "llm-serving",
                                 "resources": {"requests": {"cpu": 8, "memory": "64Gi", "ephemeral-storage": "50Gi"},
                                               "limits": {"memory": "96Gi"}},
                                 "podLabels": {"team": "search", "cost-center": "1234"},
                                 "podAnnotations": {"sidecar.istio.io/inject": "false",
                                                    "prometheus.io/scrape": "false"}}}, [H100x2]),
    # a MIG slice (GPU Feature Discovery's mixed strategy): its own resource and labels
    "mig-slice": ({"model": {"name": "qwen3-0.6b", "source": "hf://Qwen/Qwen3-0.6B"},
                   "gpu": {"products": ["NVIDIA-A100-SXM4-80GB-MIG-3g.40gb"], "productPolicy": "Require"}},
                  [GpuNode(40192, 2, "a100-mig", "NVIDIA-A100-SXM4-80GB-MIG-3g.40gb", "nvidia.com/mig-3g.40gb", True)]),
    "single-sim-pvc": ({"model": {"name": "solo", "source": "pvc://models/qwen/Qwen3-14B"}, "mode": "single",
                        "engine": {"kind": "sim", "args": ["--max-model-len", "2048"], "env": [{"name": "B", "value": "2"}]},
                        "cacheClaim": "hf-cache"}, [RTX]),
    # LoRA adapters: the engine's LoRA limits and the runtime endpoints; a pvc:// adapter's claim mounted read-only
    "srv80g-adapters": ({**EXAMPLE["spec"], "adapters": [
        {"name": "qwen3-sql", "source": "hf://cxygpt-demo/qwen3-0.6b-sql-lora"},
        {"name": "qwen3-support", "source": "pvc://loras/support/v1"}], "lora": {"maxRank": 32}}, [H100]),
}


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def _manifests(case):
    raw, nodes = CASES[case]
    spec = parse_spec(raw)
    sel = resolve(spec, nodes, TABLE, CATALOG)
    return (build_deployment(OWNER, spec, sel, TABLE, IMAGES), build_service(OWNER, spec, sel, TABLE),
            build_network_policy(OWNER, spec, sel, TABLE, ("monitoring",)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_match_golden(case):
    text = yaml.dump_all(_manifests(case), Dumper=_NoAliases, sort_keys=True)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs (UPDATE_GOLDEN=1 to accept)"


def test_manifests_pass_kubernetes_validate_strict(tmp_path):
    files = []
    for case in CASES:
        path = tmp_path / f"{case}.yaml"
        path.write_text(yaml.safe_dump_all(_manifests(case)))
        files.append(str(path))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    out = subprocess.run([str(exe), "-k", "1.31.0", "--strict", *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(" passed for resource ") == 3 * len(CASES)


def test_engine_pods_are_hardened():
    for case in CASES:
        pod = _manifests(case)[0]["spec"]["template"]["spec"]
        ctx = pod["containers"][0]["securityContext"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["runAsNonRoot"] is True
        sim = pod["containers"][0]["command"][0] == "cxygpt-sim"
        # the simulator image has its own user; vLLM's runs as root unless given one
        assert ctx.get("readOnlyRootFilesystem", False) is sim and ("runAsUser" in ctx) is not sim


def test_rollout_strategy_drain_and_grace():
    dep = _manifests("srv80g-vllm")[0]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = dep["spec"]["template"]["spec"]
    # SRV_80G allows requests of 300 s: the drain waits that long, the grace period 30 s more
    assert pod["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 300}}
    assert pod["terminationGracePeriodSeconds"] == 330
    assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"
    raw, nodes = CASES["srv80g-vllm"]
    spec = parse_spec({**raw, "rollout": {"strategy": "InPlace"}})
    in_place = build_deployment(OWNER, spec, resolve(spec, nodes, TABLE, CATALOG), TABLE, IMAGES)
    assert in_place["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    solo = _manifests("single-sim-pvc")[0]["spec"]["template"]["spec"]  # SINGLE_32G: 600 s, the cap
    assert solo["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] == 600


def test_network_policy_admits_the_gateway_label_and_metrics_namespaces_only():
    dep, _, policy = _manifests("srv80g-vllm")
    assert policy["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"cxygpt.io/engine-access": "true"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"port": 8000, "protocol": "TCP"}]}]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    # with the gateway's namespace known, a pod elsewhere that labels itself does not get in
    raw, nodes = CASES["srv80g-vllm"]
    spec = parse_spec(raw)
    fenced = build_network_policy(OWNER, spec, resolve(spec, nodes, TABLE, CATALOG), TABLE, (), ("cxygpt", "cxygpt"))
    assert fenced["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "cxygpt"}},
         "podSelector": {"matchLabels": {"cxygpt.io/engine-access": "true"}}}]


def test_user_args_come_last_and_hash_follows_the_template():
    dep = _manifests("single-sim-pvc")[0]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--max-model-len", "2048"] and args[0] == "/models/weights/qwen/Qwen3-14B"
    first = _manifests("srv80g-vllm")[0]
    raw, nodes = CASES["srv80g-vllm"]
    scaled = build_deployment(OWNER, parse_spec({**raw, "replicas": 3}), resolve(parse_spec(raw), nodes, TABLE, CATALOG),
                              TABLE, IMAGES)
    # scaling does not roll pods: the template (and its hash) stay the same
    assert scaled["metadata"]["annotations"][CONFIG_HASH] == first["metadata"]["annotations"][CONFIG_HASH]
    assert scaled["spec"]["replicas"] == 3


# --- status -----------------------------------------------------------------------------------------------------

def _status(outcome, deployment=None, previous=None, spec=None, now=NOW, **kw):
    spec = spec or parse_spec(EXAMPLE["spec"])
    return build_status(OWNER, spec, outcome, table=TABLE, deployment=deployment, image="img", args=["a"],
                        previous=previous or {}, now=now, **kw)


def _cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_status_starting_then_ready():
    sel = resolve(parse_spec(EXAMPLE["spec"]), [H100], TABLE, CATALOG)
    starting = _status(sel, deployment={"status": {"replicas": 1}})
    assert starting["phase"] == "Starting" and starting["ready"] == "0/1"
    assert starting["profile"] == "SRV_80G" and starting["observedGeneration"] == 3
    assert starting["limits"]["maxInputTokens"] == 16128 and starting["fit"]["fits"] is True
    assert starting["endpoint"] == "http://qwen3-14b.llm.svc:8000"
    assert _cond(starting, "Available")["status"] == "False"
    ready = _status(sel, deployment={"status": {"replicas": 1, "readyReplicas": 1}}, previous=starting, now="later")
    assert ready["phase"] == "Ready" and ready["ready"] == "1/1"
    assert _cond(ready, "Available") | {"lastTransitionTime": None} == {
        "type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
        "message": "1/1 engine replicas ready", "observedGeneration": 3, "lastTransitionTime": None}
    assert _cond(ready, "Available")["lastTransitionTime"] == "later"
    assert _cond(ready, "ProfileSelected")["lastTransitionTime"] == NOW  # unchanged status keeps its time
    assert _status(sel, deployment={"status": {"replicas": 1, "readyReplicas": 1}}, previous=ready, now="x") == ready


def test_status_carries_the_engines_predicted_speed_on_a_known_gpu():
    sel = resolve(parse_spec(EXAMPLE["spec"]), [H100], TABLE, CATALOG)
    predicted = _status(sel, deployment={"status": {"replicas": 1}})["predicted"]
    assert predicted == sel.prediction.as_status() and predicted["gpu"] == "h100-80g"
    assert predicted["source"] == "silicon" and predicted["promptTokens"] == 16128 and predicted["outputTokens"] == 256
    assert predicted["tpotMs"] >= 8.4 and 0 < predicted["ttftMs"] <= TABLE.get("SRV_80G").limits.degrade.p95_ttft_ms
    unknown = gpu_node(_node("n", {"nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "1"}))
    assert "predicted" not in _status(resolve(parse_spec(EXAMPLE["spec"]), [unknown], TABLE, CATALOG))


def test_status_pending_and_failed():
    pending = _status(NoFit("NoMatchingGPU", "no node", permanent=False))
    assert pending["phase"] == "Pending"
    assert _cond(pending, "ProfileSelected") | {"lastTransitionTime": 0} == {
        "type": "ProfileSelected", "status": "False", "reason": "NoMatchingGPU", "message": "no node",
        "observedGeneration": 3, "lastTransitionTime": 0}
    failed = _status(NoFit("InsufficientGPUMemory", "too big", permanent=True))
    assert failed["phase"] == "Failed" and _cond(failed, "Degraded")["status"] == "True"


def test_status_degraded_when_the_deployment_fails():
    sel = resolve(parse_spec(EXAMPLE["spec"]), [H100], TABLE, CATALOG)
    dep = {"status": {"replicas": 1, "conditions": [{"type": "Progressing", "status": "False",
                                                     "reason": "ProgressDeadlineExceeded", "message": "stuck"}]}}
    assert _cond(_status(sel, deployment=dep), "Degraded") | {"lastTransitionTime": 0} == {
        "type": "Degraded", "status": "True", "reason": "EngineFailure", "message": "stuck",
        "observedGeneration": 3, "lastTransitionTime": 0}


def test_status_patch_removes_keys_that_are_gone():
    assert status_patch({"fit": {"x": 1}, "phase": "Ready"}, {"phase": "Pending"}) == {"fit": None, "phase": "Pending"}


def test_failed_status_keeps_the_rest_and_transition_times():
    first = build_failed_status(OWNER, {"profile": "SRV_80G", "conditions": []}, "ResourceConflict", "taken", now=NOW)
    assert first["phase"] == "Failed" and first["profile"] == "SRV_80G"
    assert [(c["type"], c["status"], c["reason"]) for c in first["conditions"]] == [
        ("ProfileSelected", "False", "ResourceConflict"), ("Available", "False", "ResourceConflict"),
        ("Progressing", "False", "ResourceConflict"), ("Degraded", "True", "ResourceConflict")]
    again = build_failed_status(OWNER, first, "ResourceConflict", "taken", now="later")
    assert again == first


# --- status from the Deployment and its Pods ---------------------------------------------------------------------

def _pod(name, *, ready=False, hash_="h1", crash=None, waiting=None, terminating=False, created="2026-11-21T00:00:00Z"):
    engine = {"name": "engine", "ready": ready, "restartCount": 3 if crash else 0, "state": {"running": {}}}
    if crash:
        engine["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}}
        engine["lastState"] = {"terminated": {"exitCode": crash, "reason": "Error",
                                              "message": "loading\nValueError: max_num_seqs must be positive\n\n"}}
    if waiting:
        engine["state"] = {"waiting": {"reason": waiting, "message": "pull access denied"}}
    meta = {"name": name, "labels": {"pod-template-hash": hash_}, "creationTimestamp": created}
    if terminating:
        meta["deletionTimestamp"] = "2026-11-21T00:01:00Z"
    return {"metadata": meta, "status": {"phase": "Running",
                                         "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                                         "containerStatuses": [engine]}}


def _sel(spec):
    return resolve(spec, [H100], TABLE, CATALOG)


def _spec(**over):
    return parse_spec({**EXAMPLE["spec"], **over})


def _summary(status):
    return status["phase"], {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


DEP = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}


def test_crash_loop_with_no_replica_ready_is_failed_with_exit_code_and_last_line():
    spec = _spec(replicas=2)
    status = _status(_sel(spec), deployment=DEP, spec=spec, pods=[_pod("a", crash=1), _pod("b")])
    phase, conds = _summary(status)
    assert phase == "Failed" and conds["Degraded"] == ("True", "EngineCrashLoop")
    assert conds["Available"] == ("False", "EngineCrashLoop")
    assert _cond(status, "Degraded")["message"] == ("pod a: engine exited with code 1 (Error), 3 restarts; "
                                                    "last log line: ValueError: max_num_seqs must be positive")


def test_an_engine_pod_the_scheduler_cannot_place_keeps_the_model_pending_with_the_schedulers_reason():
    spec = _spec(replicas=2)
    why = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available"
    unplaced = _pod("b", created="2026-11-21T00:00:05Z")
    unplaced["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                              "reason": "Unschedulable", "message": why}]}
    status = _status(_sel(spec), deployment=DEP, spec=spec, pods=[_pod("a"), unplaced])
    phase, conds = _summary(status)
    assert phase == "Pending" and conds["Available"] == ("False", "Unschedulable")
    assert conds["Progressing"] == ("True", "Unschedulable") and conds["Degraded"] == ("False", "AsExpected")
    assert _cond(status, "Available")["message"].endswith(f"pod b: {why}")
    # one replica served meanwhile: partially ready, and the other's reason still shows
    phase, conds = _summary(_status(_sel(spec), deployment=DEP, spec=spec, pods=[_pod("a", ready=True), unplaced]))
    assert phase == "PartiallyReady" and conds["Progressing"] == ("True", "Unschedulable")


def test_crash_with_a_replica_ready_is_partially_ready_and_degraded():
    spec = _spec(replicas=2)
    phase, conds = _summary(_status(_sel(spec), deployment=DEP, spec=spec, pods=[_pod("a", ready=True), _pod("b", crash=137)]))
    assert phase == "PartiallyReady" and conds["Available"] == ("True", "MinimumReplicasAvailable")
    assert conds["Degraded"] == ("True", "EngineCrashLoop") and conds["Progressing"] == ("True", "ScalingUp")


def test_an_image_that_cannot_be_pulled_is_not_loading():
    phase, conds = _summary(_status(_sel(_spec()), deployment=DEP, pods=[_pod("a", waiting="ImagePullBackOff")]))
    assert phase == "Failed" and conds["Degraded"] == ("True", "EngineCannotStart")


@pytest.mark.parametrize("pods, replicas, expected", [
    ([_pod("a")], 1, ("Starting", ("True", "EnginesStarting"))),
    ([_pod("a", ready=True)], 2, ("PartiallyReady", ("True", "ScalingUp"))),
    ([_pod("a", ready=True), _pod("b", ready=True, hash_="h2")], 2, ("PartiallyReady", ("True", "RollingUpdate"))),
    ([_pod("a", ready=True), _pod("b", ready=True, hash_="h0", terminating=True)], 1, ("PartiallyReady", ("True", "RollingUpdate"))),
    ([_pod("a", ready=True), _pod("b", ready=True, terminating=True)], 1, ("Ready", ("False", "RolloutComplete"))),
    ([_pod("a", ready=True), _pod("b", ready=True)], 2, ("Ready", ("False", "RolloutComplete"))),
    ([_pod("a", ready=True), _pod("b", ready=True), _pod("c", ready=True)], 2, ("PartiallyReady", ("True", "ScalingDown"))),
    ([], 0, ("ScaledToZero", ("False", "ScaledToZero"))),
])
def test_phase_and_progress_from_the_pods(pods, replicas, expected):
    spec = _spec(replicas=replicas)
    phase, conds = _summary(_status(_sel(spec), deployment=DEP, spec=spec, pods=pods))
    assert (phase, conds["Progressing"]) == expected
    assert conds["Degraded"] == ("False", "AsExpected")
    assert conds["Available"][0] == ("True" if any(p["status"]["conditions"][0]["status"] == "True" for p in pods) else "False")


def test_a_deployment_the_generation_has_not_reached_is_rolling():
    dep = {"metadata": {"generation": 2}, "status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1}}
    assert _summary(_status(_sel(_spec()), deployment=dep))[0] == "PartiallyReady"


def test_a_rejected_deployment_is_failed_with_the_servers_message():
    status = _status(_sel(_spec()), deployment=None, rejected='Deployment.apps "x" is invalid: spec.template: bad')
    phase, conds = _summary(status)
    assert phase == "Failed" and conds["Degraded"] == ("True", "DeploymentRejected")
    assert "is invalid: spec.template: bad" in _cond(status, "Degraded")["message"]
    assert status["limits"]["maxInputTokens"] == 16128  # limits as soon as a profile is selected
    # the engines of the previous spec still serve: Available says so, the phase says the new spec failed
    serving = _status(_sel(_spec()), deployment={"status": {"replicas": 1, "readyReplicas": 1}}, rejected="bad")
    assert _summary(serving)[0] == "Failed" and _summary(serving)[1]["Available"][0] == "True"


def test_requested_gpus_beyond_the_fitting_nodes_are_a_warning():
    spec = _spec(replicas=3)
    sel = _sel(spec)
    assert schedulable_replicas(sel, [H100, H100x2, RTX]) == 3  # 1 + 2 replicas of one 80 GB GPU; the 32 GB one does not fit
    status = _status(sel, deployment=DEP, spec=spec, pods=[_pod("a", ready=True)], schedulable=1)
    assert "spec.replicas 3 x 1 GPU(s) = 3 GPUs requested; the schedulable nodes that fit SRV_80G hold 1 replica(s)" \
        in _cond(status, "ProfileSelected")["message"]
    assert _cond(status, "Degraded")["reason"] == "InsufficientGPUs" and "warning" in _cond(status, "Progressing")["message"]
    assert "warning" not in _cond(_status(sel, deployment=DEP, spec=spec, schedulable=3), "ProfileSelected")["message"]


def test_a_failure_is_read_from_degraded_with_a_failure_reason_only():
    sel = _sel(_spec())
    crashing = _status(sel, deployment=DEP, pods=[_pod("a", crash=1)])
    assert failure_of(crashing) == ("EngineCrashLoop", _cond(crashing, "Degraded")["message"])
    assert failure_of(_status(sel, deployment=DEP, pods=[_pod("a", ready=True)])) is None
    assert failure_of({}) is None


def test_the_oldest_claim_owns_a_name_then_the_smallest_uid():
    a = NameClaim("2026-11-21T00:00:05Z", "b-uid", "team-b", "chat")
    b = NameClaim("2026-11-21T00:00:01Z", "z-uid", "team-z", "chat")
    c = NameClaim("2026-11-21T00:00:01Z", "a-uid", "team-a", "chat")
    assert name_owner([a, b, c]) == c and name_owner([a, b]) == b and name_owner([]) is None
    assert c.ref == "team-a/chat"


# --- reconcile against a Kube that rejects the Deployment (the in-memory API validates no built-in kinds) ----------

class _RejectingKube:
    def __init__(self):
        self.statuses, self.applied = [], []

    def get_deployment(self, namespace, name):
        return None

    get_service = get_network_policy = get_deployment

    def list_pods(self, namespace, selector):
        return []

    def apply_deployment(self, body):
        from kubernetes.client.rest import ApiException
        error = ApiException(status=422, reason="Unprocessable Entity")
        error.body = '{"kind": "Status", "message": "Deployment.apps \\"qwen3-14b\\" is invalid: spec.template.spec.containers[0].lifecycle.preStop.sleep: Forbidden: feature gate PodLifecycleSleepAction is off"}'
        raise error

    def apply_service(self, body):
        self.applied.append(body["kind"])
        return body

    apply_network_policy = apply_service

    def patch_status(self, namespace, name, patch):
        self.statuses.append(patch)


def test_a_rejected_deployment_fails_with_the_api_servers_message():
    import asyncio
    import logging

    from cxygpt_operator.reconcile import CannotRun, Context, reconcile
    kube = _RejectingKube()
    body = {"metadata": {"name": OWNER.name, "namespace": OWNER.namespace, "uid": OWNER.uid, "generation": 1},
            "spec": EXAMPLE["spec"]}
    ctx = Context(table=TABLE, catalog=CATALOG, kube=kube, images=IMAGES)
    with pytest.raises(CannotRun) as failed:
        asyncio.run(reconcile(body, [NodeGpus(H100)], ctx, logging.getLogger("test")))
    status = failed.value.status
    assert status["phase"] == "Failed" and failed.value.retry == 300
    assert _cond(status, "Degraded")["reason"] == "DeploymentRejected"
    assert "feature gate PodLifecycleSleepAction is off" in _cond(status, "Degraded")["message"]
    assert kube.statuses == [status] and kube.applied == ["Service", "NetworkPolicy"]


class _AcceptingKube(_RejectingKube):
    def apply_deployment(self, body):
        self.applied.append(body["kind"])
        return body


def test_a_wake_up_before_the_event_of_our_own_status_write_writes_nothing_again(monkeypatch):
    """The daemon decides on the status it last wrote, not on a body whose watch event has not come yet: deciding
    on the older one moved every condition's lastTransitionTime and wrote the status again (seen in CI)."""
    import asyncio
    from types import SimpleNamespace

    from cxygpt_operator import handlers
    from cxygpt_operator import reconcile as reconcile_module
    from cxygpt_operator.reconcile import Context
    kube, clock, runs = _AcceptingKube(), ["2026-12-01T10:00:00Z"], []
    monkeypatch.setattr(reconcile_module, "_now", lambda: clock[0])
    real = handlers.reconcile

    async def counted(*args, **kwargs):
        try:
            return await real(*args, **kwargs)
        finally:
            runs.append(clock[0])
    monkeypatch.setattr(handlers, "reconcile", counted)

    class Stopped:
        def __init__(self):
            self.event = asyncio.Event()

        def __bool__(self):
            return self.event.is_set()

        async def wait(self):
            await self.event.wait()

    async def scenario():
        shared = handlers.Shared()
        memo = SimpleNamespace(context=Context(table=TABLE, catalog=CATALOG, kube=kube, images=IMAGES), shared=shared)
        # the live body never shows our write: its watch event is late
        body = {"metadata": {"name": OWNER.name, "namespace": OWNER.namespace, "uid": OWNER.uid, "generation": 1,
                             "creationTimestamp": "2026-12-01T09:59:59Z"}, "spec": EXAMPLE["spec"]}
        stopped = Stopped()
        daemon = asyncio.create_task(handlers.keep_reconciled(
            stopped, namespace=OWNER.namespace, name=OWNER.name, body=body, memo=memo,
            gpu_nodes={"node": [(NodeGpus(H100),)]}, model_names={}))
        for woken in range(3):
            while len(runs) <= woken:
                await asyncio.sleep(0.01)
            clock[0] = f"2026-12-01T10:00:0{woken + 5}Z"            # a later second
            shared.wake((OWNER.namespace, OWNER.name))                # e.g. another model took the same name
        while len(runs) < 4:
            await asyncio.sleep(0.01)
        stopped.event.set()
        await asyncio.wait_for(daemon, 5)
    asyncio.run(scenario())
    assert len(kube.statuses) == 1, kube.statuses                   # written once, its times kept
    assert {c["lastTransitionTime"] for c in kube.statuses[0]["conditions"]} == {"2026-12-01T10:00:00Z"}


def test_the_status_decided_on_is_the_one_written_but_the_autoscalers_part_stays_the_bodys():
    from cxygpt_operator.reconcile import as_written
    body = {"metadata": {"name": "m"}, "status": {"phase": "Pending", "gone": 1, "autoscaling": {"desiredReplicas": 3}}}
    assert as_written(body, None) is body
    assert as_written(body, {"phase": "Starting"}) == {
        "metadata": {"name": "m"}, "status": {"autoscaling": {"desiredReplicas": 3}, "phase": "Starting"}}
    assert as_written({"metadata": {}}, {"phase": "Starting"})["status"] == {"phase": "Starting"}


def test_a_name_is_claimed_once_and_a_rename_makes_a_new_claim():
    from cxygpt_operator.resolve import UNCONFIRMED, claimed_since, name_claim
    created = {"metadata": {"creationTimestamp": "2026-12-01T10:00:00Z", "generation": 1},
               "spec": {"model": {"name": "a"}}}
    assert claimed_since(created) == "2026-12-01T10:00:00Z"  # never changed: since its creation
    assert name_claim(created, "2026-12-01T12:00:00Z") == {"name": "a", "since": "2026-12-01T10:00:00Z"}
    confirmed = {**created, "metadata": {**created["metadata"], "generation": 5},
                 "status": {"nameClaim": {"name": "a", "since": "2026-12-01T10:00:00Z"}}}
    assert claimed_since(confirmed) == "2026-12-01T10:00:00Z"  # other spec changes keep the claim
    renamed = {**confirmed, "spec": {"model": {"name": "b"}}}
    assert claimed_since(renamed) == UNCONFIRMED  # loses to every confirmed claim on "b"
    assert name_claim(renamed, "2026-12-01T12:00:00Z") == {"name": "b", "since": "2026-12-01T12:00:00Z"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_model_still_loading_is_never_a_stalled_rollout(case):
    dep = _manifests(case)[0]
    probe = dep["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert dep["spec"]["progressDeadlineSeconds"] > probe["periodSeconds"] * probe["failureThreshold"]


def test_parse_spec_reads_autoscaling_when_on():
    base = {"model": {"name": "m", "source": "hf://Org/Model"}}
    assert parse_spec(base).autoscaling is None
    assert parse_spec({**base, "autoscaling": {"enabled": False, "maxReplicas": 3}}).autoscaling is None
    scaling = parse_spec({**base, "autoscaling": {"minReplicas": 0, "maxReplicas": 3}}).autoscaling
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target, scaling.scale_down_delay_s) == (0, 3, None, 300)
    assert scaling.policy(default_target=64).target == 64
    for bad, message in [({"maxReplicas": 2, "minReplicas": 3}, "minReplicas must be <="),
                         ({"minReplicas": 0}, "maxReplicas is required"),
                         ({"maxReplicas": 100}, "maxReplicas must be an integer from 1 to 64")]:
        with pytest.raises(SpecError, match=message):
            parse_spec({**base, "autoscaling": bad})


def test_a_model_scaled_to_zero_by_the_autoscaler_says_so():
    spec = parse_spec({"model": {"name": "qwen3-14b", "source": "hf://Qwen/Qwen3-14B"}, "replicas": 0,
                       "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "scaleDownDelaySeconds": 120}})
    sel = resolve(spec, [GpuNode(81559, 1, "h100", "NVIDIA-H100-80GB-HBM3")], TABLE, CATALOG)
    status = build_status(OWNER, spec, sel, table=TABLE, deployment=None, image="i", args=[], previous={}, now=NOW)
    available = next(c for c in status["conditions"] if c["type"] == "Available")
    assert status["phase"] == "ScaledToZero" and available["reason"] == "ScaledToZero"
    assert "autoscaler after 120 s without requests" in available["message"]


def test_a_node_that_stops_taking_pods_leaves_the_gpu_index():
    """kopf keeps an object's old index entry when the indexer returns None: a cordoned node must index as empty."""
    from cxygpt_operator.handlers import gpu_nodes
    labels = {"nvidia.com/gpu.memory": "81559", "nvidia.com/gpu.count": "1"}
    node = {"metadata": {"name": "n", "labels": labels}, "spec": {}, "status": {"allocatable": {"nvidia.com/gpu": "1"}}}
    assert list(gpu_nodes(body=node, name="n")) == ["n"]
    assert gpu_nodes(body={**node, "spec": {"unschedulable": True}}, name="n") == {}
