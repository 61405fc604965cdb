"""Decisions (pure): a ModelDeployment spec × GPU nodes × profile table → the profile and its numbers."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cxygpt_profiles import (
    AUTO,
    GpuNode,
    ModelCatalog,
    ModelFacts,
    NoFit,
    Profile,
    ProfileTable,
    Selection,
    select_profile,
)
from cxygpt_profiles.engine import RUNTIME_LORA_ENV, lora_limits
from cxygpt_profiles.select import node_matches

from .adapters import LORA_ARGS, Adapter, AdapterError, LoraSpec, parse_adapters, parse_lora
from .autoscaling.policy import AutoscalingSpec, parse_autoscaling
from .cache import CacheSpec, hf_source, parse_cache
from .nodes import GPU_RESOURCE, NodeGpus
from .placement import PodSettings, SettingsError, keeps_off, parse_pod_settings

# spec.model.facts (camelCase, as in the CRD) → ModelFacts fields
MAX_REPLICAS = 64  # the CRD's maximum, repeated for specs applied without the schema
ROLLOUT_STRATEGIES = ("Surge", "InPlace")
TASKS = ("generate", "embed")

# Arguments that wire the engine to its Service and the gateway: an override gives an engine that reports
# Ready and never answers. vLLM's parser reads `_` as `-` in flag names and, being argparse, expands an
# abbreviation (--served-model) to the one flag it starts: those spellings are refused too.
OWNED_ARGS = ("port", "host", "served-model-name", "model", "api-key")
# Arguments that read flags from a file or import code by name: they would get around every rule here.
CODE_ARGS = ("config", "tool-parser-plugin", "middleware", "worker-extension-cls", "logits-processors")
REMOTE_CODE_ARG = "trust-remote-code"
# Environment the operator sets itself, and variables that change what code the process loads (the dynamic
# loader's LD_*, the interpreter's module path), or that put a key between the gateway and the engine.
OWNED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HOME", "CXYGPT_SIM_GPU_MEMORY_MIB", RUNTIME_LORA_ENV)
BLOCKED_ENV = ("GCONV_PATH", "HF_ENDPOINT", "VLLM_API_KEY")
BLOCKED_ENV_PREFIXES = ("LD_", "PYTHON")  # the dynamic loader's and the interpreter's
ALLOWED_ENV = ("PYTHONUNBUFFERED",)  # harmless, and commonly set
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# the taint the NVIDIA device plugin's nodes often carry: every engine pod tolerates it
GPU_TOLERATIONS = ({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)
PRODUCT_POLICIES = ("Prefer", "Require")
MAX_PRODUCTS = 16

_FACT_FIELDS = {"parameters": "parameters", "layers": "layers", "attentionHeads": "attention_heads",
                "kvHeads": "kv_heads", "headDim": "head_dim", "hiddenSize": "hidden_size",
                "vocabSize": "vocab_size", "tiedEmbeddings": "tied_embeddings", "maxContext": "max_context"}


@dataclass(frozen=True)
class GpuChoice:
    """spec.gpu: products preferred (or required), a least memory per GPU."""
    products: tuple[str, ...] = ()
    require: bool = False
    min_memory_mib: int | None = None

    @property
    def preferred(self) -> frozenset[str]:
        return frozenset(self.products) if not self.require else frozenset()


@dataclass(frozen=True)
class ModelSpec:
    """The parts of a ModelDeployment spec the operator acts on, with the CRD's defaults."""
    served_name: str
    source: str
    variants: dict[str, str] = field(default_factory=dict)
    facts: dict = field(default_factory=dict)
    mode: str = "multi"
    profile: str = AUTO
    replicas: int = 1
    engine_kind: str = "vllm"
    image: str | None = None
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cache_claim: str | None = None
    fallback_model: str | None = None
    trust_remote_code: bool = False
    rollout: str = "Surge"
    task: str = "generate"   # embed: an embedding model (the engine's pooling runner)
    cache: CacheSpec = field(default_factory=CacheSpec)
    autoscaling: AutoscalingSpec | None = None  # on: the autoscaler sets `replicas`
    gpu: GpuChoice = field(default_factory=GpuChoice)
    pod: PodSettings = field(default_factory=PodSettings)  # spec.engine's over the operator's defaults
    adapters: tuple[Adapter, ...] = ()   # LoRA adapters on this base, loaded at runtime
    lora: LoraSpec = field(default_factory=LoraSpec)

    @property
    def tolerations(self) -> list[dict]:
        """The engine pods' tolerations: the GPU taint's, then the settings'."""
        return [dict(t) for t in GPU_TOLERATIONS] + [dict(t) for t in self.pod.tolerations
                                                     if t not in GPU_TOLERATIONS]

    def source_for(self, weights: str) -> str:
        return self.source if weights == "bf16" else self.variants[weights]

    @property
    def weight_formats(self) -> frozenset[str]:
        return frozenset({"bf16", *self.variants})


class SpecError(ValueError):
    """A spec the schema should have refused (e.g. applied without the CRD's validation)."""


def _flag_name(arg: str) -> str | None:
    """`--max_model_len=8k` → `max-model-len`; None for a value."""
    if not arg.startswith("--"):
        return None
    return arg[2:].split("=", 1)[0].replace("_", "-")


def refused_arg(arg: str, trust_remote_code: bool) -> str | None:
    """Why an extra engine argument is refused, or None (the CRD's CEL rules say the same)."""
    name = _flag_name(arg)
    if not name:
        return None
    if owned := next((flag for flag in OWNED_ARGS if flag.startswith(name)), None):
        return f"--{owned} is set by the operator (it wires the engine to its Service and the gateway)"
    if code := next((flag for flag in CODE_ARGS if flag.startswith(name)), None):
        return f"--{code} loads flags or code from outside the operator's control"
    if REMOTE_CODE_ARG.startswith(name) and not trust_remote_code:
        return "--trust-remote-code runs code from the model repository: set spec.engine.trustRemoteCode: true"
    return None


def refused_env(name: str) -> str | None:
    """Why an extra environment variable is refused, or None (the CRD's rules say the same)."""
    if not ENV_NAME.match(name):
        return f"{name!r} is not a C identifier ([A-Za-z_][A-Za-z0-9_]*)"
    if name in OWNED_ENV:
        return f"{name} is set by the operator"
    if name not in ALLOWED_ENV and (name.startswith(BLOCKED_ENV_PREFIXES) or name in BLOCKED_ENV):
        return f"{name} changes the code the engine loads or how the gateway reaches it"
    return None


def _check_engine(engine: dict, adapters: bool) -> None:
    """The schema's engine rules, for specs applied without it; with adapters, the LoRA flags are derived."""
    trust = engine.get("trustRemoteCode") is True
    for arg in engine.get("args") or ():
        if why := refused_arg(str(arg), trust):
            raise SpecError(f"spec.engine.args: {why}")
        name = _flag_name(str(arg))
        if adapters and name and (flag := next((f for f in LORA_ARGS if f.startswith(name)), None)):
            raise SpecError(f"spec.engine.args: --{flag} is derived from spec.adapters and spec.lora")
    names = [str(e.get("name", "")) for e in engine.get("env") or ()]
    for name in names:
        if why := refused_env(name):
            raise SpecError(f"spec.engine.env: {why}")
    if len(set(names)) != len(names):
        raise SpecError("spec.engine.env: names must be unique")


# a PersistentVolumeClaim's name (a DNS subdomain), then a path inside it with no `..` segment
PVC_SOURCE = re.compile(r"^pvc://(?P<claim>[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/(?P<path>.+)$")
MAX_CLAIM_NAME = 253


def check_source(field_name: str, uri: str) -> None:
    """hf://<org>/<repo>[@<revision>] or pvc://<claim>/<path>, as the schema says (for specs applied without it)."""
    if hf_source(uri):
        return
    match = PVC_SOURCE.match(uri)
    if not match:
        raise SpecError(f"{field_name} must be hf://<org>/<repo>[@<revision>] or pvc://<claim>/<path>, not {uri!r}")
    if len(match["claim"]) > MAX_CLAIM_NAME:
        raise SpecError(f"{field_name}: the claim name is longer than {MAX_CLAIM_NAME} characters")
    if ".." in match["path"].split("/"):
        raise SpecError(f"{field_name}: the path inside the claim must not contain '..'")


def parse_gpu(raw: object) -> GpuChoice:
    """spec.gpu, as the schema checks it (for specs applied without it)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise SpecError("spec.gpu must be an object")
    products = raw.get("products") or []
    if not isinstance(products, list) or len(products) > MAX_PRODUCTS or not all(
            isinstance(p, str) and 0 < len(p) <= 63 for p in products):
        raise SpecError(f"spec.gpu.products: at most {MAX_PRODUCTS} product names of at most 63 characters")
    policy = raw.get("productPolicy") or "Prefer"
    if policy not in PRODUCT_POLICIES:
        raise SpecError(f"spec.gpu.productPolicy must be one of {', '.join(PRODUCT_POLICIES)}, not {policy!r}")
    if policy == "Require" and not products:
        raise SpecError("spec.gpu.productPolicy Require needs spec.gpu.products")
    memory = raw.get("minMemoryMiB")
    if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool) or not 0 < memory <= 2**20):
        raise SpecError(f"spec.gpu.minMemoryMiB must be an integer from 1 to {2**20}, not {memory!r}")
    return GpuChoice(products=tuple(products), require=policy == "Require", min_memory_mib=memory)


def parse_spec(spec: dict, defaults: PodSettings | None = None) -> ModelSpec:
    """The spec as the operator acts on it; spec.engine's pod settings over `defaults` (the operator's)."""
    model = spec.get("model") or {}
    if not model.get("name") or not model.get("source"):
        raise SpecError("spec.model.name and spec.model.source are required")
    check_source("spec.model.source", model["source"])
    for variant, uri in (model.get("variants") or {}).items():
        check_source(f"spec.model.variants.{variant}", uri)
    try:
        cache = parse_cache(model.get("cache"))
    except ValueError as e:
        raise SpecError(str(e)) from None
    if cache.enabled and spec.get("cacheClaim"):
        raise SpecError("spec.cacheClaim and spec.model.cache.enabled exclude each other: the managed cache is "
                        "downloaded once and mounted read-only, cacheClaim is the engines' own download cache")
    engine = spec.get("engine") or {}
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or not 0 <= replicas <= MAX_REPLICAS:
        raise SpecError(f"spec.replicas must be an integer from 0 to {MAX_REPLICAS}, not {replicas!r}")
    rollout = (spec.get("rollout") or {}).get("strategy") or "Surge"
    if rollout not in ROLLOUT_STRATEGIES:
        raise SpecError(f"spec.rollout.strategy must be one of {', '.join(ROLLOUT_STRATEGIES)}, not {rollout!r}")
    task = model.get("task") or "generate"
    if task not in TASKS:
        raise SpecError(f"spec.model.task must be one of {', '.join(TASKS)}, not {task!r}")
    try:
        adapters = parse_adapters(spec.get("adapters"), model["name"])
        lora = parse_lora(spec.get("lora"))
    except AdapterError as e:
        raise SpecError(str(e)) from None
    for i, adapter in enumerate(adapters):
        check_source(f"spec.adapters[{i}].source", adapter.source)
    _check_engine(engine, bool(adapters))
    try:
        autoscaling = parse_autoscaling(spec)
        pod = parse_pod_settings(engine).over(defaults or PodSettings())
    except (ValueError, SettingsError) as e:
        raise SpecError(str(e)) from None
    return ModelSpec(
        served_name=model["name"], source=model["source"], variants=dict(model.get("variants") or {}),
        facts=dict(model.get("facts") or {}), mode=spec.get("mode") or "multi", profile=spec.get("profile") or AUTO,
        replicas=replicas, engine_kind=engine.get("kind") or "vllm", image=engine.get("image"),
        extra_args=tuple(engine.get("args") or ()),
        env=tuple((e["name"], e.get("value", "")) for e in engine.get("env") or ()),
        cache_claim=spec.get("cacheClaim"), fallback_model=spec.get("fallbackModel"),
        trust_remote_code=engine.get("trustRemoteCode") is True, rollout=rollout, task=task, cache=cache,
        autoscaling=autoscaling, gpu=parse_gpu(spec.get("gpu")), pod=pod, adapters=adapters, lora=lora)


def _positive_int(text: str) -> int | None:
    """vLLM's human-readable integers (8k = 8000, 8K = 8192, and m/M), when above 0."""
    match = re.fullmatch(r"(\d+)([kKmM]?)", text)
    if not match:
        return None
    value = int(match[1]) * {"": 1, "k": 10**3, "K": 2**10, "m": 10**6, "M": 2**20}[match[2]]
    return value or None


def _positive_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value <= 1 else None


# engine flags the fit estimate and the limits depend on → (profile engine field, parser of a usable value)
_ESTIMATED_FLAGS = {
    "max-model-len": ("max_model_len", _positive_int),
    "max-num-seqs": ("max_num_seqs", _positive_int),
    "gpu-memory-utilization": ("gpu_memory_utilization", _positive_float),
    "kv-cache-dtype": ("kv_cache_dtype", lambda v: v or None),
}


def engine_overrides(args: tuple[str, ...]) -> dict:
    """Profile engine settings the extra arguments override (the last occurrence wins, as in argparse).
    A value the engine would refuse (e.g. `--max-num-seqs -5`) is not an override: the engine's crash says why."""
    found = {}
    for i, arg in enumerate(args):
        name = _flag_name(arg)
        if name not in _ESTIMATED_FLAGS:
            continue
        value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
        field_name, parse = _ESTIMATED_FLAGS[name]
        parsed = parse(value)
        if parsed is not None:
            found[field_name] = parsed
        else:
            found.pop(field_name, None)
    return found


def _with_overrides(profile: Profile, overrides: dict) -> Profile:
    """The profile as the engine will run it: the limits follow an overridden context length (the input
    limit is what the context leaves after the output) and never admit more sequences than the engine runs."""
    engine = profile.engine.model_copy(update=overrides)
    limits, sizing = profile.limits, profile.sizing
    if "max_model_len" in overrides:
        limits = limits.model_copy(update={"max_input_tokens": max(engine.max_model_len - limits.max_output_tokens, 1)})
        # the context is the one given, not the one the memory would allow
        sizing = sizing.model_copy(update={"context": "fixed", "context_limit": None})
    if engine.max_num_seqs < limits.max_concurrency:
        limits = limits.model_copy(update={"max_concurrency": engine.max_num_seqs})
    return profile.model_copy(update={"engine": engine, "limits": limits, "sizing": sizing})


def effective_table(table: ProfileTable, spec: ModelSpec) -> ProfileTable:
    """The table with every profile's engine settings as spec.engine.args leave them."""
    overrides = engine_overrides(spec.extra_args)
    if overrides.get("kv_cache_dtype", "auto") not in table.fit.kv_bytes_per_element:
        del overrides["kv_cache_dtype"]  # a dtype the estimate has no size for: estimated with the profile's
    if not overrides:
        return table
    return table.model_copy(update={"profiles": [_with_overrides(p, overrides) for p in table.profiles]})


def _repo(uri: str) -> str:
    """hf://Org/Name[@rev] → Org/Name; pvc://claim/path → path (its last part often names the model)."""
    scheme, _, rest = uri.partition("://")
    return rest.split("@", 1)[0] if scheme == "hf" else rest.split("/", 1)[-1].rsplit("/", 1)[-1]


def model_facts(spec: ModelSpec, catalog: ModelCatalog) -> ModelFacts | None:
    """Catalog facts (by source, variant or served name), overridden field by field by spec.model.facts;
    None when neither gives a complete set."""
    found = catalog.lookup(_repo(spec.source), *(_repo(v) for v in spec.variants.values()), spec.served_name)
    overrides = {_FACT_FIELDS[k]: v for k, v in spec.facts.items() if k in _FACT_FIELDS}
    if found:
        return found.model_copy(update=overrides)
    if set(overrides) >= set(_FACT_FIELDS.values()) - {"tied_embeddings"}:
        return ModelFacts(**overrides)
    return None


@dataclass(frozen=True)
class Candidates:
    """The GPUs an engine of the spec may run on, and why the others may not (`node: why`)."""
    gpus: tuple[GpuNode, ...]
    kept_off: tuple[str, ...] = ()


def candidates(spec: ModelSpec, nodes: Sequence[NodeGpus]) -> Candidates:
    """The GPU nodes the spec's pod settings (nodeSelector, required node affinity, tolerations) and spec.gpu let an
    engine onto."""
    gpus, kept_off = [], []
    for node in sorted(nodes):
        gpu = node.gpus
        why = keeps_off(spec.pod, spec.tolerations, labels=node.label_map, name=gpu.name, taints=node.taint_maps)
        if why is None and spec.gpu.min_memory_mib and gpu.memory_mib < spec.gpu.min_memory_mib:
            why = f"{gpu.memory_mib} MiB per GPU, below spec.gpu.minMemoryMiB {spec.gpu.min_memory_mib}"
        if why is None and spec.gpu.require and gpu.product not in spec.gpu.products:
            why = f"{gpu.product} is not in spec.gpu.products (productPolicy Require)"
        if why is None:
            gpus.append(gpu)
        else:
            kept_off.append(f"{gpu.name}{'' if gpu.resource == GPU_RESOURCE else f' ({gpu.resource})'}: {why}")
    return Candidates(tuple(gpus), tuple(kept_off))


MAX_KEPT_OFF_SHOWN = 8


def lora_slots(spec: ModelSpec, table: ProfileTable) -> tuple[int, int, int] | None:
    """(--max-loras, --max-lora-rank, --max-cpu-loras) with adapters, else None: the table's, spec.lora's over them,
    never the number of adapters (adding one must not change the engine's arguments: that restarts it)."""
    return lora_limits(table.lora, spec.lora.max_loras, spec.lora.max_rank) if spec.adapters else None


def resolve(spec: ModelSpec, found: Candidates, table: ProfileTable, catalog: ModelCatalog) -> Selection:
    """The selection (estimated with the effective engine arguments and the adapter slots) among the candidate GPUs,
    or NoFit (reason, permanent) explaining why the model cannot run (yet), with the nodes its settings keep it
    off."""
    slots = lora_slots(spec, table)
    try:
        return select_profile(effective_table(table, spec), mode=spec.mode, requested=spec.profile,
                              nodes=list(found.gpus), facts=model_facts(spec, catalog), variants=spec.weight_formats,
                              prefer=spec.gpu.preferred, lora_slots=(slots[0], slots[1]) if slots else None)
    except NoFit as e:
        if e.reason != "NoMatchingGPU" or not found.kept_off:
            raise
        shown = "; ".join(found.kept_off[:MAX_KEPT_OFF_SHOWN])
        more = f" (and {len(found.kept_off) - MAX_KEPT_OFF_SHOWN} more)" if len(found.kept_off) > MAX_KEPT_OFF_SHOWN \
            else ""
        raise NoFit(e.reason, f"{e.message}; kept off: {shown}{more}", permanent=e.permanent, fit=e.fit,
                    sizing=e.sizing) from None


def schedulable_replicas(sel: Selection, gpus: Sequence[GpuNode]) -> int:
    """Replicas the candidate GPUs that fit the profile can hold at once (each takes sel.gpu_count GPUs of one
    node, of the kind it requests)."""
    return sum(n.count // sel.gpu_count for n in gpus
               if n.resource == sel.node.resource and node_matches(sel.profile, n))


UNCONFIRMED = "~"  # sorts after every RFC 3339 time: a claim not yet confirmed loses to every confirmed one


def claimed_since(md: dict) -> str:
    """When a ModelDeployment claimed its served name: the time its status confirms (status.nameClaim, written
    once by the operator for the owner), else its creation for a spec never changed (generation 1), else
    unconfirmed. So an older model renamed onto a live name does not take it over: its claim is new."""
    meta, status = md.get("metadata") or {}, md.get("status") or {}
    served = ((md.get("spec") or {}).get("model") or {}).get("name")
    claim = status.get("nameClaim") or {}
    if served and claim.get("name") == served and claim.get("since"):
        return str(claim["since"])
    if (meta.get("generation") or 1) == 1 and meta.get("creationTimestamp"):
        return str(meta["creationTimestamp"])
    return UNCONFIRMED


@dataclass(frozen=True, order=True)
class NameClaim:
    """A ModelDeployment's claim on its served name; ordered by when it was claimed, then uid (the owner rule)."""
    created: str
    uid: str
    namespace: str
    name: str

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def name_owner(claims: list[NameClaim]) -> NameClaim | None:
    """The oldest claim (RFC 3339 in UTC sorts as text), then the smallest uid."""
    return min(claims, default=None)


def name_claim(md: dict, now: str) -> dict:
    """status.nameClaim for the owner of its served name: kept while the name stays, new when it changes."""
    served = ((md.get("spec") or {}).get("model") or {}).get("name")
    since = claimed_since(md)
    return {"name": served, "since": now if since == UNCONFIRMED else since}


__all__ = ["Candidates", "GpuChoice", "ModelSpec", "NameClaim", "claimed_since", "candidates", "name_claim", "NoFit",
           "SpecError", "effective_table", "engine_overrides", "lora_slots", "model_facts", "name_owner", "parse_spec",
           "refused_arg",
           "refused_env", "resolve", "schedulable_replicas"]
