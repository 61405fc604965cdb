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

def test_table_has_the_five_design_profiles():
    assert TABLE.names == ["SINGLE_32G", "DEV_32G", "SRV_48G", "SRV_80G", "SRV_MULTI_80G"]
    assert [p.engine.max_model_len for p in TABLE.profiles] == [3072, 4096, 8192, 16384, 16384]
    assert all(p.engine.kv_cache_dtype == "fp8" for p in TABLE.profiles)
    assert TABLE.get("SINGLE_32G").engine.gpu_memory_utilization == 0.95
    assert {p.engine.gpu_memory_utilization for p in TABLE.profiles[1:]} == {0.92}
    assert TABLE.get("DEV_32G").weights == "int4"
    assert TABLE.get("SINGLE_32G").limits.rate_qps is None and TABLE.get("SINGLE_32G").limits.queue_size == 1
    assert [p.limits.degraded_max_output_tokens for p in TABLE.profiles[1:]] == [128] * 4


def _write(tmp_path, data):
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _raw():
    return yaml.safe_load(DEFAULT_TABLE.read_text())


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["profiles"][1]["engine"].update(max_model_len="big"),
     "profiles[1](DEV_32G).engine.max_model_len"),
    (lambda d: d["profiles"][2]["limits"].update(rate_qsp=3),
     "profiles[2](SRV_48G).limits.rate_qsp: Extra inputs are not permitted"),
    (lambda d: d["profiles"][0].update(mode="solo"), "profiles[0](SINGLE_32G).mode"),
    (lambda d: d["profiles"][3]["engine"].update(gpu_memory_utilization=1.5),
     "profiles[3](SRV_80G).engine.gpu_memory_utilization"),
    (lambda d: d["profiles"][4]["limits"].update(max_input_tokens=20000), "exceeds engine.max_model_len 16384"),
    (lambda d: d["profiles"][1]["limits"].update(degraded_max_output_tokens=999),
     "degraded_max_output_tokens must not exceed"),
    (lambda d: d["profiles"].append(copy.deepcopy(d["profiles"][0])), "duplicate profile names: SINGLE_32G"),
    (lambda d: d["profiles"][1]["engine"].update(kv_cache_dtype="fp4"), "kv_cache_dtype 'fp4' missing"),
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


# --- selection ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, nodes, expected, tp", [
    ("single", [RTX5090], "SINGLE_32G", 1),
    ("single", [H100x8], "SINGLE_32G", 1),
    ("multi", [RTX5090], "DEV_32G", 1),
    ("multi", [L40S], "SRV_48G", 1),
    ("multi", [RTX5090, L40S], "SRV_48G", 1),
    ("multi", [H100], "SRV_80G", 1),
    ("multi", [RTX5090, H100], "SRV_80G", 1),
    ("multi", [H100, H100x2], "SRV_MULTI_80G", 2),
    ("multi", [H100x2, H100x8], "SRV_MULTI_80G", 8),
])
def test_auto_picks_the_best_profile_for_the_mode_that_fits(mode, nodes, expected, tp):
    sel = select_profile(TABLE, mode=mode, nodes=nodes, facts=QWEN14, variants=BOTH)
    assert sel.profile.name == expected
    assert sel.tensor_parallel_size == tp
    assert sel.mode == mode and not sel.forced


def test_auto_prefers_the_smallest_node_that_fits_the_profile():
    big = GpuNode(memory_mib=97871, count=1, name="h200")
    assert select_profile(TABLE, mode="multi", nodes=[big, H100], facts=QWEN14, variants=BOTH).node == H100


def test_tp_divides_the_attention_heads():
    six = GpuNode(memory_mib=81559, count=6, name="six")
    sel = select_profile(TABLE, mode="multi", nodes=[six], facts=QWEN14, variants=BOTH)
    assert sel.profile.name == "SRV_MULTI_80G" and sel.tensor_parallel_size == 5  # 40 heads: 5 divides, 6 not
    sel = select_profile(TABLE, mode="multi", nodes=[six], facts=None, variants=BOTH)
    assert sel.tensor_parallel_size == 6 and "fit not estimated" in sel.notes[0]


def test_without_an_int4_variant_a_32g_card_cannot_serve_multi_user():
    with pytest.raises(NoFit) as err:
        select_profile(TABLE, mode="multi", nodes=[RTX5090], facts=QWEN14, variants=frozenset({"bf16"}))
    assert err.value.reason == "NoMatchingGPU" and not err.value.permanent


def test_auto_skips_profiles_whose_weights_do_not_fit():
    qwen32 = default_catalog().lookup("qwen3-32b")  # 61 GiB of bf16: not on a 48 GB card
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
    qwen32 = default_catalog().lookup("qwen3-32b")
    for nodes in ([RTX5090], []):
        with pytest.raises(NoFit) as err:
            select_profile(TABLE, mode="single", requested="SINGLE_32G", nodes=nodes, facts=qwen32)
        assert (err.value.reason, err.value.permanent) == ("InsufficientGPUMemory", True)
        assert err.value.fit is not None and not err.value.fit.fits


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
