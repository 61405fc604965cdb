"""The limits in force for a model: profile or discovered limits, then mode and profile overrides (pure)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cxygpt_profiles import Limits, ProfileTable

Mode = Literal["single", "multi"]


@dataclass(frozen=True)
class Effective:
    limits: Limits
    mode: Mode
    profile: str | None


def single_user_limits(limits: Limits, table: ProfileTable) -> Limits:
    """One user: no rate limits, a queue of one, and the larger output cap of the single-user profiles;
    the input limit gives up what the output gains so input + output still fits the same context."""
    single_caps = [p.limits.max_output_tokens for p in table.profiles if p.mode == "single"]
    output = max([limits.max_output_tokens, *single_caps])
    gained = output - limits.max_output_tokens
    return limits.model_copy(update={
        "rate_qps": None, "rate_tpm": None, "queue_size": 1,
        "max_output_tokens": output, "degraded_max_output_tokens": output,
        "max_input_tokens": max(limits.max_input_tokens - gained, 1)})


def effective(limits: Limits, mode: Mode, profile: str | None, *, table: ProfileTable,
              single_user: bool | None = None, force_profile: str | None = None) -> Effective:
    """`FORCE_PROFILE` replaces the limits and mode; `SINGLE_USER=1|0` then picks the mode."""
    if force_profile:
        forced = table.get(force_profile)
        limits, mode, profile = forced.limits, forced.mode, forced.name
    if single_user is not None:
        mode = "single" if single_user else "multi"
    if mode == "single":
        limits = single_user_limits(limits, table)
    return Effective(limits=limits, mode=mode, profile=profile)
