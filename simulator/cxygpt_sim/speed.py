"""The step-time model (pure): how long one engine step takes, from what the scheduler put into it."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Speed:
    """A step runs its batch in one forward pass: a fixed part that grows with the batch, plus a part per prefill
    token and a part per token of context that attention reads."""
    ttft_ms: float             # first token of a short prompt on an idle engine (one step with a short prefill)
    itl_ms: float              # one decode step with a single running sequence; 0 decodes a reply in one step
    prefill_ms_per_1k: float   # extra time per 1000 prompt tokens computed in the step
    itl_batch_slope: float     # the fixed part gets this fraction slower per additional sequence in the step
    context_ms_per_1k: float = 0.0  # extra time per 1000 tokens of context (KV) the step's sequences attend to
    jitter: float = 0.0        # each step varies by up to ± this fraction (seeded RNG)

    @property
    def instant_decode(self) -> bool:
        return self.itl_ms <= 0

    def step_s(self, *, prefill_tokens: int, sequences: int, context_tokens: int) -> float:
        """sequences: all in the step (decoding and prefilling); context_tokens: their KV after the step."""
        if sequences == 0:
            return 0.0
        ms = self.itl_ms * (1 + self.itl_batch_slope * (sequences - 1))
        ms += self.context_ms_per_1k * context_tokens / 1000
        if prefill_tokens:
            # a step with prefill pays the first token's fixed cost, so a short prompt on an idle engine takes
            # --ttft-ms as the knob says
            ms += max(self.ttft_ms - self.itl_ms, 0) + self.prefill_ms_per_1k * prefill_tokens / 1000
        return ms / 1000

    def with_overrides(self, *, ttft_ms=None, itl_ms=None, prefill_ms_per_1k=None, itl_batch_slope=None,
                       jitter=None) -> "Speed":
        """A profile with some knobs replaced; prefill follows --ttft-ms and context follows --itl-ms unless set,
        so --ttft-ms 0 --itl-ms 0 is instant."""
        if prefill_ms_per_1k is None and ttft_ms is not None:
            prefill_ms_per_1k = self.prefill_ms_per_1k * ttft_ms / self.ttft_ms if self.ttft_ms else 0.0
        context_ms_per_1k = None
        if itl_ms is not None:
            context_ms_per_1k = self.context_ms_per_1k * itl_ms / self.itl_ms if self.itl_ms else 0.0
        given = dict(ttft_ms=ttft_ms, itl_ms=itl_ms, prefill_ms_per_1k=prefill_ms_per_1k,
                     itl_batch_slope=itl_batch_slope, context_ms_per_1k=context_ms_per_1k, jitter=jitter)
        return replace(self, **{k: v for k, v in given.items() if v is not None})


# Calibrated profiles name the GPU and model they were fitted on: sources and figures in simulator/README.md
# ("Speed model"), simulator vs published in BENCHMARKS.md ("Simulator calibration").
SPEED_PROFILES = {
    "instant": Speed(ttft_ms=0, itl_ms=0, prefill_ms_per_1k=0, itl_batch_slope=0),
    "fast": Speed(ttft_ms=5, itl_ms=1, prefill_ms_per_1k=5, itl_batch_slope=0.005),
    # Llama-3.1-8B-Instruct bf16 on one H100 80GB
    "h100-80g": Speed(ttft_ms=11, itl_ms=6.4, prefill_ms_per_1k=25, itl_batch_slope=0.03, context_ms_per_1k=0.05),
    # Llama-3.1-8B-Instruct bf16 on one A100
    "a100-80g": Speed(ttft_ms=25, itl_ms=12, prefill_ms_per_1k=60, itl_batch_slope=0.005, context_ms_per_1k=0.1),
    # not calibrated: a rough shape for a 32 GB card with a ~14B model
    "rtx5090-32g": Speed(ttft_ms=90, itl_ms=22, prefill_ms_per_1k=140, itl_batch_slope=0.02, context_ms_per_1k=0.1),
}
DEFAULT_SPEED_PROFILE = "h100-80g"
