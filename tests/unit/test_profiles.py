"""Profile table validation, VRAM fit estimate and profile selection (pure)."""
import copy

import pytest
import yaml

from cxygpt_profiles import (
    GpuNode,
    NoFit,
    ProfileTableError,
    default_catalog,
    default_table,
    estimate_fit,
    load_table,
    select_profile,
)
from cxygpt_profiles.table import DEFAULT_TABLE

TABLE = default_table()
QWEN14 = default_catalog().lookup("Qwen/Qwen3-14B")
BOTH = frozenset({"bf16", "int4"})

RTX5090 = GpuNode(memory_mib=32607, count=1, name="ws", product="NVIDIA-GeForce-RTX-5090")
L40S = GpuNode(memory_mib=46068, count=1, name="l40s", product="NVIDIA-L40S")
H100 = GpuNode(memory_mib=81559, count=1, name="h100", product="NVIDIA-H100-80GB-HBM3")
H100x2 = GpuNode(memory_mib=81559, count=2, name="h100x2", product="NVIDIA-H100-80GB-HBM3")
H100x8 = GpuNode(memory_mib=81559, count=8, name="h100x8", product="NVIDIA-H100-80GB-HBM3")


# --- the table -------------------------------------------------------------------------------------------

SINGLE = ["SINGLE_32G", "SINGLE_48G", "SINGLE_80G"]
MULTI = ["DEV_32G", "SRV_24G", "SRV_48G", "SRV_80G", "SRV_MULTI_80G"]


def test_table_has_the_design_profiles_and_single_user_ones_for_each_card_class():
    assert TABLE.names == SINGLE + MULTI
    assert [TABLE.get(n).engine.max_model_len for n in MULTI] == [4096, 8192, 8192, 16384, 16384]
    # quality first: a bf16 KV cache (the model's dtype) and the context the memory allows, from 3072 up
    for name, limit in zip(SINGLE, [32768, 65536, 131072]):
        single = TABLE.get(name)
        assert single.engine.kv_cache_dtype == "auto" and single.engine.gpu_memory_utilization == 0.95
        assert (single.sizing.context, single.sizing.context_limit, single.engine.max_model_len) == (
            "memory", limit, 3072)
        assert single.limits.rate_qps is None and single.limits.queue_size == 1 and single.gpu.max_count == 8
    assert all(TABLE.get(n).engine.kv_cache_dtype == "fp8" for n in MULTI)
    assert {TABLE.get(n).engine.gpu_memory_utilization for n in MULTI} == {0.92}
    assert {TABLE.get(n).sizing.sequences for n in MULTI} == {4}
    assert TABLE.get("DEV_32G").weights == "int4"
    assert [TABLE.get(n).limits.degraded_max_output_tokens for n in MULTI] == [128] * 5


def _write(tmp_path, data):
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _raw():
    return yaml.safe_load(DEFAULT_TABLE.read_text())


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["profiles"][3]["engine"].update(max_model_len="big"),
     "profiles[3](DEV_32G).engine.max_model_len"),
    (lambda d: d["profiles"][5]["limits"].update(rate_qsp=3),
     "profiles[5](SRV_48G).limits.rate_qsp: Extra inputs are not permitted"),
    (lambda d: d["profiles"][0].update(mode="solo"), "profiles[0](SINGLE_32G).mode"),
    (lambda d: d["profiles"][6]["engine"].update(gpu_memory_utilization=1.5),
     "profiles[6](SRV_80G).engine.gpu_memory_utilization"),
    (lambda d: d["profiles"][7]["limits"].update(max_input_tokens=20000), "exceeds engine.max_model_len 16384"),
    (lambda d: d["profiles"][2]["limits"].update(max_input_tokens=140000), "exceeds sizing.context_limit 131072"),
    (lambda d: d["profiles"][2]["sizing"].update(context_limit=2048), "sizing.context_limit 2048 is below"),
    (lambda d: d["profiles"][7]["sizing"].update(context_limit=32768), "context_limit is set with context: memory"),
    (lambda d: d["profiles"][7]["gpu"].update(max_count=16), "profiles[7](SRV_MULTI_80G).gpu.max_count"),
    (lambda d: d["profiles"][7]["engine"].update(tensor_parallel_size=2),
     "engine.tensor_parallel_size: Extra inputs are not permitted"),
    (lambda d: d["profiles"][3]["limits"].update(degraded_max_output_tokens=999),
     "degraded_max_output_tokens must not exceed"),
    (lambda d: d["profiles"].append(copy.deepcopy(d["profiles"][0])), "duplicate profile names: SINGLE_32G"),
    (lambda d: d["profiles"][3]["engine"].update(kv_cache_dtype="fp4"), "kv_cache_dtype 'fp4' missing"),
    (lambda d: d.pop("vllm"), "vllm: Field required"),
])
def test_broken_tables_are_rejected_naming_the_field(tmp_path, mutate, expected):
    data = _raw()
    mutate(data)
    with pytest.raises(ProfileTableError) as err:
        load_table(_write(tmp_path, data))
    assert expected in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_unreadable_and_non_yaml_tables(tmp_path):
    with pytest.raises(ProfileTableError, match="cannot read"):
        load_table(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles: [\n")
    with pytest.raises(ProfileTableError, match="not valid YAML"):
        load_table(bad)


# --- fit estimate ----------------------------------------------------------------------------------------

def test_fit_qwen3_14b_bf16_on_a_5090_is_tight_but_fits():
    fit = estimate_fit(QWEN14, weights="bf16", kv_cache_dtype="fp8", max_model_len=3072, gpu_memory_utilization=0.95,
                       gpu_memory_mib=32607, gpu_count=1, consts=TABLE.fit)
    # 14.77e9 params * 2 bytes = 28169 MiB; KV fp8 = 2 * 40 layers * 8 heads * 128 dim = 81920 bytes/token
    assert fit.weights_mib == 28169
    assert fit.kv_bytes_per_token == 81920
    assert fit.usable_mib == int(32607 * 0.95)
    assert fit.kv_cache_mib == fit.usable_mib - 28169 - 2048
    assert fit.kv_token_capacity == fit.kv_cache_mib * 1024 * 1024 // 81920
    assert fit.max_concurrent_sequences == fit.kv_token_capacity // 3072
    assert fit.fits


def test_int4_weights_keep_embeddings_16_bit():
    fit = estimate_fit(QWEN14, weights="int4", kv_cache_dtype="fp8", max_model_len=4096, gpu_memory_utilization=0.92,
                       gpu_memory_mib=32607, gpu_count=1, consts=TABLE.fit)
    embeddings = 151936 * 5120 * 2
    expected = ((14768307200 - embeddings) * 0.5625 + embeddings * 2) / 2**20
    assert fit.weights_mib == pytest.approx(expected, abs=1)
    assert fit.fits and fit.max_concurrent_sequences > 32


def test_fit_fails_when_weights_do_not_fit_and_says_why():
    qwen32 = default_catalog().lookup("qwen3-32b")
    fit = estimate_fit(qwen32, weights="bf16", kv_cache_dtype="fp8", max_model_len=3072, gpu_memory_utilization=0.95,
                       gpu_memory_mib=32607, gpu_count=1, consts=TABLE.fit)
    assert not fit.fits and fit.kv_token_capacity == 0
    assert "weights need" in fit.message and "usable" in fit.message


def test_fit_fails_when_kv_cache_is_shorter_than_the_context():
    fit = estimate_fit(QWEN14, weights="bf16", kv_cache_dtype="fp8", max_model_len=16384, gpu_memory_utilization=0.95,
                       gpu_memory_mib=32607, gpu_count=1, consts=TABLE.fit)
    assert not fit.fits and "fewer than max-model-len 16384" in fit.message


def test_tensor_parallel_multiplies_memory():
    one = estimate_fit(QWEN14, weights="bf16", kv_cache_dtype="fp8", max_model_len=16384,
                       gpu_memory_utilization=0.92, gpu_memory_mib=81559, gpu_count=1, consts=TABLE.fit)
    two = estimate_fit(QWEN14, weights="bf16", kv_cache_dtype="fp8", max_model_len=16384,
                       gpu_memory_utilization=0.92, gpu_memory_mib=81559, gpu_count=2, consts=TABLE.fit)
    assert two.kv_cache_mib == 2 * one.kv_cache_mib + one.weights_mib  # weights split, overhead per GPU


# --- sizing: the fewest GPUs that hold the model, then the profile -----------------------------------------------

L4x2 = GpuNode(memory_mib=23034, count=2, name="l4x2", product="NVIDIA-L4")
CATALOG = default_catalog()


def test_a_small_model_on_a_node_of_two_h100s_takes_one_gpu():
    sel = select_profile(TABLE, mode="multi", nodes=[H100x2], facts=CATALOG.lookup("Qwen/Qwen3-0.6B"))
    assert (sel.profile.name, sel.gpu_count, sel.tensor_parallel_size) == ("SRV_80G", 1, 1)
    assert sel.sizing.available == 2 and [e.gpus for e in sel.sizing.estimates] == [1]
    assert "1 more of the node's 2 GPUs stays free for other engines" in sel.sizing.reason


def test_14b_bf16_on_two_24gb_cards_runs_tensor_parallel_2_and_says_why():
    sel = select_profile(TABLE, mode="multi", nodes=[L4x2], facts=QWEN14)
    assert (sel.profile.name, sel.gpu_count, sel.max_model_len) == ("SRV_24G", 2, 8192)
    one, two = sel.sizing.estimates
    assert not one.fits and "weights need 28169 MiB" in one.message and "only 21191 MiB usable" in one.message
    assert two.fits and two.fit.kv_token_capacity >= 4 * 8192
    assert sel.sizing.reason.startswith("2 GPUs (tensor parallel 2) hold 28169 MiB of bf16 weights")
    assert "1 GPU: bf16 weights need 28169 MiB" in sel.sizing.reason


def test_70b_on_eight_80gb_cards_takes_the_fewest_that_fit():
    llama70 = CATALOG.lookup("llama-3.1-70b")
    sel = select_profile(TABLE, mode="multi", nodes=[H100x8], facts=llama70)
    assert (sel.profile.name, sel.gpu_count) == ("SRV_MULTI_80G", 2)
    assert sel.fit.kv_token_capacity >= 4 * 16384  # the profile's 4 sequences of its context
    # every count is estimated: 3, 5, 6, 7 do not divide its 64 attention heads
    assert [(e.gpus, e.fits) for e in sel.sizing.estimates] == [
        (2, True), (3, False), (4, True), (5, False), (6, False), (7, False), (8, True)]
    assert "does not divide the model's 64 attention heads" in sel.sizing.estimates[1].message
    assert "6 more of the node's 8 GPUs stay free" in sel.sizing.reason


def test_single_mode_on_80gb_gets_the_context_the_memory_allows_with_the_reason():
    sel = select_profile(TABLE, mode="single", nodes=[H100x2], facts=QWEN14)
    assert (sel.profile.name, sel.gpu_count, sel.max_model_len) == ("SINGLE_80G", 1, 40960)
    assert sel.profile.engine.kv_cache_dtype == "auto"  # bf16, the model's own
    assert sel.limits.max_input_tokens == 40960 - 512
    assert "context 40960 tokens, the model's own maximum" in sel.sizing.reason
    assert [e.max_model_len for e in sel.sizing.estimates] == [40960, 40960]  # the second GPU would add nothing
    # bounded by memory: rounded down to the profile's multiple, never below its least context
    sel = select_profile(TABLE, mode="single", nodes=[RTX5090], facts=QWEN14)
    assert (sel.profile.name, sel.max_model_len) == ("SINGLE_32G", 4096)
    assert sel.fit.kv_token_capacity == 4857 and "what the KV cache holds for one sequence" in sel.sizing.reason
    # bounded by the profile: Llama 3.1 8B's 131072 tokens fit an H100 whole
    sel = select_profile(TABLE, mode="single", nodes=[H100], facts=CATALOG.lookup("llama-3.1-8b"))
    assert sel.max_model_len == 131072 and sel.limits.max_input_tokens == 131072 - 512


def test_single_mode_spans_gpus_when_one_cannot_hold_the_model():
    sel = select_profile(TABLE, mode="single", nodes=[H100x8], facts=CATALOG.lookup("llama-3.1-70b"))
    assert (sel.profile.name, sel.gpu_count) == ("SINGLE_80G", 2)
    assert 3072 < sel.max_model_len < 131072 and sel.max_model_len % 1024 == 0
    assert "2 GPUs (tensor parallel 2)" in sel.sizing.reason


@pytest.mark.parametrize("mode, nodes, expected, tp", [
    ("single", [RTX5090], "SINGLE_32G", 1),
    ("single", [L40S], "SINGLE_48G", 1),
    ("single", [H100x8], "SINGLE_80G", 1),
    ("single", [RTX5090, H100], "SINGLE_80G", 1),
    ("multi", [RTX5090], "DEV_32G", 1),
    ("multi", [L40S], "SRV_48G", 1),
    ("multi", [RTX5090, L40S], "SRV_48G", 1),
    ("multi", [H100], "SRV_80G", 1),
    ("multi", [RTX5090, H100], "SRV_80G", 1),
    ("multi", [H100, H100x2], "SRV_80G", 1),
    ("multi", [H100x2, H100x8], "SRV_80G", 1),
    ("multi", [L4x2, H100x2], "SRV_80G", 1),  # one GPU before two
    ("multi", [L4x2, RTX5090], "DEV_32G", 1),  # 4-bit on one card before bf16 on two
])
def test_auto_takes_the_fewest_gpus_then_the_best_profile_for_the_mode(mode, nodes, expected, tp):
    sel = select_profile(TABLE, mode=mode, nodes=nodes, facts=QWEN14, variants=BOTH)
    assert sel.profile.name == expected
    assert sel.tensor_parallel_size == tp
    assert sel.mode == mode and not sel.forced


def test_auto_prefers_the_smallest_node_that_fits_the_profile():
    big = GpuNode(memory_mib=97871, count=1, name="h200")
    assert select_profile(TABLE, mode="multi", nodes=[big, H100], facts=QWEN14, variants=BOTH).node == H100


def test_preferred_products_come_first():
    a100 = GpuNode(memory_mib=81920, count=1, name="a100", product="NVIDIA-A100-SXM4-80GB")
    assert select_profile(TABLE, mode="multi", nodes=[H100, a100], facts=QWEN14).node == H100
    chosen = select_profile(TABLE, mode="multi", nodes=[H100, a100], facts=QWEN14,
                            prefer=frozenset({"NVIDIA-A100-SXM4-80GB"}))
    assert chosen.node == a100 and chosen.prediction.gpu == "a100-80g"
    # preferred, not required: a product no node has changes nothing
    assert select_profile(TABLE, mode="multi", nodes=[H100], facts=QWEN14, prefer=frozenset({"x"})).node == H100


def test_a_mig_slice_is_one_gpu_of_its_own_memory():
    slices = GpuNode(memory_mib=40192, count=2, name="a100-mig", product="NVIDIA-A100-SXM4-80GB-MIG-3g.40gb",
                     resource="nvidia.com/mig-3g.40gb", mig=True)
    sel = select_profile(TABLE, mode="multi", nodes=[slices], facts=CATALOG.lookup("Qwen/Qwen3-0.6B"))
    assert (sel.profile.name, sel.gpu_count, sel.node) == ("SRV_24G", 1, slices)
    assert sel.sizing.available == 1 and sel.prediction is None  # a slice is no GPU of the GPU table
    # 32B needs two slices' memory: tensor parallel never spans slices, so it does not fit there
    with pytest.raises(NoFit) as err:
        select_profile(TABLE, mode="multi", nodes=[slices], facts=CATALOG.lookup("qwen3-32b"))
    assert err.value.reason == "NoMatchingGPU" and "not on 1 GPU of 40192 MiB" in err.value.message


def test_tp_divides_the_attention_heads():
    six = GpuNode(memory_mib=46068, count=6, name="six", product="NVIDIA-L40S")
    # Qwen3-32B's bf16 weights need more than one L40S
    sel = select_profile(TABLE, mode="multi", nodes=[six], facts=CATALOG.lookup("qwen3-32b"))
    assert (sel.profile.name, sel.tensor_parallel_size) == ("SRV_48G", 2)
    odd = CATALOG.lookup("qwen3-32b").model_copy(update={"attention_heads": 40})  # 2 and 4 divide, 3 does not
    sel = select_profile(TABLE, mode="multi", nodes=[six], facts=odd)
    assert sel.tensor_parallel_size == 2
    sel = select_profile(TABLE, mode="multi", nodes=[six], facts=None, variants=BOTH)
    assert sel.tensor_parallel_size == 1 and "fit not estimated" in sel.notes[0]
    assert "the model's facts are unknown" in sel.sizing.reason


def test_without_an_int4_variant_a_32g_card_cannot_serve_multi_user():
    with pytest.raises(NoFit) as err:
        select_profile(TABLE, mode="multi", nodes=[RTX5090], facts=QWEN14, variants=frozenset({"bf16"}))
    assert err.value.reason == "NoMatchingGPU" and not err.value.permanent
    assert err.value.sizing is not None and not err.value.sizing.fits  # the closest miss, for the status


def test_auto_skips_profiles_whose_weights_do_not_fit():
    qwen32 = default_catalog().lookup("qwen3-32b")  # 61 GiB of bf16: not on one 48 GB card
    sel = select_profile(TABLE, mode="multi", nodes=[L40S, RTX5090], facts=qwen32, variants=BOTH)
    assert sel.profile.name == "DEV_32G"
    with pytest.raises(NoFit) as err:
        select_profile(TABLE, mode="multi", nodes=[L40S], facts=qwen32, variants=frozenset({"bf16"}))
    assert "InsufficientGPUMemory" not in err.value.reason and "closest" in err.value.message


def test_no_nodes_is_pending_not_failed():
    with pytest.raises(NoFit) as err:
        select_profile(TABLE, mode="multi", nodes=[], facts=QWEN14, variants=BOTH)
    assert (err.value.reason, err.value.permanent) == ("NoMatchingGPU", False)


def test_forced_profile():
    sel = select_profile(TABLE, mode="multi", requested="SRV_48G", nodes=[H100], facts=QWEN14, variants=BOTH)
    assert sel.forced and sel.profile.name == "SRV_48G"
    sel = select_profile(TABLE, mode="multi", requested="SINGLE_32G", nodes=[RTX5090], facts=QWEN14)
    assert sel.mode == "single"  # the forced profile's mode wins
    # forced on the node where it needs the fewest GPUs
    sel = select_profile(TABLE, mode="multi", requested="SRV_MULTI_80G", nodes=[H100x8, H100x2], facts=QWEN14)
    assert (sel.gpu_count, sel.node) == (2, H100x2)


@pytest.mark.parametrize("requested, nodes, variants, reason, permanent", [
    ("SRV_80G", [RTX5090], BOTH, "NoMatchingGPU", False),
    ("BOGUS", [H100], BOTH, "UnknownProfile", True),
    ("DEV_32G", [RTX5090], frozenset({"bf16"}), "MissingWeightVariant", True),
])
def test_forced_profile_refusals(requested, nodes, variants, reason, permanent):
    with pytest.raises(NoFit) as err:
        select_profile(TABLE, mode="multi", requested=requested, nodes=nodes, facts=QWEN14, variants=variants)
    assert (err.value.reason, err.value.permanent) == (reason, permanent)


def test_forced_profile_whose_weights_cannot_fit_is_refused_with_the_estimate():
    qwen32, llama70 = CATALOG.lookup("qwen3-32b"), CATALOG.lookup("llama-3.1-70b")
    # SRV_80G runs on one GPU: 70B's 131 GiB of weights never fit one 80 GB card
    for nodes in ([H100], []):
        with pytest.raises(NoFit) as err:
            select_profile(TABLE, mode="multi", requested="SRV_80G", nodes=nodes, facts=llama70)
        assert (err.value.reason, err.value.permanent) == ("InsufficientGPUMemory", True)
        assert err.value.fit is not None and not err.value.fit.fits
    # SINGLE_32G spans up to 8 cards: on a node with one it waits for a node with two
    with pytest.raises(NoFit) as err:
        select_profile(TABLE, mode="single", requested="SINGLE_32G", nodes=[RTX5090], facts=qwen32)
    assert (err.value.reason, err.value.permanent) == ("NoMatchingGPU", False)
    assert "needs 4 GPUs of 32607 MiB on one node" in err.value.message  # 2 cannot hold it, 3 splits no heads


def test_model_context_shorter_than_profile_cuts_max_model_len_and_input_limit():
    mistral = default_catalog().lookup("mistral-7b")
    short = mistral.model_copy(update={"max_context": 8192})
    sel = select_profile(TABLE, mode="multi", nodes=[H100], facts=short, variants=BOTH)
    assert sel.max_model_len == 8192
    assert sel.limits.max_input_tokens == 8192 - 256
    assert TABLE.get("SRV_80G").limits.max_input_tokens == 16128  # the table itself is untouched


def test_catalog_lookup_by_alias_and_variant():
    cat = default_catalog()
    assert cat.lookup("QWEN3-14B") == QWEN14
    assert cat.lookup("Qwen/Qwen3-14B-GPTQ-Int4") == QWEN14
    assert cat.lookup("unknown/model") is None
