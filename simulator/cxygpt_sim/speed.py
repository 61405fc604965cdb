"""How long one engine step takes (pure): a GPU's step model for the served model, or the knobs' simple shape."""
from __future__ import annotations

from dataclasses import dataclass, replace

from cxygpt_profiles.roofline import StepShape, decode_step, prefill_step
from cxygpt_profiles.speed import StepModel


@dataclass(frozen=True)
class Speed:
    """The knobs' model: a step runs its batch in one forward pass, a fixed part that grows with the batch, plus a
    part per prefill token and a part per token of context that attention reads."""
    ttft_ms: float             # first token of a short prompt on an idle engine (one step with a short prefill)
    itl_ms: float              # one decode step with a single running sequence; 0 decodes a reply in one step
    prefill_ms_per_1k: float   # extra time per 1000 prompt tokens computed in the step
    itl_batch_slope: float     # the fixed part gets this fraction slower per additional sequence in the step
    context_ms_per_1k: float = 0.0  # extra time per 1000 tokens of context (KV) the step's sequences attend to
    jitter: float = 0.0        # each step varies by up to ± this fraction (seeded RNG)
    dispatch_s = 0.0           # no time on the CPU before a request's prefill: --ttft-ms says it all

    @property
    def instant_decode(self) -> bool:
        return self.itl_ms <= 0

    def step_s(self, shape: StepShape) -> float:
        if not shape.sequences:
            return 0.0
        ms = self.itl_ms * (1 + self.itl_batch_slope * (shape.sequences - 1))
        ms += self.context_ms_per_1k * shape.context_tokens / 1000
        if shape.prefill_tokens:
            # a step with prefill pays the first token's fixed cost, so a short prompt on an idle engine takes
            # --ttft-ms as the knob says
            ms += max(self.ttft_ms - self.itl_ms, 0) + self.prefill_ms_per_1k * shape.prefill_tokens / 1000
        return ms / 1000

    def with_overrides(self, *, ttft_ms=None, itl_ms=None, prefill_ms_per_1k=None, itl_batch_slope=None,
                       context_ms_per_1k=None, jitter=None) -> Speed:
        """Some knobs replaced; prefill follows --ttft-ms and context follows --itl-ms unless set, so
        --ttft-ms 0 --itl-ms 0 is instant."""
        if prefill_ms_per_1k is None and ttft_ms is not None:
            prefill_ms_per_1k = self.prefill_ms_per_1k * ttft_ms / self.ttft_ms if self.ttft_ms else 0.0
        if context_ms_per_1k is None and itl_ms is not None:
            context_ms_per_1k = self.context_ms_per_1k * itl_ms / self.itl_ms if self.itl_ms else 0.0
        given = dict(ttft_ms=ttft_ms, itl_ms=itl_ms, prefill_ms_per_1k=prefill_ms_per_1k,
                     itl_batch_slope=itl_batch_slope, context_ms_per_1k=context_ms_per_1k, jitter=jitter)
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    def describe(self) -> str:
        return (f"knobs: ttft {self.ttft_ms:g} ms + {self.prefill_ms_per_1k:g} ms per 1k prompt tokens, itl "
                f"{self.itl_ms:g} ms x (1 + {self.itl_batch_slope:g} per extra sequence in a step) + "
                f"{self.context_ms_per_1k:g} ms per 1k context tokens, jitter {self.jitter:g}")


@dataclass(frozen=True)
class GpuSpeed:
    """A GPU's step model for the served model (measured on silicon, or a fitted roofline: cxygpt_profiles.speed)."""
    model: StepModel
    jitter: float = 0.0
    instant_decode = False

    @property
    def dispatch_s(self) -> float:
        """Each request's time on the CPU before the scheduler sees it (vLLM's dispatch, beside the running
        steps): part of its TTFT, not of the engine's steps."""
        return self.model.dispatch_ms / 1000

    def step_s(self, shape: StepShape) -> float:
        return self.model.step_ms(shape) / 1000

    def describe(self) -> str:
        return f"{self.model.source}, dispatch {self.model.dispatch_ms:.1f} ms per request, jitter {self.jitter:g}"


def knob_base(model: StepModel) -> Speed:
    """The knobs' shape of a step model, for knobs given beside a GPU profile: what a short prompt and one decoding
    sequence take on an idle engine, what 1k more prompt tokens, more sequences and more context add."""
    itl = model.step_ms(decode_step(1, 1))
    return Speed(ttft_ms=model.step_ms(prefill_step(1)), itl_ms=itl,
                 prefill_ms_per_1k=(model.step_ms(prefill_step(2048)) - model.step_ms(prefill_step(1024))) / 1.024,
                 itl_batch_slope=(model.step_ms(decode_step(32, 1)) / itl - 1) / 31,
                 context_ms_per_1k=(model.step_ms(decode_step(1, 8192)) - model.step_ms(decode_step(1, 1024))) / 7.168)


# Speed profiles that stand for no GPU, for tests; every other profile is a GPU of profiles/gpus.yaml.
TEST_PROFILES = {
    "instant": Speed(ttft_ms=0, itl_ms=0, prefill_ms_per_1k=0, itl_batch_slope=0),
    "fast": Speed(ttft_ms=5, itl_ms=1, prefill_ms_per_1k=5, itl_batch_slope=0.005),
}
DEFAULT_SPEED_PROFILE = "h100-80g"
# an uncatalogued model has no facts: it runs at this one's speed on the profile's GPU
REFERENCE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
