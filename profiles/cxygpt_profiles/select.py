"""Profile selection (pure): spec facts × GPU nodes × profile table → the profile and its resolved numbers."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .fit import FitEstimate, estimate_fit
from .gpus import default_gpus
from .predict import Prediction, predict_profile
from .table import Limits, ModelFacts, Profile, ProfileTable, default_catalog

AUTO = "auto"


@dataclass(frozen=True, order=True)
class GpuNode:
    """A schedulable node's GPUs as the operator sees them (memory per GPU, GPUs allocatable)."""
    memory_mib: int
    count: int
    name: str = ""
    product: str = "unknown"


@dataclass(frozen=True)
class Selection:
    profile: Profile
    mode: str
    node: GpuNode
    gpu_count: int
    max_model_len: int
    limits: Limits
    fit: FitEstimate | None
    forced: bool
    notes: tuple[str, ...] = field(default=())
    prediction: Prediction | None = None   # the engine's TTFT and TPOT at the profile's concurrency and context

    @property
    def tensor_parallel_size(self) -> int:
        return self.gpu_count


class NoFit(Exception):
    """No profile can run; `reason` is a condition reason, `permanent` whether only a spec change helps."""

    def __init__(self, reason: str, message: str, *, permanent: bool, fit: FitEstimate | None = None):
        super().__init__(message)
        self.reason, self.message, self.permanent, self.fit = reason, message, permanent, fit


def node_matches(profile: Profile, node: GpuNode) -> bool:
    return node.memory_mib >= profile.gpu.min_memory_mib and node.count >= profile.gpu.min_count


def gpu_count_for(profile: Profile, node: GpuNode, facts: ModelFacts | None) -> int | None:
    """GPUs to use: the profile's fixed TP, or with `gpu-count` every GPU the node offers
    (up to max_count) that evenly divides the model's attention heads."""
    tp = profile.engine.tensor_parallel_size
    if tp != "gpu-count":
        return tp if node.count >= tp else None
    for count in range(min(node.count, profile.gpu.max_count), profile.gpu.min_count - 1, -1):
        if facts is None or facts.attention_heads % count == 0:
            return count
    return None


def _limits_for(profile: Profile, max_model_len: int) -> Limits:
    """Input limit shrinks with the context when the model's context is shorter than the profile's."""
    room = max_model_len - profile.limits.max_output_tokens
    if room >= profile.limits.max_input_tokens:
        return profile.limits
    return profile.limits.model_copy(update={"max_input_tokens": max(room, 1)})


def _evaluate(table: ProfileTable, profile: Profile, node: GpuNode, facts: ModelFacts | None,
              forced: bool) -> Selection | NoFit:
    count = gpu_count_for(profile, node, facts)
    if count is None:
        return NoFit("NoMatchingGPU", f"node {node.name} has no GPU count usable by {profile.name}",
                     permanent=False)
    notes = []
    max_len = profile.engine.max_model_len
    if facts and facts.max_context < max_len:
        max_len = facts.max_context
        notes.append(f"max-model-len cut to the model's context {facts.max_context}")
    fit = None
    if facts:
        fit = estimate_fit(facts, weights=profile.weights, kv_cache_dtype=profile.engine.kv_cache_dtype,
                           max_model_len=max_len, gpu_memory_utilization=profile.engine.gpu_memory_utilization,
                           gpu_memory_mib=node.memory_mib, gpu_count=count, consts=table.fit)
        if not fit.fits:
            return NoFit("InsufficientGPUMemory", f"{profile.name} on {count}x{node.memory_mib} MiB: {fit.message}",
                         permanent=forced, fit=fit)
    else:
        notes.append("fit not estimated: model facts unknown (set spec.model.facts)")
    return Selection(profile=profile, mode=profile.mode, node=node, gpu_count=count, max_model_len=max_len,
                     limits=_limits_for(profile, max_len), fit=fit, forced=forced, notes=tuple(notes))


def _with_prediction(table: ProfileTable, sel: Selection, facts: ModelFacts | None) -> Selection:
    """The selection with its engine's predicted speed, when the model's facts and the node's GPU are known (its
    product in the GPU table: a node's memory alone does not say which GPU it is)."""
    gpu = default_gpus().by_product(sel.node.product)
    if facts is None or gpu is None:
        return sel
    return replace(sel, prediction=predict_profile(sel.profile, gpu=gpu, gpu_count=sel.gpu_count, facts=facts,
                                                   repo=default_catalog().repo_of(facts),
                                                   max_model_len=sel.max_model_len, consts=table.fit,
                                                   limits=sel.limits))


def _floor_node(profile: Profile) -> GpuNode:
    """The smallest GPU set a profile accepts, for judging a forced profile before any node exists."""
    count = profile.gpu.min_count
    return GpuNode(memory_mib=profile.gpu.min_memory_mib, count=count, name="(profile minimum)")


def select_profile(table: ProfileTable, *, mode: str, requested: str = AUTO, nodes: list[GpuNode],
                   facts: ModelFacts | None = None, variants: frozenset[str] = frozenset({"bf16"})) -> Selection:
    """The profile to run. Auto: the most capable profile of `mode` (latest in the table) that fits a node,
    on the smallest such node (bigger nodes stay free for bigger models; `gpu-count` profiles take the
    node with the most GPUs). Forced: that profile or a NoFit explaining why not."""
    if requested != AUTO:
        try:
            profile = table.get(requested)
        except KeyError:
            raise NoFit("UnknownProfile", f"profile {requested!r} is not one of {', '.join(table.names)}",
                        permanent=True) from None
        if profile.weights not in variants:
            raise NoFit("MissingWeightVariant", f"{profile.name} runs {profile.weights} weights; "
                        f"set spec.model.variants.{profile.weights}", permanent=True)
        matching = sorted(n for n in nodes if node_matches(profile, n))
        if not matching:
            floor = _evaluate(table, profile, _floor_node(profile), facts, forced=True)
            if isinstance(floor, NoFit) and floor.reason == "InsufficientGPUMemory":
                raise floor
            raise NoFit("NoMatchingGPU", f"no schedulable node has {profile.gpu.min_count}+ GPUs of "
                        f"{profile.gpu.min_memory_mib}+ MiB for {profile.name}", permanent=False)
        # The largest matching node: if the model does not fit there, it fits nowhere.
        result = _evaluate(table, profile, max(matching, key=lambda n: (n.count, n.memory_mib)), facts, forced=True)
        if isinstance(result, NoFit):
            raise result
        return _with_prediction(table, result, facts)

    candidates = [p for p in table.profiles if p.mode == mode and p.weights in variants]
    if not candidates:
        raise NoFit("NoProfileForMode", f"no profile for mode {mode!r} with weights in {sorted(variants)}",
                    permanent=True)
    misses: list[NoFit] = []
    for profile in reversed(candidates):
        matching = [n for n in nodes if node_matches(profile, n)]
        if profile.engine.tensor_parallel_size == "gpu-count":
            matching.sort(key=lambda n: (-n.count, n.memory_mib, n.name))
        else:
            matching.sort(key=lambda n: (n.memory_mib, n.count, n.name))
        for node in matching:
            result = _evaluate(table, profile, node, facts, forced=False)
            if isinstance(result, Selection):
                return _with_prediction(table, result, facts)
            misses.append(result)
    if not nodes:
        raise NoFit("NoMatchingGPU", "no schedulable GPU node is known (GPU Feature Discovery labels "
                    "nvidia.com/gpu.memory or cxygpt.io/gpu-memory-mib)", permanent=False)
    detail = f"; closest: {misses[0].message}" if misses else ""
    raise NoFit("NoMatchingGPU", f"no schedulable GPU node fits a {mode} profile "
                f"({', '.join(p.name for p in candidates)}){detail}", permanent=False)
