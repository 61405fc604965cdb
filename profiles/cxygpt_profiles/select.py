"""Profile selection (pure): spec facts × GPU nodes × profile table → the profile and its resolved numbers."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .fit import FitEstimate
from .gpus import default_gpus
from .predict import Prediction, predict_profile
from .sizing import Sizing, limits_for, size_engine
from .table import Limits, ModelFacts, Profile, ProfileTable, default_catalog

AUTO = "auto"


@dataclass(frozen=True, order=True)
class GpuNode:
    """A schedulable node's GPUs of one kind as the operator sees them: memory per GPU (or per MIG slice), how many
    are allocatable, and the extended resource a pod requests them by."""
    memory_mib: int
    count: int
    name: str = ""
    product: str = "unknown"
    resource: str = "nvidia.com/gpu"
    mig: bool = False   # MIG slices: one engine runs on one slice (no tensor parallel across slices)

    @property
    def available(self) -> int:
        """GPUs one engine may take here."""
        return 1 if self.mig else self.count


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
    sizing: Sizing
    notes: tuple[str, ...] = field(default=())
    prediction: Prediction | None = None   # the engine's TTFT and TPOT at the profile's concurrency and context

    @property
    def tensor_parallel_size(self) -> int:
        return self.gpu_count


class NoFit(Exception):
    """No profile can run; `reason` is a condition reason, `permanent` whether only a spec change helps."""

    def __init__(self, reason: str, message: str, *, permanent: bool, fit: FitEstimate | None = None,
                 sizing: Sizing | None = None):
        super().__init__(message)
        self.reason, self.message, self.permanent, self.fit, self.sizing = reason, message, permanent, fit, sizing


def node_matches(profile: Profile, node: GpuNode) -> bool:
    return node.memory_mib >= profile.gpu.min_memory_mib and node.available >= profile.gpu.min_count


def _selection(profile: Profile, node: GpuNode, sized: Sizing, facts: ModelFacts | None, forced: bool) -> Selection:
    assert sized.gpus is not None  # a sizing that fits
    notes = () if facts else ("fit not estimated: model facts unknown (set spec.model.facts)",)
    return Selection(profile=profile, mode=profile.mode, node=node, gpu_count=sized.gpus,
                     max_model_len=sized.max_model_len, limits=limits_for(profile, sized.max_model_len), fit=sized.fit,
                     forced=forced, sizing=sized, notes=notes)


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


def size_on(table: ProfileTable, profile: Profile, node: GpuNode, facts: ModelFacts | None,
            lora_slots: tuple[int, int] | None = None) -> Sizing:
    return size_engine(profile, facts, table.fit, memory_mib=node.memory_mib, available=node.available,
                       lora_slots=lora_slots)


def select_profile(table: ProfileTable, *, mode: str, requested: str = AUTO, nodes: list[GpuNode],
                   facts: ModelFacts | None = None, variants: frozenset[str] = frozenset({"bf16"}),
                   prefer: frozenset[str] = frozenset(), lora_slots: tuple[int, int] | None = None) -> Selection:
    """The profile to run and its size. Auto: of the profiles of `mode` and the nodes that fit them, the fewest GPUs
    (an engine takes no more of a node than the model needs: more demand is more replicas), then the most capable
    profile (latest in the table), then the smallest node (bigger nodes stay free for bigger models); nodes of a
    `prefer`red product first; the adapter slots of lora_slots = (max_loras, max_lora_rank) counted. Forced: that
    profile on the node where it needs the fewest GPUs, or a NoFit saying why not."""
    if requested != AUTO:
        try:
            candidates = [table.get(requested)]
        except KeyError:
            raise NoFit("UnknownProfile", f"profile {requested!r} is not one of {', '.join(table.names)}",
                        permanent=True) from None
        if candidates[0].weights not in variants:
            raise NoFit("MissingWeightVariant", f"{requested} runs {candidates[0].weights} weights; "
                        f"set spec.model.variants.{candidates[0].weights}", permanent=True)
    else:
        candidates = [p for p in table.profiles if p.mode == mode and p.weights in variants]
        if not candidates:
            raise NoFit("NoProfileForMode", f"no profile for mode {mode!r} with weights in {sorted(variants)}",
                        permanent=True)
    forced = requested != AUTO
    rank = {p.name: i for i, p in enumerate(table.profiles)}
    fitting: list[tuple[Profile, GpuNode, Sizing]] = []
    missing: list[tuple[Profile, GpuNode, Sizing]] = []
    for profile in candidates:
        for node in nodes:
            if node_matches(profile, node):
                sized = size_on(table, profile, node, facts, lora_slots)
                (fitting if sized.fits else missing).append((profile, node, sized))
    if fitting:
        profile, node, sized = min(fitting, key=lambda o: (bool(prefer) and o[1].product not in prefer, o[2].gpus,
                                                           -rank[o[0].name], o[1].memory_mib, o[1].count, o[1].name))
        return _with_prediction(table, _selection(profile, node, sized, facts, forced), facts)
    if forced:
        raise _forced_miss(table, candidates[0], [n for _, n, _ in missing], facts, lora_slots)
    if not nodes:
        raise NoFit("NoMatchingGPU", "no schedulable GPU node is known (GPU Feature Discovery labels "
                    "nvidia.com/gpu.memory or cxygpt.io/gpu-memory-mib)", permanent=False)
    closest = min(missing, key=lambda o: (-rank[o[0].name], -o[1].memory_mib, -o[1].count), default=None)
    detail = f"; closest: {closest[0].name} on {closest[1].name}: {closest[2].reason}" if closest else ""
    raise NoFit("NoMatchingGPU", f"no schedulable GPU node fits a {mode} profile "
                f"({', '.join(p.name for p in candidates)}){detail}", permanent=False,
                fit=closest[2].fit if closest else None, sizing=closest[2] if closest else None)


def _forced_miss(table: ProfileTable, profile: Profile, matching: list[GpuNode], facts: ModelFacts | None,
                 lora_slots: tuple[int, int] | None) -> NoFit:
    """Why a forced profile runs on none of the nodes: permanent when even its most GPUs of the largest memory it
    has seen (its minimum, without a node) cannot hold the model."""
    memory = max((n.memory_mib for n in matching), default=profile.gpu.min_memory_mib)
    most = size_engine(profile, facts, table.fit, memory_mib=memory, available=profile.gpu.max_count,
                       lora_slots=lora_slots)
    where = f"{profile.name} on up to {profile.gpu.max_count}x{memory} MiB"
    if not most.fits:
        return NoFit("InsufficientGPUMemory", f"{where}: {most.reason}", permanent=True, fit=most.fit, sizing=most)
    if matching:
        return NoFit("NoMatchingGPU", f"{profile.name} needs {most.gpus} GPUs of {memory} MiB on one node; the "
                     f"schedulable nodes that fit it have fewer ({', '.join(sorted({n.name for n in matching}))})",
                     permanent=False, sizing=most)
    return NoFit("NoMatchingGPU", f"no schedulable node has {profile.gpu.min_count}+ GPUs of "
                 f"{profile.gpu.min_memory_mib}+ MiB for {profile.name}", permanent=False)
