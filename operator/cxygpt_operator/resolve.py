"""Decisions (pure): a ModelDeployment spec × GPU nodes × profile table → the profile and its numbers."""
from __future__ import annotations

from dataclasses import dataclass, field

from cxygpt_profiles import AUTO, GpuNode, ModelCatalog, ModelFacts, NoFit, ProfileTable, Selection, select_profile

# spec.model.facts (camelCase, as in the CRD) → ModelFacts fields
_FACT_FIELDS = {"parameters": "parameters", "layers": "layers", "attentionHeads": "attention_heads",
                "kvHeads": "kv_heads", "headDim": "head_dim", "hiddenSize": "hidden_size",
                "vocabSize": "vocab_size", "tiedEmbeddings": "tied_embeddings", "maxContext": "max_context"}


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

    def source_for(self, weights: str) -> str:
        return self.source if weights == "bf16" else self.variants[weights]

    @property
    def weight_formats(self) -> frozenset[str]:
        return frozenset({"bf16", *self.variants})


class SpecError(ValueError):
    """A spec the schema should have refused (e.g. applied without the CRD's validation)."""


def parse_spec(spec: dict) -> ModelSpec:
    model = spec.get("model") or {}
    if not model.get("name") or not model.get("source"):
        raise SpecError("spec.model.name and spec.model.source are required")
    engine = spec.get("engine") or {}
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or replicas < 0:
        raise SpecError(f"spec.replicas must be an integer >= 0, not {replicas!r}")
    return ModelSpec(
        served_name=model["name"], source=model["source"], variants=dict(model.get("variants") or {}),
        facts=dict(model.get("facts") or {}), mode=spec.get("mode") or "multi", profile=spec.get("profile") or AUTO,
        replicas=replicas, engine_kind=engine.get("kind") or "vllm", image=engine.get("image"),
        extra_args=tuple(engine.get("args") or ()),
        env=tuple((e["name"], e.get("value", "")) for e in engine.get("env") or ()),
        cache_claim=spec.get("cacheClaim"), fallback_model=spec.get("fallbackModel"))


def _repo(uri: str) -> str:
    """hf://Org/Name → Org/Name; pvc://claim/path → path (its last part often names the model)."""
    scheme, _, rest = uri.partition("://")
    return rest if scheme == "hf" else rest.split("/", 1)[-1].rsplit("/", 1)[-1]


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


def resolve(spec: ModelSpec, nodes: list[GpuNode], table: ProfileTable, catalog: ModelCatalog) -> Selection:
    """The selection, or NoFit (reason, permanent) explaining why the model cannot run (yet)."""
    return select_profile(table, mode=spec.mode, requested=spec.profile, nodes=sorted(nodes),
                          facts=model_facts(spec, catalog), variants=spec.weight_formats)


__all__ = ["ModelSpec", "NoFit", "SpecError", "model_facts", "parse_spec", "resolve"]
