"""The vLLM command line the operator generates, sim knobs from flags and environment, and the KV budget."""
import pytest

from cxygpt_profiles import GpuNode, ProfileTableError, default_catalog, default_table, engine_args, select_profile
from cxygpt_profiles.roofline import StepShape
from cxygpt_sim import config as sim_config
from cxygpt_sim.config import ConfigError, build_parser, parse_config, split_unknown
from cxygpt_sim.speed import GpuSpeed

OPERATOR_ARGS = ["serve", "Qwen/Qwen3-14B", "--served-model-name", "qwen3-14b", "--host", "0.0.0.0", "--port", "8000",
                 "--dtype", "bfloat16", "--kv-cache-dtype", "fp8", "--max-model-len", "16384",
                 "--gpu-memory-utilization", "0.92", "--max-num-seqs", "128", "--tensor-parallel-size", "1"]


def test_the_operators_command_line_runs_unchanged():
    config, ignored = parse_config(OPERATOR_ARGS, env={})
    assert ignored == []
    assert (config.model, config.served_name, config.port, config.max_model_len, config.max_num_seqs) == \
        ("Qwen/Qwen3-14B", "qwen3-14b", 8000, 16384, 128)
    assert "fit estimate" in config.kv_explanation and config.kv_tokens > 16384


def test_engine_args_from_the_profile_library_parse():
    node = GpuNode(memory_mib=81559, count=1, name="n1")
    selection = select_profile(default_table(), mode="multi", nodes=[node],
                               facts=default_catalog().lookup("Qwen/Qwen3-14B"))
    args = engine_args(selection, model="Qwen/Qwen3-14B", served_name="qwen3-14b", port=8000)
    config, ignored = parse_config(["serve", *args], env={})
    assert ignored == [] and config.served_name == "qwen3-14b"
    assert config.max_model_len == selection.max_model_len


def test_unknown_vllm_flags_are_collected_with_their_values_and_later_flags_win():
    config, ignored = parse_config(OPERATOR_ARGS + ["--swap-space", "16", "--enable-chunked-prefill",
                                                    "--long-prefill-token-threshold=512", "--max-num-seqs", "4"],
                                   env={})
    assert ignored == ["--swap-space", "16", "--enable-chunked-prefill", "--long-prefill-token-threshold=512"]
    assert config.max_num_seqs == 4


def test_token_budget_defaults_like_vllms_api_server_and_follows_the_flag():
    def budget(*extra):
        return parse_config(["m", "--max-model-len", "1024", *extra], env={})[0].capacity.max_num_batched_tokens
    assert budget() == 8192  # the default simulated GPU is an H100 80GB
    assert budget("--sim-gpu-memory-mib", "46068") == 2048
    assert budget("--speed-profile", "a100-80g") == 2048  # vLLM keeps the small budget on every A100
    assert budget("--max-num-batched-tokens", "16k") == 16000


def test_prefix_caching_is_on_by_default_and_can_be_turned_off():
    def caching(*extra):
        return parse_config(["m", "--max-model-len", "1024", *extra], env={})[0].capacity.enable_prefix_caching
    assert caching() and caching("--enable-prefix-caching") and not caching("--no-enable-prefix-caching")


def test_model_flag_without_serve_and_positional_wins():
    config, _ = parse_config(["--model", "some/model", "--max-model-len", "4k"], env={})
    assert (config.model, config.served_name, config.max_model_len) == ("some/model", "some/model", 4000)
    config, _ = parse_config(["serve", "positional/model", "--model", "flag/model"], env={})
    assert config.model == "positional/model"


def test_an_unknown_flag_before_model_flag_does_not_eat_the_model():
    config, ignored = parse_config(["--model", "m", "--swap-space", "4", "--max-model-len", "1024"], env={})
    assert (config.model, ignored) == ("m", ["--swap-space", "4"])


def test_served_model_name_takes_several_names():
    config, _ = parse_config(["m", "--served-model-name", "a", "b", "--max-model-len", "1024"], env={})
    assert config.served_model_names == ("a", "b") and config.served_name == "a"


def test_kv_budget_from_blocks_override():
    config, _ = parse_config(["m", "--max-model-len", "1024", "--num-gpu-blocks-override", "100",
                              "--block-size", "32"], env={})
    assert config.kv_tokens == 3200 and config.capacity.kv_blocks == 100


def test_kv_budget_for_an_unknown_model_is_every_sequence_at_full_length():
    config, _ = parse_config(["unknown/model", "--max-model-len", "1024", "--max-num-seqs", "8"], env={})
    assert config.kv_tokens == 8192


def test_kv_budget_grows_with_gpu_memory_and_fp8_and_tensor_parallel():
    def tokens(*extra, env=None):
        return parse_config(["Qwen/Qwen3-8B", "--max-model-len", "8192", *extra], env=env or {})[0].kv_tokens
    base = tokens()
    assert tokens("--kv-cache-dtype", "fp8") > base
    assert tokens("--tensor-parallel-size", "2") > base
    assert tokens("--sim-gpu-memory-mib", "46068") < base
    assert tokens(env={"CXYGPT_SIM_GPU_MEMORY_MIB": "46068"}) == tokens("--sim-gpu-memory-mib", "46068")


def test_a_budget_smaller_than_one_sequence_is_refused():
    with pytest.raises(ConfigError):
        parse_config(["m", "--max-model-len", "4096", "--num-gpu-blocks-override", "10"], env={})


def test_speed_from_flags_then_environment_then_profile():
    config, _ = parse_config(["m", "--max-model-len", "1024"], env={})
    # an uncatalogued model on the default GPU: the reference model's step times measured on an H100
    assert isinstance(config.speed, GpuSpeed) and config.speed.model.source.startswith("silicon")
    config, _ = parse_config(["m", "--max-model-len", "1024", "--ttft-ms", "0", "--itl-ms", "0"], env={})
    assert config.speed.step_s(StepShape(prefill=((5000, 0),), decode_count=3, decode_context=4000)) == 0
    assert config.speed.instant_decode
    env = {"CXYGPT_SIM_TTFT_MS": "250", "CXYGPT_SIM_ITL_MS": "30", "CXYGPT_SIM_SEED": "3",
           "CXYGPT_SIM_SPEED_PROFILE": "rtx5090-32g", "CXYGPT_SIM_TEXT": "echo"}
    config, _ = parse_config(["m", "--max-model-len", "1024", "--itl-ms", "5"], env=env)
    assert (config.speed.ttft_ms, config.speed.itl_ms, config.seed, config.speed_profile, config.text) == \
        (250, 5, 3, "rtx5090-32g", "echo")


def test_bad_environment_values_are_named():
    with pytest.raises(ConfigError, match="CXYGPT_SIM_ITL_MS"):
        parse_config(["m", "--max-model-len", "1024"], env={"CXYGPT_SIM_ITL_MS": "fast"})
    with pytest.raises(ConfigError, match="CXYGPT_SIM_SPEED_PROFILE"):
        parse_config(["m", "--max-model-len", "1024"], env={"CXYGPT_SIM_SPEED_PROFILE": "warp"})


def test_bad_known_flags_exit_like_argparse():
    with pytest.raises(SystemExit):
        parse_config(["m", "--max-num-seqs", "zero"], env={})
    with pytest.raises(SystemExit):
        parse_config(["--port", "1"], env={})  # no model


def test_help_documents_every_sim_knob_and_its_environment_variable():
    help_text = build_parser().format_help()
    for flag in ("--ttft-ms", "--itl-ms", "--speed-profile", "--sim-seed", "--sim-gpu-memory-mib", "--sim-text",
                 "CXYGPT_SIM_TTFT_MS", "CXYGPT_SIM_ITL_MS"):
        assert flag in help_text


def test_split_unknown_keeps_negative_numbers_as_values():
    known, unknown = split_unknown(["m", "--max-model-len", "-1", "--foo", "--bar", "x"], build_parser())
    assert known == ["m", "--max-model-len", "-1"] and unknown == ["--foo", "--bar", "x"]


def test_a_missing_catalog_falls_back_to_full_length_sequences(monkeypatch):
    def unavailable():
        raise ProfileTableError("models.yaml: cannot read: No such file or directory")
    monkeypatch.setattr(sim_config, "default_catalog", unavailable)
    config, _ = parse_config(["Qwen/Qwen3-8B", "--max-model-len", "1024", "--max-num-seqs", "4",
                              "--speed-profile", "fast"], env={})
    assert config.kv_tokens == 4096 and "catalog unavailable" in config.kv_explanation
    # a GPU's speed is the model's on it: without the catalog there is none to give
    with pytest.raises(ConfigError, match="speed profile h100-80g needs .* data: models.yaml: cannot read"):
        parse_config(["Qwen/Qwen3-8B", "--max-model-len", "1024", "--max-num-seqs", "4"], env={})


def test_the_model_load_time_from_the_flag_or_the_environment():
    assert parse_config(["m"], env={})[0].load_s == 0
    assert parse_config(["m"], env={"CXYGPT_SIM_LOAD_S": "2.5"})[0].load_s == 2.5
    assert parse_config(["m", "--sim-load-s", "1"], env={"CXYGPT_SIM_LOAD_S": "2.5"})[0].load_s == 1
    with pytest.raises(ConfigError, match="CXYGPT_SIM_LOAD_S"):
        parse_config(["m"], env={"CXYGPT_SIM_LOAD_S": "-1"})
