"""What a discovery source reports about a model, and the interface both sources implement."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from cxygpt_profiles import Limits


@dataclass(frozen=True)
class Unavailable:
    """Why a served model has no ready replica, and when to try again (the 503's message and Retry-After)."""
    message: str
    retry_after_s: float = 5


@dataclass(frozen=True)
class ScaleTarget:
    """The ModelDeployment a request wakes from zero replicas (its autoscaler holds the requests meanwhile)."""
    namespace: str
    name: str
    replicas: int   # its spec.replicas as last seen


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter served on a model's replicas under its own name (the engines load it; their /v1/models say
    where). `limits`: its own, when set (static config), else the base model's."""
    name: str
    source: str | None = None      # where the engines load it from (a ModelDeployment's spec.adapters[].source)
    limits: Limits | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str                                  # the OpenAI model name clients send
    urls: tuple[str, ...]                      # base URLs of the replicas (no /v1)
    limits: Limits
    mode: Literal["single", "multi"]
    profile: str | None = None
    fallback: str | None = None
    upstream_model: str | None = None          # the name the upstream expects, when it differs
    api_key: str | None = field(default=None, repr=False)
    external: bool = False                     # external provider: no /tokenize, no /health
    unavailable: Unavailable | None = None     # why `urls` is empty, when it is
    task: Literal["generate", "embed"] = "generate"  # embed: /v1/embeddings only
    routing_policy: str | None = None          # unset: the gateway's default (routing.resolve)
    routing_epsilon: float | None = None
    scale_from_zero: ScaleTarget | None = None  # autoscaled: with no ready replica, requests wait and wake it
    namespace: str | None = None               # its ModelDeployment's (None: a static model)
    accept_fallback_from: tuple[str, ...] = ()  # other namespaces whose models may fall back to it ("*": any)
    adapters: tuple[AdapterSpec, ...] = ()     # LoRA adapters on its replicas, each a model name of its own

    @property
    def served_name(self) -> str:
        return self.upstream_model or self.name

    def accepts_fallback_from(self, namespace: str | None) -> bool:
        """Whether a model of `namespace` may send its requests here: its own namespace's (and static models) always,
        another's only when this model's owner lists it."""
        return (namespace == self.namespace or "*" in self.accept_fallback_from
                or namespace in self.accept_fallback_from)


class ModelSink(Protocol):
    """Where a discovery source puts what it finds (the gateway's route registry)."""

    def upsert(self, spec: ModelSpec) -> None: ...

    def reserve(self, name: str, why: Unavailable) -> None:
        """A name a model serves that has no route yet (no limits known): answered 503 with `why`, not 404."""

    def remove(self, name: str) -> None: ...

    def set_gateways(self, count: int | None) -> None:
        """How many gateway replicas share the engines' slots, as counted (None: not known; the setting stands)."""


class Discovery(Protocol):
    async def start(self, sink: ModelSink) -> None:
        """Report the current models, then keep reporting changes until stop()."""

    async def stop(self) -> None: ...

    # A source whose models can be woken from zero also has:
    # async def wake(self, target: ScaleTarget) -> str: "woken", "awake" (not at zero any more) or "failed: why"
