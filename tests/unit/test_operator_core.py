"""Operator pure core: GPU nodes from labels, spec parsing and model facts, manifests (golden YAML), status."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxygpt_operator.build import (CONFIG_HASH, EngineImages, Owner, build_deployment, build_service,
                                   build_status)
from cxygpt_operator.nodes import gpu_node
from cxygpt_operator.reconcile import status_patch
from cxygpt_operator.resolve import SpecError, model_facts, parse_spec, resolve
from cxygpt_profiles import GpuNode, NoFit, default_catalog, default_table

TABLE, CATALOG = default_table(), default_catalog()
IMAGES = EngineImages(vllm=TABLE.vllm.image, sim="cxygpt/cxygpt-sim:test")
GOLDEN = Path(__file__).parent / "golden"
OWNER = Owner(name="qwen3-14b", namespace="llm", uid="0000-uid", generation=3)
NOW = "2026-11-21T00:00:00Z"


def _node(name, labels, allocatable=None, ready="True", unschedulable=False):
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"unschedulable": unschedulable},
            "status": {"allocatable": allocatable or {}, "conditions": [{"type": "Ready", "status": ready}]}}


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


@pytest.mark.parametrize("raw", [{}, {"model": {"name": "m"}}, {"model": {"name": "m", "source": "hf://a/b"}, "replicas": -2}])
def test_parse_spec_refuses_what_the_schema_would(raw):
    with pytest.raises(SpecError):
        parse_spec(raw)


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
RTX = GpuNode(32607, 1, "ws", "NVIDIA-GeForce-RTX-5090")

CASES = {
    "srv80g-vllm": ({**EXAMPLE["spec"]}, [H100]),
    "dev32g-int4": ({**EXAMPLE["spec"]}, [RTX]),
    "multi80g-tp2": ({**EXAMPLE["spec"], "replicas": 2}, [H100x2]),
    "single-sim-pvc": ({"model": {"name": "solo", "source": "pvc://models/qwen/Qwen3-14B"}, "mode": "single",
                        "engine": {"kind": "sim", "args": ["--max-model-len", "2048"], "env": [{"name": "B", "value": "2"}]},
                        "cacheClaim": "hf-cache"}, [RTX]),
}


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def _manifests(case):
    raw, nodes = CASES[case]
    spec = parse_spec(raw)
    sel = resolve(spec, nodes, TABLE, CATALOG)
    return build_deployment(OWNER, spec, sel, TABLE, IMAGES), build_service(OWNER, spec, sel, TABLE)


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
    assert out.stdout.count(" passed for resource ") == 2 * len(CASES)


def test_engine_pods_are_hardened():
    for case in CASES:
        pod = _manifests(case)[0]["spec"]["template"]["spec"]
        ctx = pod["containers"][0]["securityContext"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}
        sim = pod["containers"][0]["command"][0] == "cxygpt-sim"
        assert ctx.get("runAsNonRoot", False) is sim and ctx.get("readOnlyRootFilesystem", False) is sim


def test_user_args_come_last_and_hash_follows_the_template():
    dep, _ = _manifests("single-sim-pvc")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--max-model-len", "2048"] and args[0] == "/models/weights/qwen/Qwen3-14B"
    first, _ = _manifests("srv80g-vllm")
    raw, nodes = CASES["srv80g-vllm"]
    scaled = build_deployment(OWNER, parse_spec({**raw, "replicas": 3}), resolve(parse_spec(raw), nodes, TABLE, CATALOG),
                              TABLE, IMAGES)
    # scaling does not roll pods: the template (and its hash) stay the same
    assert scaled["metadata"]["annotations"][CONFIG_HASH] == first["metadata"]["annotations"][CONFIG_HASH]
    assert scaled["spec"]["replicas"] == 3


# --- status -----------------------------------------------------------------------------------------------------

def _status(outcome, deployment=None, previous=None, spec=None, now=NOW):
    spec = spec or parse_spec(EXAMPLE["spec"])
    return build_status(OWNER, spec, outcome, table=TABLE, deployment=deployment, image="img", args=["a"],
                        previous=previous or {}, now=now)


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
    from cxygpt_operator.build import build_failed_status
    first = build_failed_status(OWNER, {"profile": "SRV_80G", "conditions": []}, "ResourceConflict", "taken", now=NOW)
    assert first["phase"] == "Failed" and first["profile"] == "SRV_80G"
    assert [(c["type"], c["status"]) for c in first["conditions"]] == [("ProfileSelected", "False"), ("Degraded", "True")]
    again = build_failed_status(OWNER, first, "ResourceConflict", "taken", now="later")
    assert again == first
