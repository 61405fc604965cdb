"""LoRA in the simulator's pure core: vLLM's --max-loras rule, the CPU cache, an adapter's checks, the metric, flags."""
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cxygpt_dev.hub import make_adapter_repo
from cxygpt_sim import adapters, protocol
from cxygpt_sim.adapters import AdapterError, AdapterNotFound
from cxygpt_sim.config import ConfigError, parse_config
from cxygpt_sim.engine import Capacity, Scheduler, Sequence
from cxygpt_sim.lora import BaseLayers, Lora, LoraCache, LoraSettings, admissible
from cxygpt_sim.metrics import MAX_LORA_INFO_SERIES, EngineMetrics
from cxygpt_sim.speed import Speed

STEADY = Speed(ttft_ms=100, itl_ms=10, prefill_ms_per_1k=0, itl_batch_slope=0)
A, B, C = Lora(1, "a", 0.5), Lora(2, "b", 0.25), Lora(3, "c", 0.125)
QWEN3_06B = BaseLayers(layers=28, hidden=1024, q_out=2048, kv_out=1024, intermediate=3072)


def lora_scheduler(max_loras=1, max_cpu_loras=None, overhead=0.0, **capacity) -> Scheduler:
    settings = LoraSettings(max_loras=max_loras, max_lora_rank=16, max_cpu_loras=max_cpu_loras or max_loras,
                            step_overhead=overhead)
    s = Scheduler(Capacity(**{"max_num_seqs": 8, "kv_blocks": 100, **capacity}), STEADY, lora=settings)
    for lora in (A, B, C)[:settings.max_cpu_loras]:
        s.load_lora(lora)
    return s


def seq(name: str, lora: Lora | None, output: int = 5, prompt: int = 4) -> Sequence:
    return Sequence(id=name, prompt_ids=list(range(prompt)), output_tokens=output, arrived=0.0, lora=lora)


def step(s: Scheduler, now: float = 0.0):
    st = s.begin_step(now)
    planned = {q.id: n for q, n in s.scheduled.items()}
    return st, planned, s.end_step(now + st.duration_s)


def test_the_rule_admits_the_base_an_active_adapter_or_one_more_while_under_max_loras():
    assert admissible(None, {1, 2}, 2)
    assert admissible(1, {1, 2}, 2)
    assert admissible(3, {1}, 2)
    assert not admissible(3, {1, 2}, 2)
    assert admissible(1, set(), 1) and not admissible(2, {1}, 1)


def test_a_request_whose_adapter_is_not_active_waits_while_others_pass_it():
    s = lora_scheduler(max_loras=1, max_num_seqs=3)
    for q in (seq("a1", A, output=3), seq("b1", B), seq("base", None), seq("a2", A, output=3), seq("c1", C)):
        s.submit(q)
    _, planned, _ = step(s)
    assert set(planned) == {"a1", "base", "a2"}  # b1 would be a second adapter in the batch; then the slots are full
    assert [q.id for q in s.waiting] == ["b1", "c1"]  # b1 still first in line
    while any(q.lora is A for q in s.running):
        _, planned, _ = step(s)
        assert not {"b1", "c1"} & set(planned)
    _, planned, _ = step(s)
    assert "b1" in planned and "c1" not in planned and [q.id for q in s.waiting] == ["c1"]


def test_max_loras_two_admits_a_second_adapter_not_a_third():
    s = lora_scheduler(max_loras=2, max_cpu_loras=3)
    for q in (seq("a1", A), seq("b1", B), seq("c1", C)):
        s.submit(q)
    _, planned, _ = step(s)
    assert set(planned) == {"a1", "b1"} and [q.id for q in s.waiting] == ["c1"]


def test_a_batch_with_adapters_takes_the_overhead_longer_and_a_base_batch_does_not():
    s = lora_scheduler(max_loras=1, overhead=0.25)
    s.submit(seq("base", None))
    base_step, _, _ = step(s)
    s.submit(seq("a1", A))
    lora_step, _, _ = step(s, 1.0)  # base decodes, a1 prefills: one step of the same shape as the first
    assert base_step.loras == 0 and lora_step.loras == 1
    assert lora_step.duration_s == pytest.approx(base_step.duration_s * 1.25)


def test_the_cpu_cache_evicts_the_least_recently_used_and_a_batch_reads_it_again():
    cache = LoraCache(2)
    assert cache.load(A) == 0.5 and cache.load(B) == 0.25
    assert cache.load(A) == 0.0 and cache.held == [2, 1]  # held: touched, no read
    assert cache.load(C) == 0.125 and cache.held == [1, 3]  # b was the least recently used
    assert cache.use([A, B]) == 0.25 and cache.held == [1, 2]  # b read again, c out
    assert cache.load(A, inplace=True) == 0.5 and cache.held == [2, 1]  # reloaded in place, nothing evicted


def test_a_step_that_needs_an_evicted_adapter_waits_for_reading_it():
    s = lora_scheduler(max_loras=1, max_cpu_loras=1)  # holds a only
    assert s.load_lora(B) == 0.25  # b loaded: a evicted
    s.submit(seq("a1", A))
    st, _, _ = step(s)
    assert st.lora_load_s == 0.5 and st.duration_s == pytest.approx(0.1 + 0.5)
    s.submit(seq("a2", A))
    st, _, _ = step(s, 1.0)
    assert st.lora_load_s == 0.0


def test_slot_memory_counts_every_lora_buffer_of_every_layer():
    # per layer: A of q, k, v, gate, up (in = hidden) and of o (2048), down (3072); B of each module's out features
    per_layer = 5 * 1024 + 2048 + 3072 + 2048 + 1024 + 1024 + 1024 + 3072 * 2 + 1024
    assert QWEN3_06B.slot_bytes(16) == per_layer * 16 * 28 * 2
    # with 2 GPUs the column-parallel A and the row-parallel B are on both
    assert QWEN3_06B.slot_bytes(16, 2) == QWEN3_06B.slot_bytes(16) + (5 * 1024 + 2 * 1024) * 16 * 28 * 2


# --- an adapter's checks, in vLLM's words --------------------------------------------------------------------

CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}


def refusal(check, *args, **kwargs) -> str:
    with pytest.raises(AdapterError) as e:
        check(*args, **kwargs)
    return str(e.value)


def test_the_config_is_refused_as_peft_helper_refuses_it():
    assert adapters.check_config(CONFIG, 16) == 8
    assert refusal(adapters.check_config, {"r": 8}, 16) == \
        "Missing required configuration fields: {'lora_alpha', 'target_modules'}"
    assert refusal(adapters.check_config, {**CONFIG, "r": 0}, 16) == "LoRA rank `r` must be a positive integer, got 0."
    assert refusal(adapters.check_config, {**CONFIG, "r": 32}, 16) == "LoRA rank 32 is greater than max_lora_rank 16."
    assert refusal(adapters.check_config, {**CONFIG, "rank_pattern": {"q_proj": 64}}, 32) == \
        "LoRA rank 64 is greater than max_lora_rank 32."
    assert refusal(adapters.check_config, {**CONFIG, "use_dora": True, "bias": "all", "r": 64}, 16) == \
        "vLLM does not yet support DoRA. LoRA rank 64 is greater than max_lora_rank 16. Adapter bias is not supported."


def tensors(rank: int, modules: dict[str, tuple[int, int]], layers: int = 2) -> dict:
    out = {}
    for layer in range(layers):
        for module, (in_features, out_features) in modules.items():
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            out[f"{prefix}.lora_A.weight"] = [rank, in_features]
            out[f"{prefix}.lora_B.weight"] = [out_features, rank]
    return out


def test_tensors_of_modules_the_base_lacks_are_refused_with_vllms_message():
    bad = tensors(8, {"q_proj": (1024, 2048), "c_attn": (1024, 3072)})
    message = refusal(adapters.check_tensors, "/a", bad, CONFIG, QWEN3_06B)
    assert message == ("While loading /a, expected target modules in {'down_proj', 'gate_proj', 'k_proj', 'o_proj', "
                       "'q_proj', 'up_proj', 'v_proj'} but received ['model.layers.0.self_attn.c_attn', "
                       "'model.layers.0.self_attn.c_attn', 'model.layers.1.self_attn.c_attn', "
                       "'model.layers.1.self_attn.c_attn']. Please verify that the loaded LoRA module is correct")
    assert refusal(adapters.check_tensors, "/a", {"weight": [1]}, CONFIG, None) == "weight is unsupported LoRA weight"


def test_an_adapter_of_a_wider_base_fails_as_its_copy_into_the_slots_does_and_a_narrower_one_loads():
    qwen3_8b = tensors(8, {"q_proj": (4096, 4096), "v_proj": (4096, 1024)})
    assert refusal(adapters.check_tensors, "/a", qwen3_8b, CONFIG, QWEN3_06B) == \
        "The size of tensor a (1024) must match the size of tensor b (4096) at non-singleton dimension 1"
    wide_out = tensors(8, {"q_proj": (1024, 4096)})
    assert refusal(adapters.check_tensors, "/a", wide_out, CONFIG, QWEN3_06B) == \
        "The size of tensor a (2048) must match the size of tensor b (4096) at non-singleton dimension 0"
    adapters.check_tensors("/a", tensors(8, {"q_proj": (896, 896), "down_proj": (2048, 896)}), CONFIG, QWEN3_06B)
    adapters.check_tensors("/a", qwen3_8b, CONFIG, None)  # no facts of the base: names only
    adapters.check_tensors("/a", tensors(8, {"q_proj": (1024, 2048)}, layers=40), CONFIG, QWEN3_06B)


def test_reading_follows_vllms_path_rules_and_reports_what_is_missing(tmp_path):
    good = make_adapter_repo(tmp_path, "t/good", base_model="Qwen/Qwen3-0.6B")
    files = adapters.read("good", str(good), env={})
    assert files.tensor_file == "adapter_model.safetensors" and files.config["r"] == 8
    assert files.weight_bytes == (good / "adapter_model.safetensors").stat().st_size
    assert adapters.check(files, max_lora_rank=16, base=QWEN3_06B) == 8
    with pytest.raises(AdapterNotFound, match=f"Loading lora x failed: No adapter found for {tmp_path}/missing"):
        adapters.read("x", str(tmp_path / "missing"), env={})
    # a Hub id with no HF_ENDPOINT: the simulator never reaches the internet, so it is not found
    with pytest.raises(AdapterNotFound, match="No adapter found for org/repo"):
        adapters.read("x", "org/repo", env={})
    (good / "adapter_model.safetensors").unlink()
    assert refusal(adapters.check, adapters.read("g", str(good), {}), max_lora_rank=16, base=None) == \
        f"{good} doesn't contain tensors"
    (good / "adapter_model.safetensors").write_bytes((2**40).to_bytes(8, "little"))
    assert "HeaderTooLarge" in refusal(adapters.read, "g", str(good), {})
    (good / "adapter_config.json").write_text("[1]")
    assert refusal(adapters.read, "g", str(good), {}) == "list indices must be integers or slices, not str"


# --- vllm:lora_requests_info -------------------------------------------------------------------------------

def lora_info(m: EngineMetrics) -> dict:
    family = next(f for f in text_string_to_metric_families(m.exposition().decode())
                  if f.name == "vllm:lora_requests_info")
    return {(s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"], s.labels["max_lora"]): s.value
            for s in family.samples}


def test_the_metric_lists_adapters_with_output_in_both_labels_its_value_the_time_it_was_set():
    s = lora_scheduler(max_loras=1)
    clock = iter(range(1000, 2000))
    m = EngineMetrics(s, "m", max_loras=1, wall=lambda: next(clock))
    assert lora_info(m) == {}  # no step yet: no series, as vLLM before its first step
    a1, b1 = seq("a1", A, output=3), seq("b1", B, output=2)
    s.submit(a1)
    s.submit(b1)
    now = 0.0
    st = s.begin_step(now)
    m.record_step(st, s.end_step(now + st.duration_s), now)
    # b1 waits for a's slot and has had no output: vLLM has not heard of it yet
    assert lora_info(m) == {("a", "a", "1"): 1000}
    while b1.state != "finished":
        now += 1
        st = s.begin_step(now)
        m.record_step(st, s.end_step(now + st.duration_s), now)
    series = lora_info(m)
    assert set(series) == {("a", "a", "1"), ("", "", "1"), ("b", "b", "1")}
    assert series[("", "", "1")] == max(series.values())  # the newest is the state now: none running


def test_an_aborted_request_leaves_the_metric_and_old_series_are_dropped_past_the_bound():
    s = lora_scheduler(max_loras=1)
    m = EngineMetrics(s, "m", max_loras=1, wall=lambda: 5.0)
    a1 = seq("a1", A, output=10)
    s.submit(a1)
    st = s.begin_step(0.0)
    m.record_step(st, s.end_step(st.duration_s), st.duration_s)
    s.cancel(a1)
    m.record_abort(a1, 1.0)
    assert m.lora_requests == {}
    for i in range(MAX_LORA_INFO_SERIES + 5):
        m.lora_requests = {f"x{i}": {"r"}}
        m._lora_info()
    assert len(lora_info(m)) == MAX_LORA_INFO_SERIES and (f"x{MAX_LORA_INFO_SERIES + 4}",) * 2 + ("1",) in \
        lora_info(m)


def test_without_enable_lora_there_is_no_metric():
    m = EngineMetrics(Scheduler(Capacity(max_num_seqs=2, kv_blocks=10), STEADY), "m")
    assert "lora" not in m.exposition().decode()


# --- the command line and the request bodies -------------------------------------------------------------------

def lora_config(*args, env=None):
    return parse_config(["Qwen/Qwen3-0.6B", "--speed-profile", "instant", *args], env=env or {})[0]


def test_lora_flags_parse_as_vllms_and_fail_as_its_config_does():
    c = lora_config("--enable-lora", "--max-loras", "2", "--max-lora-rank", "64", "--max-cpu-loras", "4",
                    "--lora-modules", "sql=/a/sql", '{"name": "support", "path": "/a/s", "base_model_name": "q"}')
    assert (c.lora.max_loras, c.lora.max_lora_rank, c.lora.max_cpu_loras) == (2, 64, 4)
    assert [(m.name, m.path, m.base_model_name) for m in c.lora_modules] == [("sql", "/a/sql", None),
                                                                             ("support", "/a/s", "q")]
    assert lora_config("--enable-lora").lora.max_cpu_loras == 1  # defaults to --max-loras
    assert lora_config("--enable-lora", "--max-cpu-loras", "0", "--max-loras", "3").lora.max_cpu_loras == 3
    assert lora_config().lora is None
    # vLLM's other LoRA flags take their values only
    c, ignored = parse_config(["--fully-sharded-loras", "Qwen/Qwen3-0.6B", "--lora-target-modules", "o_proj",
                               "qkv_proj", "--lora-dtype", "bfloat16", "--enable-lora"], env={})
    assert (c.model, c.lora.max_loras, ignored) == ("Qwen/Qwen3-0.6B", 1, ["--fully-sharded-loras", "--lora-dtype",
                                                                          "bfloat16"])
    with pytest.raises(ConfigError, match=r"max_cpu_loras \(1\) must be >= max_loras \(2\)\."):
        lora_config("--enable-lora", "--max-loras", "2", "--max-cpu-loras", "1")
    with pytest.raises(ConfigError, match="max_loras"):
        lora_config("--enable-lora", "--max-loras", "0")


def test_bad_lora_flags_exit_with_vllms_parser_errors(capsys):
    for args, message in ((["--max-lora-rank", "24"], "argument --max-lora-rank: invalid choice: 24"),
                          (["--lora-modules", "{bad"], "Invalid JSON format for --lora-modules: {bad"),
                          (["--lora-modules", '{"name": "x"}'], "Invalid fields for --lora-modules: {\"name\": \"x\"} - "
                                                                "LoRAModulePath.__init__() missing 1 required positional "
                                                                "argument: 'path'")):
        with pytest.raises(SystemExit):
            lora_config("--enable-lora", *args)
        assert message in capsys.readouterr().err


def test_runtime_updating_follows_vllms_reading_of_the_variable():
    for value, on in (("True", True), (" 1 ", True), ("true", True), ("yes", False), ("0", False)):
        assert lora_config(env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": value}).runtime_lora_updating is on


def test_adapter_slots_take_kv_cache_and_the_load_rate_defaults_to_the_weights():
    plain, lora = lora_config(), lora_config("--enable-lora", "--max-loras", "4", "--sim-load-gib-per-s", "0.5")
    assert plain.kv_tokens - lora.kv_tokens == -(-4 * QWEN3_06B.slot_bytes(16) // (2 * 28 * 8 * 128 * 2))
    assert "4 LoRA slots of rank 16" in lora.kv_explanation
    assert lora.lora.load_gib_per_s == 0.5 and lora.lora.load_s(2**29) == 1.0
    assert lora_config("--enable-lora", "--sim-lora-load-gib-per-s", "4").lora.load_gib_per_s == 4
    assert lora_config("--enable-lora", env={"CXYGPT_SIM_LORA_STEP_OVERHEAD": "0.5"}).lora.step_overhead == 0.5


def test_load_and_unload_bodies_are_checked_as_vllms_request_models():
    served = protocol.Served(("base",), frozenset({"a"}))
    assert protocol.parse_load_lora({"lora_name": "b", "lora_path": "/p", "load_inplace": "yes"}, served) == \
        protocol.LoadLora("b", "/p", True)
    for body, status, message in (
            ({"lora_name": "", "lora_path": "/p"}, 400, "Both 'lora_name' and 'lora_path' must be provided."),
            ({"lora_name": "base", "lora_path": "/p"}, 400, "The lora adapter 'base' conflicts with a served base "
                                                             "model."),
            ({"lora_name": "a", "lora_path": "/p"}, 400, "The lora adapter 'a' has already been loaded. If you want "
                                                          "to load the adapter in place, set 'load_inplace' to True."),
            ({"lora_name": "b", "lora_path": "/p", "load_inplace": [1]}, 400,
             "1 validation error:\n  {'type': 'bool_type', 'loc': 'body.load_inplace', 'msg': 'Input should be a "
             "valid boolean', 'input': '<list of 1 items>'}"),
            ({"lora_name": "x" * 300, "lora_path": "/p"}, 400, "lora_name is 300 characters long, over the "
                                                                "simulator's bound of 256")):
        with pytest.raises(protocol.ApiError) as e:
            protocol.parse_load_lora(body, served)
        assert (e.value.status, e.value.message) == (status, message)
    assert protocol.parse_load_lora({"lora_name": "a", "lora_path": "/q", "load_inplace": True}, served).path == "/q"
    assert protocol.parse_unload_lora({"lora_name": "a", "lora_int_id": 3}, served) == "a"
    with pytest.raises(protocol.ApiError) as e:
        protocol.parse_unload_lora({"lora_name": "b"}, served)
    assert (e.value.status, e.value.err_type, e.value.message) == (404, "NotFoundError",
                                                                   "The lora adapter 'b' cannot be found.")


def test_requests_may_name_adapters_but_a_404_lists_the_base_names_only():
    served = protocol.Served(("base", "alias"), frozenset({"a"}))
    g = protocol.parse_chat({"model": "a", "messages": [{"role": "user", "content": "hi"}]}, served)
    assert g.model == "a"
    with pytest.raises(protocol.ApiError) as e:
        protocol.parse_completion({"model": "b", "prompt": "x"}, served)
    assert e.value.message == "The model `b` does not exist. Valid aliases: base, alias."


def test_vllms_sanitizing_hides_paths_under_system_folders_and_files():
    assert protocol.sanitize_message("No adapter found for /tmp/x/y") == "No adapter found for <path>"
    assert protocol.sanitize_message("While loading /data/a/adapter.json x") == "While loading <path> x"
    assert protocol.sanitize_message("No adapter found for /models/sql") == "No adapter found for /models/sql"


def test_a_written_stand_in_has_the_shapes_of_its_base(tmp_path):
    repo = make_adapter_repo(tmp_path, "t/s", base_model="Qwen/Qwen3-0.6B", rank=16,
                             target_modules=("q_proj", "k_proj", "down_proj"))
    config = json.loads((repo / "adapter_config.json").read_text())
    assert (config["r"], config["base_model_name_or_path"], config["peft_type"]) == (16, "Qwen/Qwen3-0.6B", "LORA")
    shapes = adapters.read("s", str(repo), {}).tensors
    assert len(shapes) == 28 * 3 * 2
    assert shapes["base_model.model.model.layers.27.mlp.down_proj.lora_A.weight"] == [16, 3072]
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == [1024, 16]


def test_an_absolute_path_is_read_where_the_dev_kubelet_mounted_it():
    from cxygpt_sim.adapters import MOUNTS_ENV, resolve
    env = {MOUNTS_ENV: '{"/models/adapters/loras": "/srv/claims/loras", "/models": "/srv/pod"}'}
    assert resolve("/models/adapters/loras/sql", env) == "/srv/claims/loras/sql"  # the longest mount
    assert resolve("/models/other", env) == "/srv/pod/other"
    assert resolve("/models-x/sql", env) == "/models-x/sql"  # not under a mount
    assert resolve("/models/adapters/loras/sql", {}) == "/models/adapters/loras/sql"  # vLLM's own: as it is
    assert resolve("/a", {MOUNTS_ENV: "[1]"}) == resolve("/a", {MOUNTS_ENV: "{"}) == "/a"
