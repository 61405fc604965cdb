"""Continuous-batching scheduler core (pure): slots, KV blocks, waiting queue and the speed model."""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Speed:
    """Step times. A step prefills newly admitted sequences and decodes one token for every running one."""
    ttft_ms: float             # first token of a short prompt on an idle engine
    itl_ms: float              # one decode step with a single running sequence
    prefill_ms_per_1k: float   # extra prefill time per 1000 prompt tokens
    itl_batch_slope: float     # a decode step gets this fraction slower per additional running sequence
    jitter: float = 0.0        # each step varies by up to ± this fraction (seeded RNG)

    @property
    def instant_decode(self) -> bool:
        return self.itl_ms <= 0

    def prefill_s(self, prompt_tokens: int) -> float:
        return (self.ttft_ms + self.prefill_ms_per_1k * prompt_tokens / 1000) / 1000

    def decode_s(self, batch: int) -> float:
        return self.itl_ms * (1 + self.itl_batch_slope * (batch - 1)) / 1000

    def with_overrides(self, *, ttft_ms=None, itl_ms=None, prefill_ms_per_1k=None, itl_batch_slope=None,
                       jitter=None) -> "Speed":
        """A profile with some knobs replaced; prefill follows --ttft-ms unless set, so TTFT 0 means instant."""
        if prefill_ms_per_1k is None and ttft_ms is not None:
            prefill_ms_per_1k = self.prefill_ms_per_1k * ttft_ms / self.ttft_ms if self.ttft_ms else 0.0
        given = dict(ttft_ms=ttft_ms, itl_ms=itl_ms, prefill_ms_per_1k=prefill_ms_per_1k,
                     itl_batch_slope=itl_batch_slope, jitter=jitter)
        return replace(self, **{k: v for k, v in given.items() if v is not None})


# Rough shapes of real engines (bf16 ~8-14B models), so demos feel like the hardware they name.
SPEED_PROFILES = {
    "instant": Speed(ttft_ms=0, itl_ms=0, prefill_ms_per_1k=0, itl_batch_slope=0),
    "fast": Speed(ttft_ms=5, itl_ms=1, prefill_ms_per_1k=5, itl_batch_slope=0.005),
    "h100-80g": Speed(ttft_ms=60, itl_ms=14, prefill_ms_per_1k=90, itl_batch_slope=0.012),
    "rtx5090-32g": Speed(ttft_ms=90, itl_ms=22, prefill_ms_per_1k=140, itl_batch_slope=0.02),
}
DEFAULT_SPEED_PROFILE = "h100-80g"


@dataclass(frozen=True)
class Capacity:
    max_num_seqs: int
    kv_blocks: int
    block_size: int = 16

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


@dataclass(eq=False)
class Sequence:
    """One request inside the engine; times come from the caller's clock."""
    id: str
    prompt_tokens: int
    output_tokens: int          # the reply's length, already capped by max_tokens
    arrived: float
    generated: int = 0
    blocks: int = 0
    state: str = "new"          # waiting | running | finished | cancelled
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    preemptions: int = 0


@dataclass(frozen=True)
class Step:
    duration_s: float
    admitted: int               # sequences that start (or restart) prefill in this step


@dataclass(frozen=True)
class Progress:
    seq: Sequence
    new_tokens: int
    gap_s: float | None         # time since the previous token; None for the first token
    done: bool


class Scheduler:
    """vLLM V1's shape: FCFS waiting queue, at most max_num_seqs running, KV blocks allocated as tokens
    grow, and the newest running sequence preempted (recomputed later) when blocks run out."""

    def __init__(self, capacity: Capacity, speed: Speed, seed: int | None = None):
        self.capacity, self.speed = capacity, speed
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_blocks = capacity.kv_blocks
        self.preemptions_total = 0
        self._rng = random.Random(seed)

    @property
    def kv_usage(self) -> float:
        return (self.capacity.kv_blocks - self.free_blocks) / self.capacity.kv_blocks

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def submit(self, seq: Sequence) -> None:
        seq.state = "waiting"
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Frees the slot and blocks at once; the next step can admit a waiting sequence."""
        if seq.state == "running":
            self.running.remove(seq)
            self._release(seq)
        elif seq.state == "waiting":
            self.waiting.remove(seq)
        if seq.state != "finished":
            seq.state = "cancelled"

    def begin_step(self, now: float) -> Step:
        """Admit what fits and say how long this step takes."""
        decoding = len(self.running)
        prefill_tokens = 0
        while self.waiting and len(self.running) < self.capacity.max_num_seqs:
            seq = self.waiting[0]
            # a preempted sequence recomputes its prompt and what it had generated
            computed = seq.prompt_tokens + seq.generated
            need = self.capacity.blocks_for(computed + 1)
            if need > self.free_blocks:
                break  # FCFS: the head waits for blocks, nobody overtakes it
            self.waiting.popleft()
            self.free_blocks -= need
            seq.blocks, seq.state = need, "running"
            if seq.scheduled_at is None:
                seq.scheduled_at = now
            self.running.append(seq)
            prefill_tokens += computed
        admitted = len(self.running) - decoding
        duration = (self.speed.prefill_s(prefill_tokens) if admitted else 0.0) + \
                   (self.speed.decode_s(len(self.running)) if decoding else 0.0)
        if self.speed.jitter and duration:
            duration *= 1 + self.speed.jitter * self._rng.uniform(-1, 1)
        return Step(duration, admitted)

    def end_step(self, now: float) -> list[Progress]:
        """Every sequence still running gets its next token (all remaining ones when decode is instant)."""
        progress = []
        for seq in list(self.running):
            if seq.state != "running":
                continue  # preempted earlier in this loop
            count = seq.output_tokens - seq.generated if self.speed.instant_decode else 1
            if not self._grow(seq, seq.prompt_tokens + seq.generated + count):
                continue
            gap = None if seq.last_token_at is None else now - seq.last_token_at
            seq.generated += count
            seq.last_token_at = now
            if seq.first_token_at is None:
                seq.first_token_at = now
            done = seq.generated >= seq.output_tokens
            if done:
                self.running.remove(seq)
                self._release(seq)
                seq.state = "finished"
            progress.append(Progress(seq, count, gap, done))
        return progress

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for `tokens`, preempting the newest sequences if needed; False if seq itself was preempted."""
        need = self.capacity.blocks_for(tokens) - seq.blocks
        while need > self.free_blocks:
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.free_blocks -= max(need, 0)
        seq.blocks += max(need, 0)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.state = "waiting"
        seq.preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0
