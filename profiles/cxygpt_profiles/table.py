"""The profile table and model catalog: pydantic schemas, loading, and errors that name the bad field."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

PACKAGE_DIR = Path(__file__).parent  # profiles.yaml and models.yaml ship inside the package
DEFAULT_TABLE = PACKAGE_DIR / "profiles.yaml"
DEFAULT_CATALOG = PACKAGE_DIR / "models.yaml"
TABLE_ENV = "CXYGPT_PROFILES"
CATALOG_ENV = "CXYGPT_MODELS"

Mode = Literal["single", "multi"]
WeightFormat = Literal["bf16", "int4"]


class ProfileTableError(ValueError):
    """A profile table or model catalog that cannot be used; the message names file and field."""


class Strict(BaseModel):
    # snake_case in the YAML files; camelCase (by_alias) where Kubernetes status carries the same data
    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)


class GpuRequirement(Strict):
    """The GPUs a profile runs on: of at least this memory each, this many of one node (the fewest that hold the
    model, see Sizing)."""
    min_memory_mib: int = Field(gt=0, description="memory of each GPU, MiB")
    min_count: int = Field(default=1, ge=1)
    max_count: int = Field(default=1, ge=1, le=8)

    @model_validator(mode="after")
    def _count_range(self):
        if self.max_count < self.min_count:
            raise ValueError(f"max_count {self.max_count} is below min_count {self.min_count}")
        return self


class EngineSettings(Strict):
    dtype: str
    kv_cache_dtype: str
    max_model_len: int = Field(gt=0)
    gpu_memory_utilization: float = Field(gt=0, le=1)
    max_num_seqs: int = Field(gt=0)


class SizingRule(Strict):
    """How an engine is sized for a model: the fewest GPUs of one node (gpu.min_count to gpu.max_count, a count that
    divides the model's attention heads: the tensor-parallel size) whose memory holds the weights and, in the KV
    cache, `sequences` sequences of the context. The context is engine.max_model_len (`fixed`), or (`memory`) the
    longest the KV cache holds `sequences` of, at least engine.max_model_len and at most `context_limit` and the
    model's own, rounded down to a multiple of `context_multiple`."""
    sequences: int = Field(default=1, ge=1, le=1024)
    context: Literal["fixed", "memory"] = "fixed"
    context_limit: int | None = Field(default=None, gt=0)
    context_multiple: int = Field(default=1024, gt=0)

    @model_validator(mode="after")
    def _limit_with_memory(self):
        if (self.context == "memory") != (self.context_limit is not None):
            raise ValueError("context_limit is set with context: memory, and only then")
        return self


class Timeouts(Strict):
    connect_s: float = Field(gt=0)
    ttft_s: float = Field(gt=0)
    total_s: float = Field(gt=0)
    queue_s: float = Field(gt=0)


class DegradeThresholds(Strict):
    p95_ttft_ms: float = Field(gt=0)
    queue_depth: int = Field(ge=1)
    # the share of arrivals refused for capacity (queue full or queue timeout) over the window
    shed_share: float = Field(default=0.25, gt=0, le=1)
    hold_s: float = Field(ge=0)
    recover_s: float = Field(ge=0)


class Limits(Strict):
    max_input_tokens: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    degraded_max_output_tokens: int = Field(gt=0)
    rate_qps: float | None = Field(None, gt=0)
    rate_tpm: int | None = Field(None, gt=0)
    queue_size: int = Field(ge=0)
    max_concurrency: int = Field(ge=1)
    # what one request may ask for: choices (`n`) and prompts or inputs in one batch; each choice is a sequence
    # the engine runs, each prompt one /tokenize call, so a request past these is refused (400), not queued
    max_n: int = Field(default=8, ge=1, le=128)
    max_batch: int = Field(default=64, ge=1, le=2048)
    timeouts: Timeouts
    degrade: DegradeThresholds

    @model_validator(mode="after")
    def _degraded_not_larger(self):
        if self.degraded_max_output_tokens > self.max_output_tokens:
            raise ValueError("degraded_max_output_tokens must not exceed max_output_tokens")
        return self


class Profile(Strict):
    name: str = Field(pattern=r"^[A-Z][A-Z0-9_]*$")
    description: str = ""
    mode: Mode
    gpu: GpuRequirement
    weights: WeightFormat
    swap_space_gib_intent: int | None = Field(None, description="recorded only: vLLM >= 0.18 has no --swap-space")
    engine: EngineSettings
    sizing: SizingRule = SizingRule()
    limits: Limits

    @property
    def longest_context(self) -> int:
        """The longest context this profile runs: engine.max_model_len, or sizing.context_limit with `memory`."""
        return self.sizing.context_limit or self.engine.max_model_len

    @model_validator(mode="after")
    def _fits_context(self):
        if self.sizing.context_limit is not None and self.sizing.context_limit < self.engine.max_model_len:
            raise ValueError(f"sizing.context_limit {self.sizing.context_limit} is below engine.max_model_len "
                             f"{self.engine.max_model_len} (the least context the profile runs)")
        total = self.limits.max_input_tokens + self.limits.max_output_tokens
        if total > self.longest_context:
            where = "sizing.context_limit" if self.sizing.context_limit else "engine.max_model_len"
            raise ValueError(
                f"limits.max_input_tokens + limits.max_output_tokens = {total} exceeds {where} {self.longest_context}")
        return self


class VllmPin(Strict):
    version: str
    image: str
    command: list[str] = Field(min_length=1)
    port: int = Field(gt=0, lt=65536)
    shm_size: str = Field(pattern=r"^[0-9]+(Mi|Gi)$")


class FitConstants(Strict):
    weight_bytes_per_param: dict[str, float]
    kv_bytes_per_element: dict[str, float]
    engine_overhead_mib: int = Field(ge=0)


class CacheConstants(Strict):
    """The model cache (spec.model.cache): how big a claim is made and how long its download may take."""
    size_margin: float = Field(default=0.2, ge=0, description="claim size = weight estimate x (1 + margin) + extra")
    size_extra_mib: int = Field(default=1024, ge=0, description="tokenizer, config and other files beside the weights")
    download_deadline_base_s: int = Field(default=3600, gt=0, description="the Job's activeDeadlineSeconds, plus...")
    download_min_mib_per_s: float = Field(default=20, gt=0, description="...the claim's size at this (slow) rate")
    download_retries: int = Field(default=4, ge=0, description="the Job's backoffLimit; each retry resumes")


# vLLM's MaxLoRARanks: --max-lora-rank takes one of these
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class LoraConstants(Strict):
    """LoRA adapters (spec.adapters): the engine's adapter slots, whatever the number of adapters (so adding one
    never changes the engine's arguments, which would restart it)."""
    max_loras: int = Field(default=4, ge=1, le=16, description="--max-loras: distinct adapters in one batch")
    max_lora_rank: int = Field(default=16, description="--max-lora-rank unless spec.lora.maxRank says otherwise")
    max_cpu_loras: int = Field(default=16, ge=1, le=64, description="--max-cpu-loras: adapters kept in CPU memory")
    cache_size: str = Field(default="16Gi", pattern=r"^[1-9][0-9]{0,5}(Mi|Gi|Ti)$",
                            description="the adapter cache's claim (spec.model.cache on: Hub adapters go through it)")

    @model_validator(mode="after")
    def _valid(self):
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank {self.max_lora_rank} is not one of vLLM's {LORA_RANKS}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras {self.max_cpu_loras} is below max_loras {self.max_loras} (vLLM refuses)")
        return self


class ProfileTable(Strict):
    vllm: VllmPin
    fit: FitConstants
    cache: CacheConstants = CacheConstants()
    lora: LoraConstants = LoraConstants()
    profiles: list[Profile] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        names = [p.name for p in self.profiles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate profile names: {', '.join(dupes)}")
        for p in self.profiles:
            if p.weights not in self.fit.weight_bytes_per_param:
                raise ValueError(f"profile {p.name}: weights {p.weights!r} missing from fit.weight_bytes_per_param")
            if p.engine.kv_cache_dtype not in self.fit.kv_bytes_per_element:
                raise ValueError(f"profile {p.name}: kv_cache_dtype {p.engine.kv_cache_dtype!r} "
                                 "missing from fit.kv_bytes_per_element")
        return self

    def get(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.profiles]


class ModelFacts(Strict):
    parameters: int = Field(gt=0)
    layers: int = Field(gt=0)
    attention_heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tied_embeddings: bool = False
    max_context: int = Field(gt=0)
    # config.json's: the MLP's width (LoRA slots' size; scripts/gen_speeds.py); unknown: derived from the counts
    intermediate_size: int | None = Field(None, gt=0)


class CatalogEntry(ModelFacts):
    aliases: list[str] = []
    variants: dict[WeightFormat, str] = {}
    # config.json's, for scripts/gen_speeds.py (AIConfigurator rebuilds the model's layers from them)
    architecture: str | None = None


class ModelCatalog(Strict):
    models: dict[str, CatalogEntry]

    def entry(self, *keys: str) -> tuple[str, CatalogEntry] | None:
        """The first model that a key names: repository id, alias or variant (case-insensitive)."""
        index = {}
        for repo, entry in self.models.items():
            for name in (repo, *entry.aliases, *entry.variants.values()):
                index[name.lower()] = (repo, entry)
        for key in keys:
            if key and key.lower() in index:
                return index[key.lower()]
        return None

    def lookup(self, *keys: str) -> ModelFacts | None:
        found = self.entry(*keys)
        return facts_of(found[1]) if found else None

    def repo_of(self, facts: ModelFacts) -> str | None:
        """The catalogued repository whose facts these are (a spec's own facts for a model not catalogued: None)."""
        return next((repo for repo, entry in self.models.items() if facts_of(entry) == facts), None)


def facts_of(entry: CatalogEntry) -> ModelFacts:
    return ModelFacts(**entry.model_dump(include=set(ModelFacts.model_fields)))


def _field_path(loc: tuple, data) -> str:
    """pydantic's loc as a dotted path, with profile names shown beside list indexes."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list) and item < len(node):
            node = node[item]
            name = node.get("name") if isinstance(node, dict) else None
            parts[-1] += f"[{item}]" + (f"({name})" if name else "")
            continue
        parts.append(str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "<root>"


def _parse(model: type[BaseModel], path: Path):
    """A YAML file, or a JSON one (a large generated table: the YAML parser would take a second)."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as e:
        raise ProfileTableError(f"{path}: cannot read: {e.strerror}") from None
    except (yaml.YAMLError, ValueError) as e:
        raise ProfileTableError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{_field_path(err['loc'], data)}: {err['msg']}" for err in e.errors())
        raise ProfileTableError(f"{path}: {problems}") from None


def parse_table(path: str | os.PathLike | None = None) -> ProfileTable:
    """The table as its schema has it; load_table (load.py) also checks its limits against its engines' speed."""
    return _parse(ProfileTable, Path(path or os.environ.get(TABLE_ENV) or DEFAULT_TABLE))


def load_catalog(path: str | os.PathLike | None = None) -> ModelCatalog:
    return _parse(ModelCatalog, Path(path or os.environ.get(CATALOG_ENV) or DEFAULT_CATALOG))


@lru_cache(maxsize=1)
def default_catalog() -> ModelCatalog:
    return load_catalog()
