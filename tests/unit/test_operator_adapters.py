"""LoRA adapters in the operator's pure core: spec.adapters parsed, the engine's LoRA arguments (the same whatever the
adapters), the fit estimate's adapter slots (as the simulator counts them), and the load/unload plan with
status.adapters."""
import datetime
from pathlib import Path

import pytest
import yaml

from cxygpt_operator.adapter_sync import adapter_claims, conflicts
from cxygpt_operator.adapters import (
    FAILED_RETRY_S,
    Adapter,
    Engine,
    Failure,
    blocked_adapters,
    gate_condition,
    parse_adapters,
    plan,
)
from cxygpt_operator.engines import adapters_of, base_url, slice_urls
from cxygpt_operator.manifests import CONFIG_HASH, EngineImages, Owner, build_deployment
from cxygpt_operator.resolve import Candidates, NameClaim, SpecError, lora_slots, parse_spec, resolve
from cxygpt_profiles import GpuNode, default_catalog, default_table
from cxygpt_profiles.fit import estimate_fit, lora_slot_bytes
from cxygpt_sim.config import base_layers, kv_budget

TABLE, CATALOG = default_table(), default_catalog()
IMAGES = EngineImages(vllm=TABLE.vllm.image, sim="cxygpt/cxygpt-sim:test")
OWNER = Owner(name="qwen3", namespace="llm", uid="uid-1")
H100 = GpuNode(81559, 1, "h100", "NVIDIA-H100-80GB-HBM3")
SQL = {"name": "qwen3-sql", "source": "hf://cxygpt-demo/qwen3-0.6b-sql-lora"}
SUPPORT = {"name": "qwen3-support", "source": "hf://cxygpt-demo/qwen3-0.6b-support-lora"}


def spec(**extra):
    return {"model": {"name": "qwen3-0.6b", "source": "hf://Qwen/Qwen3-0.6B"}, "engine": {"kind": "sim"}, **extra}


# --- parse ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapters, why", [
    ([SQL, {**SUPPORT, "name": "qwen3-sql"}], "names must be unique"),
    ([{**SQL, "name": "qwen3-0.6b"}], "is the base's served name"),
    ([{**SQL, "name": "-sql"}], "must be a served model name"),
    ([{**SQL, "name": "x" * 129}], "must be a served model name"),
    ([{"name": f"a{i}", "source": SQL["source"]} for i in range(17)], "at most 16"),
    ([{"name": "a"}], "needs a name and a source"),
    ([{**SQL, "source": "s3://bucket/sql"}], "spec.adapters[0].source must be hf://"),
    ([{**SQL, "source": "pvc://loras/../etc"}], "must not contain '..'"),
])
def test_a_bad_adapters_list_is_refused_with_the_reason(adapters, why):
    with pytest.raises(SpecError, match=why.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(spec(adapters=adapters))


@pytest.mark.parametrize("raw, why", [({"maxRank": 24}, "spec.lora.maxRank must be one of"),
                                      ({"maxLoras": 0}, "spec.lora.maxLoras must be an integer from 1 to 16"),
                                      ({"maxLoras": 17}, "spec.lora.maxLoras")])
def test_bad_lora_limits_are_refused(raw, why):
    with pytest.raises(SpecError, match=why):
        parse_spec(spec(adapters=[SQL], lora=raw))


@pytest.mark.parametrize("arg", ["--max-loras=8", "--max_lora_rank", "--enable-lora", "--lora-modules", "--max-cpu"])
def test_the_lora_flags_are_the_operators_with_adapters(arg):
    with pytest.raises(SpecError, match="derived from spec.adapters"):
        parse_spec(spec(adapters=[SQL], engine={"kind": "sim", "args": [arg]}))
    parse_spec(spec(engine={"kind": "sim", "args": [arg]}))  # without adapters they are the user's


def test_the_runtime_lora_variable_is_the_operators():
    with pytest.raises(SpecError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING is set by the operator"):
        parse_spec(spec(engine={"kind": "sim", "env": [{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "0"}]}))


def test_where_the_engine_loads_an_adapter_from():
    assert Adapter("a", "hf://org/a").path == "org/a"
    assert Adapter("a", "hf://org/a@main").path == "org/a"
    assert Adapter("a", "hf://org/a@v2").path is None  # vLLM downloads the default branch only
    assert Adapter("a", "pvc://loras/sql/v1").path == "/models/adapters/loras/sql/v1"
    assert Adapter("a", "pvc://loras/sql/v1").claim == "loras"
    assert parse_adapters(None, "base") == ()


# --- engine arguments -----------------------------------------------------------------------------------------

def _deployment(raw):
    parsed = parse_spec(raw)
    return build_deployment(OWNER, parsed, resolve(parsed, Candidates((H100,)), TABLE, CATALOG), TABLE, IMAGES)


def _engine(deployment):
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_adapters_enable_lora_with_the_tables_limits_and_the_runtime_endpoints():
    container = _engine(_deployment(spec(adapters=[SQL])))
    args = container["args"]
    lora = TABLE.lora
    assert args[args.index("--enable-lora"):args.index("--enable-lora") + 7] == [
        "--enable-lora", "--max-loras", str(lora.max_loras), "--max-lora-rank", str(lora.max_lora_rank),
        "--max-cpu-loras", str(lora.max_cpu_loras)]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in container["env"]
    assert not any(a.startswith("--lora-modules") for a in args)
    plain = _engine(_deployment(spec()))
    assert "--enable-lora" not in plain["args"]
    assert all(e["name"] != "VLLM_ALLOW_RUNTIME_LORA_UPDATING" for e in plain["env"])


def test_spec_lora_overrides_the_table():
    args = _engine(_deployment(spec(adapters=[SQL], lora={"maxRank": 64, "maxLoras": 2})))["args"]
    assert args[args.index("--max-loras") + 1] == "2" and args[args.index("--max-lora-rank") + 1] == "64"


def test_adding_or_removing_an_adapter_keeps_the_pod_template():
    """The engines' arguments depend on the adapters' presence and spec.lora, never on their names or number: a
    change of the list is loaded at runtime, with no restart."""
    one = _deployment(spec(adapters=[SQL]))
    three = _deployment(spec(adapters=[SUPPORT, {"name": "x", "source": "hf://o/x"}, SQL]))
    assert one["spec"]["template"] == three["spec"]["template"]
    assert one["metadata"]["annotations"][CONFIG_HASH] == three["metadata"]["annotations"][CONFIG_HASH]
    assert _deployment(spec())["metadata"]["annotations"][CONFIG_HASH] != one["metadata"]["annotations"][CONFIG_HASH]


def test_a_pvc_adapters_claim_is_mounted_read_only():
    pod = _deployment(spec(adapters=[{"name": "a", "source": "pvc://loras/a"}, {"name": "b", "source": "pvc://loras/b"}]
                           ))["spec"]["template"]["spec"]
    claims = [v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "loras"]
    assert len(claims) == 1 and claims[0]["persistentVolumeClaim"]["readOnly"] is True
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == claims[0]["name"]]
    assert mount == {"name": claims[0]["name"], "mountPath": "/models/adapters/loras", "readOnly": True}


# --- the fit estimate counts the adapter slots, as the simulator does -----------------------------------------------

@pytest.mark.parametrize("repo", ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-14B", "meta-llama/Llama-3.1-70B-Instruct"])
@pytest.mark.parametrize("tp", [1, 2])
def test_a_slots_memory_is_the_simulators(repo, tp):
    entry = CATALOG.models[repo]
    facts = CATALOG.lookup(repo)
    assert lora_slot_bytes(facts, 16, tp) == base_layers(entry).slot_bytes(16, tp)


def test_the_kv_cache_left_is_the_simulators():
    """The same engine on the same GPU: the operator's estimate and the simulator's KV budget agree to the token."""
    parsed = parse_spec(spec(adapters=[SQL], lora={"maxRank": 64}))
    sel = resolve(parsed, Candidates((H100,)), TABLE, CATALOG)
    max_loras, rank, _ = lora_slots(parsed, TABLE)
    engine = sel.profile.engine
    sim = kv_budget(model="Qwen/Qwen3-0.6B", served_name="qwen3-0.6b", max_model_len=sel.max_model_len,
                    dtype=engine.dtype, quantization=None, kv_cache_dtype=engine.kv_cache_dtype,
                    gpu_memory_utilization=engine.gpu_memory_utilization, gpu_count=sel.gpu_count,
                    gpu_memory_mib=H100.memory_mib, max_num_seqs=engine.max_num_seqs, block_size=16,
                    num_gpu_blocks_override=None, lora_slots=(max_loras, rank, sel.gpu_count))
    assert sel.fit.kv_token_capacity == sim.tokens
    plain = resolve(parse_spec(spec()), Candidates((H100,)), TABLE, CATALOG)
    slots = max_loras * lora_slot_bytes(CATALOG.lookup("Qwen/Qwen3-0.6B"), 64, 1)
    assert plain.fit.kv_token_capacity - sel.fit.kv_token_capacity == -(-slots // sel.fit.kv_bytes_per_token)
    assert sel.fit.lora_mib == -(-slots // 2**20) and "LoRA slots of rank 64" in sel.fit.message
    assert sel.fit.as_status()["loraMiB"] == sel.fit.lora_mib


def test_slots_that_leave_no_kv_cache_do_not_fit():
    facts = CATALOG.lookup("Qwen/Qwen3-14B")
    args = dict(weights="bf16", kv_cache_dtype="fp8", max_model_len=16384, gpu_memory_utilization=0.92,
                gpu_memory_mib=40000, gpu_count=1, consts=TABLE.fit)
    assert estimate_fit(facts, **args).fits
    assert not estimate_fit(facts, **args, lora_slots=(16, 512)).fits


# --- plan: what to load and unload, and status.adapters -----------------------------------------------------------

A, B = Adapter("sql", "hf://demo/sql"), Adapter("support", "hf://demo/support")


def test_every_engine_gets_what_it_lacks_and_loses_what_was_removed():
    engines = [Engine("u1", "p1", {"sql": "demo/sql", "old": "demo/old"}), Engine("u2", "p2", {})]
    done = plan([A, B], engines, {}, {}, now=0, max_calls=10)
    assert [(c.pod, c.action, c.name, c.path) for c in done.calls] == [
        ("p1", "unload", "old", ""), ("p1", "load", "support", "demo/support"), ("p2", "load", "sql", "demo/sql"),
        ("p2", "load", "support", "demo/support")]
    assert not done.settled
    assert [(s["name"], s["phase"], s["loadedReplicas"], s["replicas"]) for s in done.status] == [
        ("sql", "Loading", 1, 2), ("support", "Loading", 0, 2)]


def test_a_pods_readiness_gate_opens_once_it_has_every_adapter_loaded_or_refused():
    failures = {("u3", "support", "demo/support"): Failure("404: No adapter found", at=0.0)}
    engines = [Engine("u1", "p1", {"sql": "demo/sql", "support": "demo/support", "old": "x"}),
               Engine("u2", "p2", {"sql": "demo/sql"}), Engine("u3", "p3", {"sql": "demo/sql"}),
               Engine("u4", "p4", None)]
    assert plan([A, B], engines, failures, {}, now=1, max_calls=9).complete == ("u1", "u3")
    # an adapter that is not to be loaded anywhere holds no pod back
    blocked = blocked_adapters([B], base_names={"support": "ns/other"}, other_adapters={})
    assert plan([A, B], engines, {}, blocked, now=1, max_calls=9).complete == ("u1", "u2", "u3")


def test_the_gate_opens_when_the_adapters_are_in_or_the_containers_have_waited_long_enough():
    now = datetime.datetime(2026, 12, 6, 10, 0, 0, tzinfo=datetime.UTC)

    def pod(*conditions, gated=True):
        return {"spec": {"readinessGates": [{"conditionType": "cxygpt.io/adapters-loaded"}] if gated else []},
                "status": {"conditions": [{"type": t, "status": v, "lastTransitionTime": at} for t, v, at in conditions]}}
    ready_since = ("ContainersReady", "True", "2026-12-06T09:58:01Z")  # 119 s before now
    assert gate_condition(pod(), True, now)["reason"] == "AdaptersLoaded"
    assert gate_condition(pod(ready_since), False, now) is None
    later = now + datetime.timedelta(seconds=1)
    opened = gate_condition(pod(ready_since), False, later)
    assert opened["status"] == "True" and opened["reason"] == "AdaptersNotLoaded"
    assert opened["lastTransitionTime"] == "2026-12-06T10:00:01Z"
    assert gate_condition(pod(("cxygpt.io/adapters-loaded", "True", "2026-12-06T09:00:00Z")), True, now) is None
    assert gate_condition(pod(gated=False), True, now) is None


def test_the_pod_template_has_the_adapters_readiness_gate():
    assert _deployment(spec(adapters=[SQL]))["spec"]["template"]["spec"]["readinessGates"] == [
        {"conditionType": "cxygpt.io/adapters-loaded"}]
    assert "readinessGates" not in _deployment(spec())["spec"]["template"]["spec"]


def test_calls_are_bounded_per_pass_unloads_first():
    engines = [Engine(f"u{i}", f"p{i}", {"gone": "x"}) for i in range(5)]
    done = plan([A, B], engines, {}, {}, now=0, max_calls=3)
    assert len(done.calls) == 3 and all(c.action == "unload" for c in done.calls)


def test_loaded_everywhere_is_loaded_and_settled():
    engines = [Engine("u1", "p1", {"sql": "demo/sql"}), Engine("u2", "p2", {"sql": "demo/sql"})]
    done = plan([A], engines, {}, {}, now=0, max_calls=10)
    assert done.calls == () and done.settled
    assert done.status == [{"name": "sql", "source": "hf://demo/sql", "replicas": 2, "loadedReplicas": 2,
                            "phase": "Loaded", "reason": "Loaded", "message": "loaded on 2/2 replicas"}]


def test_a_new_source_is_loaded_again_in_place():
    done = plan([Adapter("sql", "hf://demo/sql-v2")], [Engine("u1", "p1", {"sql": "demo/sql"})], {}, {}, now=0,
                max_calls=10)
    assert [(c.action, c.path, c.inplace) for c in done.calls] == [("load", "demo/sql-v2", True)]


def test_an_engine_that_does_not_answer_is_a_replica_without_the_adapter():
    done = plan([A], [Engine("u1", "p1", {"sql": "demo/sql"}), Engine("u2", "p2", None)], {}, {}, now=0, max_calls=9)
    assert done.calls == () and done.status[0]["phase"] == "Loading" and done.status[0]["loadedReplicas"] == 1
    assert plan([A], [], {}, {}, now=0, max_calls=9).status[0]["message"] == "no engine replica is running"


def test_a_refused_load_is_failed_with_the_engines_words_and_retried_only_later():
    failures = {("u1", "sql", "demo/sql"): Failure("Call to add_lora method failed: LoRA rank 64 is greater than "
                                                   "max_lora_rank 16.", at=100.0)}
    engines = [Engine("u1", "p1", {})]
    done = plan([A], engines, failures, {}, now=100 + FAILED_RETRY_S - 1, max_calls=9)
    assert done.calls == ()
    [entry] = done.status
    assert entry["phase"] == "Failed" and entry["reason"] == "AdapterLoadFailed"
    assert "pod p1: Call to add_lora method failed: LoRA rank 64 is greater than max_lora_rank 16." in entry["message"]
    assert len(plan([A], engines, failures, {}, now=100 + FAILED_RETRY_S, max_calls=9).calls) == 1
    # loaded since (another pass's retry succeeded): the old refusal no longer counts
    assert plan([A], [Engine("u1", "p1", {"sql": "demo/sql"})], failures, {}, now=0,
                max_calls=9).status[0]["phase"] == "Loaded"


def test_a_name_another_model_serves_is_failed_and_never_loaded():
    blocked = blocked_adapters([A, B, Adapter("pinned", "hf://demo/p@v2")], base_names={"sql": "llm/other"},
                               other_adapters={"support": "llm/older"})
    assert {k: v.reason for k, v in blocked.items()} == {"sql": "ModelNameConflict", "support": "ModelNameConflict",
                                                        "pinned": "RevisionNotSupported"}
    done = plan([A, B], [Engine("u1", "p1", {"sql": "demo/sql"})], {}, blocked, now=0, max_calls=9)
    # one loaded before the conflict is unloaded; the other is never loaded
    assert [(c.action, c.name) for c in done.calls] == [("unload", "sql")]
    assert [(s["phase"], s["reason"]) for s in done.status] == [("Failed", "ModelNameConflict")] * 2
    assert "llm/other" in done.status[0]["message"]


def test_an_adapters_name_belongs_to_another_models_base_or_to_the_older_models_adapter():
    def body(name, uid, created):
        return {"metadata": {"name": name, "namespace": "ns", "uid": uid, "creationTimestamp": created},
                "spec": {"adapters": [{"name": "sql", "source": "hf://o/sql"}, {"name": "x", "source": "hf://o/x"}]}}
    older, mine = body("older", "u0", "2026-01-01T00:00:00Z"), body("mine", "u1", "2026-02-01T00:00:00Z")
    index: dict = {}
    for each in (older, mine):
        for name, claim in adapter_claims(each).items():
            index.setdefault(name, []).append(claim)
    me = adapter_claims(mine)["sql"]
    bases = {"x": [NameClaim("2026-03-01T00:00:00Z", "u9", "other", "x-model")], "sql": [me]}
    found = conflicts([A, Adapter("x", "hf://o/x")], me, bases, index)
    assert found == ({"x": "other/x-model"}, {"sql": "ns/older", "x": "ns/older"})
    # the older model keeps its adapters' names
    assert conflicts([A], adapter_claims(older)["sql"], {}, index) == ({}, {})


def test_a_hub_adapter_on_offline_engines_is_failed():
    blocked = blocked_adapters([A, Adapter("local", "pvc://loras/x")], base_names={}, other_adapters={}, offline=True)
    assert {k: v.reason for k, v in blocked.items()} == {"sql": "HubOffline"}


def test_a_rank_above_the_engines_says_which_setting_raises_it():
    failures = {("u1", "sql", "demo/sql"): Failure("500: Call to add_lora method failed: LoRA rank 64 is greater "
                                                   "than max_lora_rank 16.", at=0.0)}
    entry = plan([A], [Engine("u1", "p1", {})], failures, {}, now=1, max_calls=9).status[0]
    assert entry["message"].endswith("(0/1 replicas); raise spec.lora.maxRank to its rank"), entry


def test_a_long_engine_message_is_cut():
    failures = {("u1", "sql", "demo/sql"): Failure("x" * 5000, at=0.0)}
    entry = plan([A], [Engine("u1", "p1", {})], failures, {}, now=1, max_calls=9).status[0]
    assert len(entry["message"]) < 400


def test_an_engine_is_reached_where_its_service_publishes_it_else_at_its_pod_ip():
    slices = [{"ports": [{"name": "http", "port": 41234}], "endpoints": [
        {"addresses": ["127.0.0.1"], "conditions": {"ready": False}, "targetRef": {"uid": "u1"}}]},
        {"ports": [], "endpoints": [{"addresses": ["10.0.0.9"], "targetRef": {"uid": "u9"}}]}]
    published = slice_urls(slices)
    assert published == {"u1": "http://127.0.0.1:41234"}

    def pod(uid, ip="10.1.0.5", phase="Running", **meta):
        return {"metadata": {"uid": uid, **meta}, "status": {"podIP": ip, "phase": phase}}
    assert base_url(pod("u1"), 8000, published) == "http://127.0.0.1:41234"
    assert base_url(pod("u2"), 8000, published) == "http://10.1.0.5:8000"
    assert base_url(pod("u3", ip="fd00::5"), 8000, {}) == "http://[fd00::5]:8000"
    assert base_url(pod("u4", phase="Pending"), 8000, {}) is None
    assert base_url(pod("u5", deletionTimestamp="2026-12-06T00:00:00Z"), 8000, {}) is None


def test_the_adapters_of_an_engine_are_the_cards_with_a_parent():
    models = {"data": [{"id": "base", "root": "Qwen/Qwen3-0.6B", "parent": None},
                       {"id": "sql", "root": "demo/sql", "parent": "base"}, "junk"]}
    assert adapters_of(models) == {"sql": "demo/sql"}


def test_the_example_parses():
    doc = yaml.safe_load((Path(__file__).parents[2] / "examples/qwen3-0.6b-adapters.yaml").read_text())
    parsed = parse_spec(doc["spec"])
    assert [a.name for a in parsed.adapters] == ["qwen3-0.6b-sql", "qwen3-0.6b-support"]
