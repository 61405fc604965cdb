"""Engine speed from silicon data: the floors every speed profile is held to, the table and its provenance, the
interpolation, the predictions, and the limits checked against them."""
import itertools
import json
from pathlib import Path

import pytest
import yaml

from cxygpt_bench.closed_loop import closed_loop
from cxygpt_profiles import GpuNode, ProfileTableError, default_catalog, default_table, load_table, select_profile
from cxygpt_profiles.gpus import default_gpus
from cxygpt_profiles.predict import check_table, gpus_of, predict_profile, profile_predictions, steady_state
from cxygpt_profiles.roofline import StepShape, Workload, decode_step, floor_ms, prefill_step, step_bytes, step_flops
from cxygpt_profiles.speed import (
    KV_LAYOUT,
    RooflineSpeed,
    SiliconSpeed,
    default_speeds,
    interpolate,
    load_speeds,
    step_model,
)
from cxygpt_sim.config import speed_profiles
from cxygpt_sim.speed import TEST_PROFILES, GpuSpeed

GPUS, SPEEDS, CATALOG, TABLE = default_gpus(), default_speeds(), default_catalog(), default_table()
SHAPES = [decode_step(b, c) for b in (1, 8, 32, 256) for c in (16, 2000, 16_000, 100_000)] + [
    prefill_step(t, before) for t in (1, 16, 512, 2000, 8192, 30_000) for before in (0, 4096, 40_000)] + [
    StepShape(prefill=((512, 0), (300, 1000)), decode_count=31, decode_context=31 * 2000),
    StepShape(prefill=((8000, 16_000),), decode_count=200, decode_context=200 * 9000)]


def workloads():
    """Every GPU x catalogued model x weight format it has x KV cache x tensor-parallel size (several GPUs only on
    the 80 GB-class cards, as the profiles take them)."""
    for gpu_key, gpu in GPUS.gpus.items():
        for repo, entry in CATALOG.models.items():
            facts = CATALOG.lookup(repo)
            for weights, kv, tp in itertools.product(("bf16", *entry.variants), ("auto", "fp8"), (1, 2, 4, 8)):
                if tp > 1 and (gpu.memory_mib < 70 * 1024 or facts.attention_heads % tp):
                    continue
                yield gpu_key, repo, Workload(facts, weights, kv, tp, TABLE.fit)


ALL = list(workloads())


def test_every_speed_profile_of_the_simulator_is_a_gpu_with_facts_or_a_test_double():
    assert set(speed_profiles()) == set(GPUS.gpus) | set(TEST_PROFILES)
    for key, gpu in GPUS.gpus.items():
        assert gpu.peak_tflops["bf16"] > 0 and gpu.memory_bandwidth_gbs > 0 and gpu.products
        assert key in SPEEDS.fitted
        assert (key in SPEEDS.silicon) == (gpu.speed.source == "silicon")


@pytest.mark.parametrize("gpu_key,repo,workload", ALL, ids=[f"{g}-{r.split('/')[1]}-{w.weights}-{w.kv_cache_dtype}-tp{w.tp}"
                                                            for g, r, w in ALL])
def test_no_step_is_faster_than_the_hardware(gpu_key, repo, workload):
    """Decode: the weights at their dtype and the batch's KV read at the memory bandwidth; prefill: its FLOPs at
    the peak of the dtype it computes in; whichever is longer."""
    model = step_model(gpu_key, workload, repo)
    gpu = GPUS.gpus[gpu_key]
    for shape in SHAPES:
        floor = floor_ms(gpu, workload, shape)
        assert model.step_ms(shape) >= floor, f"{model.source}: {shape} in {model.step_ms(shape):.3f} ms < {floor:.3f}"


def test_the_floor_is_the_bytes_at_the_bandwidth_or_the_flops_at_the_peak():
    w = Workload(CATALOG.lookup("Qwen/Qwen3-14B"), "bf16", "auto", 1, TABLE.fit)
    h100 = GPUS.gpus["h100-80g"]
    # the arithmetic: 29.5 GB of bf16 weights read once per decode step at 3.35 TB/s
    assert floor_ms(h100, w, decode_step(1, 1)) == pytest.approx(8.8, abs=0.1)
    assert step_bytes(w, decode_step(32, 2000)) == w.weight_bytes + 32 * 2000 * w.kv_bytes_per_token
    # 2 FLOPs per weight per token (13.2 B outside the embeddings) plus causal attention
    assert step_flops(w, prefill_step(2000)) == pytest.approx(2 * 13.21e9 * 2000 + 4 * 40 * 40 * 128 * 2001000,
                                                              rel=1e-3)
    assert floor_ms(h100, w, prefill_step(8192)) == pytest.approx(step_flops(w, prefill_step(8192)) / 989.5e9)
    # tensor parallel: each GPU reads its shard and computes its share
    w2 = Workload(w.facts, "bf16", "auto", 2, TABLE.fit)
    assert step_bytes(w2, decode_step(4, 100)) == pytest.approx(step_bytes(w, decode_step(4, 100)) / 2)
    assert floor_ms(h100, w, StepShape()) == 0


def test_the_table_says_where_its_numbers_come_from():
    g = SPEEDS.generator
    assert g["script"] == "scripts/gen_speeds.py" and g["aiconfigurator"] and g["aiconfigurator_core"]
    assert g["backend"] == "vllm"
    for key, measured in SPEEDS.silicon.items():
        assert measured.aiconfigurator_system == GPUS.gpus[key].speed.aiconfigurator_system
        assert measured.database.startswith("vllm ")
        assert "Qwen/Qwen3-14B" in measured.models and set(measured.models) <= set(CATALOG.models)
    for key, fit in SPEEDS.fitted.items():
        gpu = GPUS.gpus[key]
        assert fit.fitted_on == (gpu.speed.aiconfigurator_system or gpu.speed.fitted_on)
    assert SPEEDS.fitted["rtx5090-32g"].fitted_on == "rtx_pro_6000_server"


def test_uncovered_gpus_and_formats_use_the_fitted_roofline():
    qwen = CATALOG.lookup("Qwen/Qwen3-14B")
    silicon = step_model("h100-80g", Workload(qwen, "bf16", "fp8", 1, TABLE.fit), "Qwen/Qwen3-14B")
    assert isinstance(silicon, SiliconSpeed) and silicon.source.startswith("silicon: AIConfigurator")
    for gpu, workload, repo in [("rtx5090-32g", Workload(qwen, "bf16", "auto", 1, TABLE.fit), "Qwen/Qwen3-14B"),
                                ("h100-80g", Workload(qwen, "int4", "fp8", 1, TABLE.fit), "Qwen/Qwen3-14B"),
                                ("h100-80g", Workload(qwen, "bf16", "fp8", 1, TABLE.fit), None),
                                ("h100-80g", Workload(qwen, "bf16", "auto", 2, TABLE.fit), "Qwen/Qwen3-14B")]:
        model = step_model(gpu, workload, repo)
        assert isinstance(model, RooflineSpeed) and model.source.startswith("fitted: roofline")
    # an A100 has no fp8: its fp8 KV cache takes the bf16 measurements
    a100 = step_model("a100-80g", Workload(qwen, "bf16", "fp8", 1, TABLE.fit), "Qwen/Qwen3-14B")
    assert isinstance(a100, SiliconSpeed) and a100.attention is a100.table.attention["bfloat16"]
    assert KV_LAYOUT["fp8_e4m3"] == "fp8" and KV_LAYOUT["auto"] == "bfloat16"


def test_interpolation_is_linear_between_samples_flat_below_and_never_falls_past_the_last():
    xs, ys = [1, 10, 100], [5.0, 14.0, 104.0]
    assert interpolate(xs, ys, 0) == 5.0 and interpolate(xs, ys, 1) == 5.0
    assert interpolate(xs, ys, 5.5) == pytest.approx(9.5) and interpolate(xs, ys, 10) == 14.0
    assert interpolate(xs, ys, 200) == pytest.approx(204.0)
    assert interpolate([1, 10], [5.0, 3.0], 100) == 3.0


def test_a_grid_point_of_the_table_is_aiconfigurators_own_number():
    table = SPEEDS.silicon["h100-80g"].models["Qwen/Qwen3-14B"]["tp1"]
    model = SiliconSpeed(table, table.attention["bfloat16"], SPEEDS.grids, "t")
    g = SPEEDS.grids
    i, j = g.decode_batch.index(32), g.decode_context.index(4096)
    assert model.step_ms(decode_step(32, 4096)) == pytest.approx(
        table.decode_linear_ms[i] + table.attention["bfloat16"].decode_ms[i][j])
    i = g.prefill_tokens.index(2048)
    assert model.step_ms(prefill_step(2048)) == pytest.approx(
        table.prefill_linear_ms[i] + table.attention["bfloat16"].prefill_ms[i][0])


def qwen14_h100(kv="auto"):
    return step_model("h100-80g", Workload(CATALOG.lookup("Qwen/Qwen3-14B"), "bf16", kv, 1, TABLE.fit),
                      "Qwen/Qwen3-14B")


def test_the_bar_qwen3_14b_bf16_on_h100_decodes_no_faster_than_its_weights_allow():
    assert qwen14_h100().step_ms(decode_step(1, 100)) >= 8.4


def test_the_bar_at_batch_32_within_a_quarter_of_aiconfigurators_estimate():
    """The simulator's engine core (clock injected) under AIConfigurator's shape, 2000 tokens in and 256 out, 32
    clients in a closed loop: spread out as AIConfigurator's steady state, or started at once."""
    estimate = SPEEDS.estimate("h100-80g", "Qwen/Qwen3-14B", 2000, 256, 32)
    assert (estimate.ttft_ms, estimate.tpot_ms) == pytest.approx((190.9, 24.4), abs=0.1)   # the figures
    for ramp_s in (6.0, 0.0):
        measured = closed_loop(GpuSpeed(qwen14_h100()), prompt=2000, output=256, concurrency=32, requests=96,
                               budget=8192, ramp_s=ramp_s)
        assert abs(measured.tpot_ms / estimate.tpot_ms - 1) <= 0.25, measured
    # one request alone: AIConfigurator's TTFT too (its prefill and vLLM's dispatch on the CPU)
    alone = closed_loop(GpuSpeed(qwen14_h100()), prompt=2000, output=256, concurrency=1, requests=2, budget=8192)
    e1 = SPEEDS.estimate("h100-80g", "Qwen/Qwen3-14B", 2000, 256, 1)
    assert alone.ttft_ms == pytest.approx(e1.ttft_ms, rel=0.05) and alone.tpot_ms == pytest.approx(e1.tpot_ms, rel=0.05)


@pytest.mark.parametrize("gpu,repo,weights,prompt,concurrency,budget", [
    ("h100-80g", "Qwen/Qwen3-14B", "bf16", 2000, 8, 8192),
    ("h100-80g", "Qwen/Qwen3-8B", "bf16", 6000, 32, 8192),
    ("l40s-48g", "meta-llama/Llama-3.1-8B-Instruct", "bf16", 7936, 32, 2048),
    ("rtx5090-32g", "Qwen/Qwen3-14B", "int4", 3840, 16, 2048),
])
def test_the_prediction_is_what_the_simulator_measures(gpu, repo, weights, prompt, concurrency, budget):
    """The closed loop with arrivals spread over one request's time, as the prediction assumes."""
    model = step_model(gpu, Workload(CATALOG.lookup(repo), weights, "fp8", 1, TABLE.fit), repo)
    ttft, tpot, bound = steady_state(model, concurrency=concurrency, prompt=prompt, output=256, budget=budget)
    measured = closed_loop(GpuSpeed(model), prompt=prompt, output=256, concurrency=concurrency,
                           requests=4 * concurrency, budget=budget, ramp_s=(ttft + 255 * tpot) / 1000)
    assert not bound
    assert measured.ttft_ms == pytest.approx(ttft, rel=0.1) and measured.tpot_ms == pytest.approx(tpot, rel=0.1)


def test_a_prefill_bound_engine_is_said_to_be():
    """An A100's 2048-token steps cannot prefill 35 prompts of 16k tokens while each request decodes 64: every step
    prefills, and prompts queue behind each other."""
    model = step_model("a100-80g", Workload(CATALOG.lookup("Qwen/Qwen3-14B"), "bf16", "fp8", 1, TABLE.fit),
                       "Qwen/Qwen3-14B")
    ttft, tpot, bound = steady_state(model, concurrency=35, prompt=16128, output=64, budget=2048)
    measured = closed_loop(GpuSpeed(model), prompt=16128, output=64, concurrency=35, requests=70, budget=2048,
                           ramp_s=(ttft + 63 * tpot) / 1000)
    assert bound and measured.ttft_ms > 2 * ttft and measured.tpot_ms == pytest.approx(tpot, rel=0.15)


def test_a_selection_on_a_known_gpu_carries_its_prediction():
    facts = CATALOG.lookup("Qwen/Qwen3-14B")
    sel = select_profile(TABLE, mode="multi", facts=facts,
                         nodes=[GpuNode(memory_mib=81559, count=1, name="n", product="NVIDIA-H100-80GB-HBM3")])
    p = sel.prediction
    assert sel.profile.name == "SRV_80G" and p.gpu == "h100-80g" and p.source == "silicon"
    assert (p.prompt_tokens, p.output_tokens) == (16128, 256) and 1 <= p.concurrency <= 64
    assert p.ttft_ms > 0 and p.tpot_ms >= 8.4
    assert p.as_status()["ttftMs"] == round(p.ttft_ms, 1)
    unknown = select_profile(TABLE, mode="multi", facts=facts, nodes=[GpuNode(memory_mib=81559, count=1, name="n")])
    assert unknown.prediction is None


def test_profiles_are_checked_on_the_gpus_they_are_for():
    names = {p.name: gpus_of(TABLE, p, GPUS) for p in TABLE.profiles}
    big = {"h100-80g", "h200-141g", "a100-80g"}
    assert names["SRV_24G"] == ["rtx5090-32g"] and names["SRV_48G"] == ["l40s-48g"]
    assert set(names["SRV_80G"]) == set(names["SRV_MULTI_80G"]) == big
    assert set(names["DEV_32G"]) == set(GPUS.gpus)  # no larger profile runs 4-bit weights
    assert (names["SINGLE_32G"], names["SINGLE_48G"], set(names["SINGLE_80G"])) == (
        ["rtx5090-32g"], ["l40s-48g"], big)
    assert check_table(TABLE, CATALOG) == []


def test_a_ttft_threshold_below_the_engines_own_ttft_is_refused_at_load(tmp_path):
    data = json.loads(json.dumps(TABLE.model_dump(mode="json")))
    srv80 = next(p for p in data["profiles"] if p["name"] == "SRV_80G")
    srv80["limits"]["degrade"]["p95_ttft_ms"] = 500
    srv80["limits"]["timeouts"]["total_s"] = 20
    path = tmp_path / "profiles.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileTableError) as e:
        load_table(path)
    message = str(e.value)
    assert "SRV_80G on h100-80g: at concurrency 35 with 16128 tokens in, 256 out, the engine's own TTFT" in message
    assert "is above degrade.p95_ttft_ms 500 (Qwen/Qwen3-14B)" in message
    assert "request time" in message and "is above timeouts.total_s 20" in message
    # the shipped table passes
    predicted = predict_profile(TABLE.get("SRV_80G"), gpu="h100-80g", gpu_count=1, facts=CATALOG.lookup(
        "Qwen/Qwen3-14B"), repo="Qwen/Qwen3-14B", max_model_len=16384, consts=TABLE.fit)
    assert 500 < predicted.ttft_ms <= TABLE.get("SRV_80G").limits.degrade.p95_ttft_ms


def test_the_charts_defaults_hold_the_engines_own_speed():
    """The chart ships the profile table (its thresholds and timeouts are checked as it loads) and a cold-start
    timeout, which must outlast the slowest engine's own first token, the engine's start aside."""
    chart = Path(__file__).parents[2] / "deploy/helm/cxygpt"
    shipped = load_table(chart / "files/profiles.yaml")
    assert shipped == TABLE
    predictions = [p for _, _, p in profile_predictions(shipped, CATALOG)]
    assert len(predictions) > 40 and {p.gpu for p in predictions} == set(GPUS.gpus)
    cold_start_s = yaml.safe_load((chart / "values.yaml").read_text())["gateway"]["coldStartTimeoutSeconds"]
    assert cold_start_s * 1000 > max(p.ttft_ms for p in predictions)


def test_a_damaged_speed_table_names_the_field(tmp_path):
    bad = tmp_path / "speeds.json"
    bad.write_text(json.dumps({"generator": {}, "grids": {"decode_batch": [1]}}))
    with pytest.raises(ProfileTableError, match="grids.decode_batch"):
        load_speeds(bad)
    bad.write_text("{")
    with pytest.raises(ProfileTableError, match="not valid JSON"):
        load_speeds(bad)
    # a fitted roofline above the hardware's own figures cannot even be loaded
    data = SPEEDS.model_dump(mode="json")
    data["fitted"]["rtx5090-32g"]["memory_efficiency"] = 1.2
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileTableError, match="fitted.rtx5090-32g.memory_efficiency"):
        load_speeds(bad)
