"""The vLLM command line plus the simulator's own knobs, parsed (pure) into a SimConfig and a KV budget."""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cxygpt_profiles import ModelFacts, ProfileTableError, default_catalog, default_table, estimate_fit
from cxygpt_profiles.fit import kv_bytes_per_token
from cxygpt_profiles.gpus import default_gpus, vllm_token_budget
from cxygpt_profiles.roofline import Workload
from cxygpt_profiles.speed import step_model

from .engine import Capacity
from .lora import DEFAULT_STEP_OVERHEAD, MAX_LORA_RANKS, BaseLayers, LoraSettings
from .speed import DEFAULT_SPEED_PROFILE, REFERENCE_MODEL, TEST_PROFILES, GpuSpeed, Speed, knob_base
from .text import DEFAULT_VOCAB_SIZE
from .weights import DEFAULT_LOAD_GIB_PER_S

DEFAULT_GPU_MEMORY_MIB = 81559  # an H100 80GB as GPU Feature Discovery reports it (a test profile's GPU)
DEFAULT_MAX_MODEL_LEN = 8192    # when neither the flag nor the model catalog says

# Simulator knob -> environment variable, so a Deployment can set speed without touching the vLLM args.
ENV = {
    "speed_profile": "CXYGPT_SIM_SPEED_PROFILE",
    "ttft_ms": "CXYGPT_SIM_TTFT_MS",
    "itl_ms": "CXYGPT_SIM_ITL_MS",
    "prefill_ms_per_1k": "CXYGPT_SIM_PREFILL_MS_PER_1K",
    "itl_batch_slope": "CXYGPT_SIM_ITL_BATCH_SLOPE",
    "context_ms_per_1k": "CXYGPT_SIM_CONTEXT_MS_PER_1K",
    "jitter": "CXYGPT_SIM_JITTER",
    "sim_seed": "CXYGPT_SIM_SEED",
    "gpu_memory_mib": "CXYGPT_SIM_GPU_MEMORY_MIB",
    "text": "CXYGPT_SIM_TEXT",
    "load_gib_per_s": "CXYGPT_SIM_LOAD_GIB_PER_S",
    "load_s": "CXYGPT_SIM_LOAD_S",
    "lora_load_gib_per_s": "CXYGPT_SIM_LORA_LOAD_GIB_PER_S",
    "lora_step_overhead": "CXYGPT_SIM_LORA_STEP_OVERHEAD",
}
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's switch for the load/unload endpoints
MAX_ADAPTERS = 1024  # adapters loaded at once (vLLM has no bound; each is a /v1/models entry)

# vLLM flags of this shape take no value; any other unknown flag followed by a non-flag takes that value.
_BOOLEAN_FLAG = re.compile(r"--(enable|disable|no)-[\w-]+|--(trust-remote-code|enforce-eager|"
                           r"skip-tokenizer-init|async-scheduling|tokens-only|fully-sharded-loras)")


@dataclass(frozen=True)
class LoRAModulePath:
    """One of --lora-modules: `name=path`, or JSON with base_model_name (vLLM's LoRAModulePath)."""
    name: str
    path: str
    base_model_name: str | None = None
    is_3d_lora_weight: bool = False


@dataclass(frozen=True)
class SimConfig:
    model: str
    served_model_names: tuple[str, ...]
    host: str
    port: int
    max_model_len: int
    max_num_seqs: int
    kv_tokens: int
    kv_explanation: str
    block_size: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    vocab_size: int
    api_key: str | None
    shutdown_timeout: float
    speed: Speed | GpuSpeed
    speed_profile: str
    seed: int | None
    text: str
    runner: str = "generate"  # "pooling": an embedding model (/v1/embeddings instead of generation)
    revision: str | None = None
    load_gib_per_s: float = DEFAULT_LOAD_GIB_PER_S
    load_s: float = 0.0       # the rest of a start after the weights, before the server listens (vLLM: CUDA graphs)
    lora: LoraSettings | None = None          # --enable-lora's limits and costs; None: LoRA off
    lora_modules: tuple[LoRAModulePath, ...] = ()
    runtime_lora_updating: bool = False       # VLLM_ALLOW_RUNTIME_LORA_UPDATING: the load/unload endpoints
    lora_base: BaseLayers | None = None       # the base's layers, to check an adapter's tensors against

    @property
    def served_name(self) -> str:
        return self.served_model_names[0]

    @property
    def capacity(self) -> Capacity:
        return Capacity(max_num_seqs=self.max_num_seqs, kv_blocks=self.kv_tokens // self.block_size,
                        block_size=self.block_size, max_num_batched_tokens=self.max_num_batched_tokens,
                        enable_prefix_caching=self.enable_prefix_caching)


class ConfigError(ValueError):
    """A command line the simulator cannot run with (vLLM would refuse it too)."""


def human_readable_int(value: str) -> int:
    """vLLM's spelling of sizes: 16384, 16k (x1000) or 16K (x1024)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG]?)", value.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {value!r} (use e.g. 16384, 16k or 16K)")
    number, suffix = float(m.group(1)), m.group(2)
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}[suffix]
    return int(number * scale)


def _max_model_len(value: str) -> int | None:
    if value.strip() in ("-1", "auto"):
        return None  # vLLM: the model's own maximum
    return human_readable_int(value)


def _positive(kind):
    def parse(value: str):
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        return number
    return parse


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return number


class LoraModulesAction(argparse.Action):
    """vLLM's LoRAParserAction: `name=path` (no comma), else a JSON object of LoRAModulePath's fields."""

    def __call__(self, parser, namespace, values, option_string=None):
        modules = []
        for item in values or []:
            if not item:
                continue
            if "=" in item and "," not in item:
                name, path = item.split("=", 1)
                modules.append(LoRAModulePath(name, path))
                continue
            try:
                modules.append(LoRAModulePath(**json.loads(item)))
            except json.JSONDecodeError:
                parser.error(f"Invalid JSON format for --lora-modules: {item}")
            except TypeError as e:
                parser.error(f"Invalid fields for --lora-modules: {item} - {e}")
        setattr(namespace, self.dest, modules)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxygpt-sim",
        usage="cxygpt-sim [serve] [model_tag] [options]",
        description="vLLM-compatible engine simulator: vLLM's command line and OpenAI HTTP API, no GPU. "
                    "Other vLLM flags are accepted and ignored with one warning line.",
        epilog="speed profiles: a GPU's (profiles/gpus.yaml): step times measured on it for the served model "
               "(AIConfigurator's database, profiles/speeds.json) or a fitted roofline; an uncatalogued model runs "
               f"at {REFERENCE_MODEL}'s speed. Test profiles, on no GPU: " + "; ".join(
                   f"{name} (ttft {s.ttft_ms:g} ms, itl {s.itl_ms:g} ms)" for name, s in TEST_PROFILES.items()))
    v = p.add_argument_group("vLLM flags the simulator models")
    v.add_argument("model_tag", nargs="?", help="model (vLLM's positional; wins over --model)")
    v.add_argument("--model", default=None)
    v.add_argument("--served-model-name", nargs="+", default=None,
                   help="names the API answers to; the first is reported (default: the model)")
    v.add_argument("--runner", choices=("auto", "generate", "pooling"), default="auto",
                   help="pooling: serve the model as an embedding model (vLLM >= 0.10); auto and generate: text")
    v.add_argument("--convert", choices=("auto", "none", "embed"), default="auto",
                   help="embed: adapt the model to embeddings, which implies --runner pooling")
    v.add_argument("--revision", default=None, help="the Hub revision a downloaded model is pinned to")
    v.add_argument("--host", default="0.0.0.0", help="default 0.0.0.0")
    v.add_argument("--port", type=int, default=8000, help="default 8000")
    v.add_argument("--api-key", default=None, help="require this bearer token on /v1 routes")
    v.add_argument("--dtype", default="auto")
    v.add_argument("--kv-cache-dtype", default="auto")
    v.add_argument("--quantization", "-q", default=None, help="any value means 4-bit weights for the fit")
    v.add_argument("--max-model-len", type=_max_model_len, default=None,
                   help="16384, 16k or 16K; default: the model's context from the catalog, else "
                        f"{DEFAULT_MAX_MODEL_LEN}")
    v.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="default 0.9")
    v.add_argument("--tensor-parallel-size", "-tp", type=_positive(int), default=1)
    v.add_argument("--pipeline-parallel-size", "-pp", type=_positive(int), default=1)
    v.add_argument("--max-num-seqs", type=_positive(int), default=256, help="running slots; default 256")
    v.add_argument("--block-size", type=_positive(int), default=16, help="KV block size in tokens; default 16")
    v.add_argument("--max-num-batched-tokens", type=human_readable_int, default=None,
                   help="tokens one engine step may compute (decode tokens first, then prefill chunks); default "
                        "as vLLM's API server: 8192 on a GPU of 70 GiB or more that is not an A100, else 2048")
    v.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of equal prompt prefixes (hashed blocks); on by default as in vLLM V1")
    v.add_argument("--num-gpu-blocks-override", type=_positive(int), default=None,
                   help="KV budget = this x block size (else the fit estimate for the model)")
    v.add_argument("--seed", type=int, default=None, help="accepted; the simulator's seed is --sim-seed")
    v.add_argument("--shutdown-timeout", type=_non_negative, default=0,
                   help="seconds in-flight requests may finish after SIGTERM; default 0 (abort them)")
    v.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="serve LoRA adapters (--lora-modules, and the load/unload endpoints when "
                        f"{RUNTIME_LORA_ENV}=True)")
    v.add_argument("--max-loras", type=int, default=1,
                   help="distinct adapters in one batch; a request for another waits; default 1")
    v.add_argument("--max-lora-rank", type=int, choices=MAX_LORA_RANKS, default=16,
                   help="largest adapter rank it loads; default 16")
    v.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in CPU memory, least recently used evicted (read again from disk when a "
                        "batch needs it); default --max-loras")
    v.add_argument("--lora-target-modules", nargs="+", default=None, metavar="MODULE",
                   help="accepted; every module an adapter has runs")
    v.add_argument("--lora-modules", nargs="+", action=LoraModulesAction, default=None, metavar="MODULE",
                   help="adapters loaded at start: name=path, or JSON "
                        '\'{"name": ..., "path": ..., "base_model_name": ...}\'')
    s = p.add_argument_group("simulator knobs (flag > environment variable > speed profile); any of --ttft-ms, "
                             "--itl-ms, --sim-prefill-ms-per-1k, --sim-itl-batch-slope, --sim-context-ms-per-1k "
                             "turns a GPU profile into its knobs' shape with those replaced")
    s.add_argument("--speed-profile", default=None, metavar="{" + ",".join(speed_profiles()) + "}",
                   help=f"[{ENV['speed_profile']}] step timings; default {DEFAULT_SPEED_PROFILE}")
    s.add_argument("--ttft-ms", type=_non_negative, default=None,
                   help=f"[{ENV['ttft_ms']}] first-token time of a short prompt on an idle engine")
    s.add_argument("--itl-ms", type=_non_negative, default=None,
                   help=f"[{ENV['itl_ms']}] decode step time with one running sequence; 0 = instant")
    s.add_argument("--sim-prefill-ms-per-1k", type=_non_negative, default=None,
                   help=f"[{ENV['prefill_ms_per_1k']}] extra prefill per 1000 prompt tokens "
                        "(scales with --ttft-ms when unset)")
    s.add_argument("--sim-itl-batch-slope", type=_non_negative, default=None,
                   help=f"[{ENV['itl_batch_slope']}] decode step grows by this fraction per extra running sequence")
    s.add_argument("--sim-context-ms-per-1k", type=_non_negative, default=None,
                   help=f"[{ENV['context_ms_per_1k']}] extra step time per 1000 tokens of context the step's "
                        "sequences attend to (scales with --itl-ms when unset)")
    s.add_argument("--sim-jitter", type=_non_negative, default=None,
                   help=f"[{ENV['jitter']}] each step varies by up to ± this fraction")
    s.add_argument("--sim-seed", type=int, default=None,
                   help=f"[{ENV['sim_seed']}] seed for jitter and reply text, for deterministic runs")
    s.add_argument("--sim-gpu-memory-mib", type=_positive(int), default=None,
                   help=f"[{ENV['gpu_memory_mib']}] simulated memory per GPU for the KV budget; default the "
                        f"speed profile's GPU's (a test profile's: {DEFAULT_GPU_MEMORY_MIB})")
    s.add_argument("--sim-load-gib-per-s", type=_non_negative, default=None,
                   help=f"[{ENV['load_gib_per_s']}] the rate the weights are read at before serving (a model "
                        "directory's safetensors, or what was downloaded from $HF_ENDPOINT); default 2, 0 = instant")
    s.add_argument("--sim-text", choices=("corpus", "echo"), default=None,
                   help=f"[{ENV['text']}] reply with corpus sentences or echo the prompt; default corpus")
    s.add_argument("--sim-load-s", type=_non_negative, default=None,
                   help=f"[{ENV['load_s']}] seconds the model load takes before the server listens, as vLLM "
                        "loads weights first (a cold start); default 0")
    s.add_argument("--sim-lora-load-gib-per-s", type=_non_negative, default=None,
                   help=f"[{ENV['lora_load_gib_per_s']}] the rate an adapter's weights are read at when it is loaded "
                        "(the engine's steps wait meanwhile, as vLLM's do); default --sim-load-gib-per-s, 0 = instant")
    s.add_argument("--sim-lora-step-overhead", type=_non_negative, default=None,
                   help=f"[{ENV['lora_step_overhead']}] a step whose batch runs adapters takes this fraction longer; "
                        f"default {DEFAULT_STEP_OVERHEAD} (vLLM's TPOT with an adapter over the base model's)")
    return p


def split_unknown(argv: Sequence[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Separate flags the parser does not know (with their values) so a positional model is never eaten."""
    known_flags = {o for a in parser._actions for o in a.option_strings}
    known, unknown = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("-") and name not in known_flags and not re.fullmatch(r"-\d.*", arg):
            unknown.append(arg)
            takes_value = "=" not in arg and not _BOOLEAN_FLAG.fullmatch(name)
            if takes_value and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                unknown.append(argv[i + 1])
                i += 1
        else:
            known.append(arg)
        i += 1
    return known, unknown


def _env_value(env: Mapping[str, str], key: str, parse):
    raw = env.get(ENV[key])
    if raw is None or raw == "":
        return None
    try:
        return parse(raw)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{ENV[key]}={raw!r}: {e}") from None


@dataclass(frozen=True)
class KvBudget:
    max_model_len: int
    tokens: int
    vocab_size: int
    explanation: str
    repo: str | None = None           # the catalogued model, when it is one
    facts: ModelFacts | None = None
    weights: str = "bf16"
    kv_cache_dtype: str = "auto"
    layers: BaseLayers | None = None  # the catalogued model's LoRA-able layers


def _catalog():
    """The model catalog and fit constants, or the reason they cannot be loaded (the sim then still serves)."""
    try:
        return default_catalog(), default_table().fit, ""
    except ProfileTableError as e:
        return None, None, f"model catalog unavailable ({e})"


def base_layers(entry) -> BaseLayers:
    """A catalogued model's LoRA-able layers; a missing intermediate size from its parameter count."""
    q_out, kv_out = entry.attention_heads * entry.head_dim, entry.kv_heads * entry.head_dim
    intermediate = entry.intermediate_size
    if intermediate is None:
        embedding = entry.vocab_size * entry.hidden_size * (1 if entry.tied_embeddings else 2)
        attention = entry.hidden_size * (2 * q_out + 2 * kv_out)
        intermediate = max((entry.parameters - embedding) // entry.layers - attention, 0) // (3 * entry.hidden_size)
    return BaseLayers(entry.layers, entry.hidden_size, q_out, kv_out, max(intermediate, 1))


def kv_budget(*, model: str, served_name: str, max_model_len: int | None, dtype: str, quantization: str | None,
              kv_cache_dtype: str, gpu_memory_utilization: float, gpu_count: int, gpu_memory_mib: int,
              max_num_seqs: int, block_size: int, num_gpu_blocks_override: int | None,
              lora_slots: tuple[int, int, int] | None = None) -> KvBudget:
    """vLLM's --num-gpu-blocks-override, else the VRAM fit estimate for a catalogued model (less what the adapter
    slots of lora_slots = (max_loras, max_lora_rank, tensor parallel size) take), else room for every sequence at
    full length."""
    catalog, consts, problem = _catalog()
    # a local directory (a cache's <mount>/<Org>/<Name>) is looked up by its last two parts too
    keys = (model, "/".join(model.rstrip("/").split("/")[-2:]), served_name)
    found = catalog.entry(*keys) if catalog else None
    facts = catalog.lookup(*keys) if catalog else None
    if max_model_len is None:
        max_model_len = facts.max_context if facts else DEFAULT_MAX_MODEL_LEN
    vocab_size = facts.vocab_size if facts else DEFAULT_VOCAB_SIZE
    variant_int4 = found is not None and found[1].variants.get("int4", "").lower() in (keys[0].lower(), keys[1].lower())
    weights = "int4" if quantization or variant_int4 else "bf16"
    kv_dtype = kv_cache_dtype if consts and kv_cache_dtype in consts.kv_bytes_per_element else "auto"
    layers = base_layers(found[1]) if found else None
    budget = functools.partial(KvBudget, repo=found[0] if found else None, facts=facts, weights=weights,
                               kv_cache_dtype=kv_dtype, layers=layers)
    if num_gpu_blocks_override:
        return budget(max_model_len, num_gpu_blocks_override * block_size, vocab_size,
                        f"--num-gpu-blocks-override {num_gpu_blocks_override} x --block-size {block_size}")
    if facts is None:
        reason = problem or f"model {model!r} is not in the catalog"
        return budget(max_model_len, max_num_seqs * max_model_len, vocab_size,
                        f"{reason}: --max-num-seqs {max_num_seqs} x --max-model-len {max_model_len}")
    fit = estimate_fit(facts, weights=weights, kv_cache_dtype=kv_dtype, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory_utilization, gpu_memory_mib=gpu_memory_mib,
                       gpu_count=gpu_count, consts=consts)
    tokens = fit.kv_token_capacity
    note = (f"fit estimate on {gpu_count}x{gpu_memory_mib} MiB ({dtype}, {weights} weights, kv {kv_dtype}): "
            f"{fit.message}")
    if lora_slots and layers:
        max_loras, rank, tp = lora_slots
        slots = max_loras * layers.slot_bytes(rank, tp)
        fewer = -(-slots // kv_bytes_per_token(facts, kv_dtype, consts))
        tokens = max(tokens - fewer, 0)
        note += f"; {max_loras} LoRA slots of rank {rank} take {slots / 2**20:.0f} MiB: {fewer} tokens fewer"
    if not fit.fits:
        # vLLM would refuse to start; the simulator keeps serving so demos and tests still run
        tokens = max(tokens, max_model_len)
        note += f"; WOULD NOT FIT on real GPUs, budget raised to max-model-len {max_model_len}"
    return budget(max_model_len, tokens, vocab_size, note)


def speed_profiles() -> list[str]:
    """The test profiles, then every GPU of the GPU table (none if it cannot be loaded: then only the tests')."""
    try:
        gpus = sorted(default_gpus().gpus)
    except ProfileTableError:
        gpus = []
    return [*TEST_PROFILES, *gpus]


def engine_speed(profile: str, budget: KvBudget, tp: int, knobs: dict, jitter: float | None) -> Speed | GpuSpeed:
    """A test profile's knobs; else the GPU's step model for the served model (an uncatalogued one at the
    reference model's speed), or, when knobs are given, the knobs' shape of that model with them replaced."""
    if profile in TEST_PROFILES:
        return TEST_PROFILES[profile].with_overrides(**knobs, jitter=jitter)
    try:
        catalog, consts = default_catalog(), default_table().fit
        repo, facts = (budget.repo, budget.facts) if budget.facts else (REFERENCE_MODEL,
                                                                        catalog.lookup(REFERENCE_MODEL))
        if facts is None:
            raise ProfileTableError(f"the reference model {REFERENCE_MODEL} is not in the catalog")
        workload = Workload(facts, budget.weights, budget.kv_cache_dtype, tp, consts)
        model = step_model(profile, workload, repo)
    except ProfileTableError as e:
        raise ConfigError(f"speed profile {profile} needs the GPU, speed and model data: {e}") from None
    if any(v is not None for v in knobs.values()):
        return knob_base(model).with_overrides(**knobs, jitter=jitter)
    return GpuSpeed(model, jitter=jitter or 0.0)


def parse_config(argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[SimConfig, list[str]]:
    """SimConfig and the ignored vLLM flags; argparse exits on bad known flags like vLLM does."""
    env = os.environ if env is None else env
    argv = list(argv)
    if argv and argv[0] == "serve":
        argv = argv[1:]
    parser = build_parser()
    known, unknown = split_unknown(argv, parser)
    a = parser.parse_args(known)
    model = a.model_tag or a.model
    if not model:
        parser.error("a model is required (positional model_tag or --model)")
    served = tuple(a.served_model_name or [model])

    def knob(key: str, given, parse=_non_negative):
        return given if given is not None else _env_value(env, key, parse)

    profile = a.speed_profile or _env_value(env, "speed_profile", str) or DEFAULT_SPEED_PROFILE
    profiles = speed_profiles()
    if profile not in profiles:
        raise ConfigError(f"{ENV['speed_profile']}={profile!r}: choose one of {', '.join(profiles)}")
    # a GPU profile's memory unless told otherwise: the KV budget of the GPU whose speed it has
    profile_memory = DEFAULT_GPU_MEMORY_MIB if profile in TEST_PROFILES else default_gpus().gpus[profile].memory_mib
    gpu_memory_mib = knob("gpu_memory_mib", a.sim_gpu_memory_mib, _positive(int)) or profile_memory
    lora = lora_settings(a, env) if a.enable_lora else None
    budget = kv_budget(
        model=model, served_name=served[0], max_model_len=a.max_model_len, dtype=a.dtype,
        quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype,
        gpu_memory_utilization=a.gpu_memory_utilization,
        gpu_count=a.tensor_parallel_size * a.pipeline_parallel_size, gpu_memory_mib=gpu_memory_mib,
        max_num_seqs=a.max_num_seqs, block_size=a.block_size, num_gpu_blocks_override=a.num_gpu_blocks_override,
        lora_slots=(lora.max_loras, lora.max_lora_rank, a.tensor_parallel_size) if lora else None)
    if budget.tokens // a.block_size * a.block_size < budget.max_model_len:
        raise ConfigError(f"KV budget of {budget.tokens} tokens cannot hold one sequence of max-model-len "
                          f"{budget.max_model_len}; raise --num-gpu-blocks-override")
    max_num_batched_tokens = a.max_num_batched_tokens or vllm_token_budget(gpu_memory_mib, a100="a100" in profile)
    if max_num_batched_tokens <= 0:
        raise ConfigError(f"--max-num-batched-tokens must be positive, got {max_num_batched_tokens}")
    knobs = dict(ttft_ms=knob("ttft_ms", a.ttft_ms), itl_ms=knob("itl_ms", a.itl_ms),
                 prefill_ms_per_1k=knob("prefill_ms_per_1k", a.sim_prefill_ms_per_1k),
                 itl_batch_slope=knob("itl_batch_slope", a.sim_itl_batch_slope),
                 context_ms_per_1k=knob("context_ms_per_1k", a.sim_context_ms_per_1k))
    speed = engine_speed(profile, budget, a.tensor_parallel_size, knobs, knob("jitter", a.sim_jitter))
    load_rate = knob("load_gib_per_s", a.sim_load_gib_per_s)
    text = a.sim_text or _env_value(env, "text", str) or "corpus"
    if text not in ("corpus", "echo"):
        raise ConfigError(f"{ENV['text']}={text!r}: choose corpus or echo")
    config = SimConfig(
        model=model, served_model_names=served, host=a.host, port=a.port, max_model_len=budget.max_model_len,
        max_num_seqs=a.max_num_seqs, kv_tokens=budget.tokens, kv_explanation=budget.explanation,
        block_size=a.block_size, max_num_batched_tokens=max_num_batched_tokens,
        enable_prefix_caching=a.enable_prefix_caching, vocab_size=budget.vocab_size, api_key=a.api_key,
        shutdown_timeout=a.shutdown_timeout, speed=speed,
        speed_profile=profile, seed=knob("sim_seed", a.sim_seed, int), text=text,
        runner="pooling" if a.runner == "pooling" or a.convert == "embed" else "generate", revision=a.revision,
        load_gib_per_s=DEFAULT_LOAD_GIB_PER_S if load_rate is None else load_rate,
        load_s=knob("load_s", a.sim_load_s) or 0.0, lora=lora, lora_modules=tuple(a.lora_modules or ()),
        runtime_lora_updating=env.get(RUNTIME_LORA_ENV, "0").strip().lower() in ("1", "true"),
        lora_base=budget.layers)
    if len(config.lora_modules) > MAX_ADAPTERS:
        raise ConfigError(f"--lora-modules names {len(config.lora_modules)} adapters; the simulator holds at most "
                          f"{MAX_ADAPTERS}")
    return config, unknown


def lora_settings(a: argparse.Namespace, env: Mapping[str, str]) -> LoraSettings:
    """--enable-lora's limits as vLLM's LoRAConfig checks them, and the simulator's costs of adapters."""
    if a.max_loras < 1:
        raise ConfigError(f"max_loras: Input should be greater than or equal to 1 (got {a.max_loras})")
    max_cpu_loras = a.max_cpu_loras if a.max_cpu_loras and a.max_cpu_loras > 0 else a.max_loras
    if max_cpu_loras < a.max_loras:
        raise ConfigError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({a.max_loras}).")
    rate = a.sim_lora_load_gib_per_s
    rate = rate if rate is not None else _env_value(env, "lora_load_gib_per_s", _non_negative)
    rate = rate if rate is not None else a.sim_load_gib_per_s
    rate = rate if rate is not None else _env_value(env, "load_gib_per_s", _non_negative)
    overhead = a.sim_lora_step_overhead
    overhead = overhead if overhead is not None else _env_value(env, "lora_step_overhead", _non_negative)
    return LoraSettings(max_loras=a.max_loras, max_lora_rank=a.max_lora_rank, max_cpu_loras=max_cpu_loras,
                        step_overhead=DEFAULT_STEP_OVERHEAD if overhead is None else overhead,
                        load_gib_per_s=DEFAULT_LOAD_GIB_PER_S if rate is None else rate)
