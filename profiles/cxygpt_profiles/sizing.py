"""Engine sizing (pure): the fewest GPUs of one node that hold a model and its KV cache, and the context they give."""
from __future__ import annotations

from dataclasses import dataclass

from .fit import FitEstimate, estimate_fit
from .table import FitConstants, Limits, ModelFacts, Profile


@dataclass(frozen=True)
class GpuEstimate:
    """What `gpus` GPUs of the node would give: the context, the fit estimate, and whether the profile's rule holds."""
    gpus: int
    fits: bool
    max_model_len: int
    fit: FitEstimate | None
    message: str

    def as_status(self) -> dict:
        """camelCase, as the CRD status carries it."""
        fit = {"weightsMiB": self.fit.weights_mib, "kvTokenCapacity": self.fit.kv_token_capacity} if self.fit else {}
        return {"gpus": self.gpus, "fits": self.fits, "maxModelLen": self.max_model_len, **fit,
                "message": self.message}


@dataclass(frozen=True)
class Sizing:
    """The engine's size on one node: `gpus` (the tensor-parallel size; None when no count fits), of `available`
    the node offers the profile, the context, the estimate for each count tried and why this one."""
    gpus: int | None
    available: int
    max_model_len: int
    fit: FitEstimate | None
    estimates: tuple[GpuEstimate, ...]
    reason: str

    @property
    def fits(self) -> bool:
        return self.gpus is not None

    def as_status(self) -> dict:
        return {"gpus": self.gpus, "available": self.available, "reason": self.reason,
                "estimates": [e.as_status() for e in self.estimates]}


def limits_for(profile: Profile, max_model_len: int) -> Limits:
    """Input limit shrinks with the context when the context is shorter than the profile's longest."""
    room = max_model_len - profile.limits.max_output_tokens
    if room >= profile.limits.max_input_tokens:
        return profile.limits
    return profile.limits.model_copy(update={"max_input_tokens": max(room, 1)})


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _estimate(profile: Profile, facts: ModelFacts, consts: FitConstants, memory_mib: int, gpus: int,
              lora_slots: tuple[int, int] | None = None) -> GpuEstimate:
    rule, engine = profile.sizing, profile.engine
    least = min(engine.max_model_len, facts.max_context)
    if facts.attention_heads % gpus:
        return GpuEstimate(gpus, False, least, None, f"{gpus} does not divide the model's {facts.attention_heads} "
                           "attention heads (tensor parallel splits them evenly)")

    def fit_at(length: int) -> FitEstimate:
        return estimate_fit(facts, weights=profile.weights, kv_cache_dtype=engine.kv_cache_dtype, max_model_len=length,
                            gpu_memory_utilization=engine.gpu_memory_utilization, gpu_memory_mib=memory_mib,
                            gpu_count=gpus, consts=consts, sequences=rule.sequences, lora_slots=lora_slots)

    fit = fit_at(least)
    if rule.context == "fixed" or not fit.fits or rule.context_limit is None:
        return GpuEstimate(gpus, fit.fits, least, fit, fit.message)
    # the longest context the KV cache holds `sequences` of: rounded down when the memory is what bounds it
    ceiling = min(rule.context_limit, facts.max_context)
    by_memory = fit.kv_token_capacity // rule.sequences
    length = ceiling if by_memory >= ceiling else max(least, by_memory // rule.context_multiple * rule.context_multiple)
    fit = fit_at(length)
    return GpuEstimate(gpus, fit.fits, length, fit, fit.message)


def _context_reason(profile: Profile, facts: ModelFacts, chosen: GpuEstimate) -> str:
    rule, length = profile.sizing, chosen.max_model_len
    if rule.context == "fixed":
        if length < profile.engine.max_model_len:
            return f"context {length} tokens, the model's own (the profile's is {profile.engine.max_model_len})"
        return f"context {length} tokens, the profile's"
    if length == facts.max_context:
        return f"context {length} tokens, the model's own maximum"
    if length == rule.context_limit:
        return f"context {length} tokens, the profile's limit"
    held = "one sequence" if rule.sequences == 1 else f"{rule.sequences} sequences"
    return f"context {length} tokens, what the KV cache holds for {held} of it"


def size_engine(profile: Profile, facts: ModelFacts | None, consts: FitConstants, *, memory_mib: int,
                available: int, lora_slots: tuple[int, int] | None = None) -> Sizing:
    """The fewest of the `available` GPUs (of `memory_mib` each) that the profile's rule is met with, from
    gpu.min_count to gpu.max_count, with the adapter slots of lora_slots = (max_loras, max_lora_rank) taken from the
    KV cache. Without the model's facts: the profile's fewest, at its context."""
    gpu, engine = profile.gpu, profile.engine
    most = min(gpu.max_count, available)
    if most < gpu.min_count:
        return Sizing(None, available, engine.max_model_len, None, (),
                      f"{profile.name} runs on {gpu.min_count} to {gpu.max_count} GPUs of one node; "
                      f"this one offers {available}")
    if facts is None:
        return Sizing(gpu.min_count, available, engine.max_model_len, None, (),
                      f"{_plural(gpu.min_count, 'GPU')}, the profile's fewest: the model's facts are unknown "
                      "(set spec.model.facts)")
    estimates = tuple(_estimate(profile, facts, consts, memory_mib, n, lora_slots)
                      for n in range(gpu.min_count, most + 1))
    chosen = next((e for e in estimates if e.fits), None)
    if chosen is None:
        last = estimates[-1]
        return Sizing(None, available, last.max_model_len, last.fit, estimates,
                      f"not on {_plural(most, 'GPU')} of {memory_mib} MiB: {last.message}")
    holds = (f"{chosen.fit.weights_mib} MiB of {profile.weights} weights and a KV cache of "
             f"{chosen.fit.kv_token_capacity} tokens" if chosen.fit else "")
    sequences = profile.sizing.sequences
    wanted = f"{'one sequence' if sequences == 1 else f'{sequences} sequences'} of {chosen.max_model_len} tokens"
    if chosen.gpus == gpu.min_count:
        reason = f"{_plural(chosen.gpus, 'GPU')} {'holds' if chosen.gpus == 1 else 'hold'} {holds} ({wanted})"
    else:
        below = estimates[:chosen.gpus - gpu.min_count]
        # the most GPUs below that the memory ruled out (a count that splits no heads says less)
        fewer = next((e for e in reversed(below) if e.fit is not None), below[-1])
        reason = (f"{_plural(chosen.gpus, 'GPU')} (tensor parallel {chosen.gpus}) hold {holds} ({wanted}); "
                  f"{_plural(fewer.gpus, 'GPU')}: {fewer.message}")
    if available > chosen.gpus:
        free = available - chosen.gpus
        reason += (f"; {free} more of the node's {available} GPUs {'stays' if free == 1 else 'stay'} free for other "
                   "engines (more demand runs more replicas)")
    reason += f"; {_context_reason(profile, facts, chosen)}"
    return Sizing(chosen.gpus, available, chosen.max_model_len, chosen.fit, estimates, reason)
