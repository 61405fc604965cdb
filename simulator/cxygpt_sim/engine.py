"""vLLM V1's scheduler in small (pure): a token budget per step, decode then prefill chunks, preemption by recompute,
at most --max-loras adapters in a batch."""
from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence as Ids
from dataclasses import dataclass, field

from cxygpt_profiles.roofline import StepShape

from .kvcache import KVCache, block_hashes
from .lora import Lora, LoraCache, LoraSettings, admissible
from .speed import GpuSpeed, Speed

DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192  # vLLM's API-server default on a GPU of 70 GiB or more that is not an A100


@dataclass(frozen=True)
class Capacity:
    max_num_seqs: int
    kv_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    enable_prefix_caching: bool = True


@dataclass(eq=False)
class Sequence:
    """One request inside the engine; times come from the caller's clock."""
    id: str
    prompt_ids: Ids[int]
    output_tokens: int          # the reply's length, already capped by max_tokens
    arrived: float
    generated: int = 0
    computed: int = 0           # tokens whose KV is computed (vLLM's num_computed_tokens)
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    cached_tokens: int = 0      # prompt tokens found in the prefix cache when last admitted
    state: str = "new"          # waiting | running | finished | cancelled
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    preemptions: int = 0
    lora: Lora | None = None    # the adapter it runs with; None: the base model

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """The prompt and what was generated: all of it must be computed to sample the next token."""
        return len(self.prompt_ids) + self.generated


@dataclass(frozen=True)
class Step:
    duration_s: float
    admitted: int               # sequences that start (or restart) in this step
    tokens: int                 # tokens computed in the step (vLLM's vllm:iteration_tokens_total)
    prefill_tokens: int
    decoding: int               # sequences computing one token to sample their next
    loras: int = 0              # distinct adapters in the batch
    lora_load_s: float = 0.0    # of the duration: reading adapters evicted from the CPU cache


@dataclass(frozen=True)
class Progress:
    seq: Sequence
    new_tokens: int
    gap_s: float | None         # time since the previous token; None for the first token
    done: bool


def step_shape(scheduled: dict[Sequence, int]) -> StepShape:
    """A sequence with output that computes just its last token decodes; every other computes a prefill chunk
    after the tokens it has computed (a prefix-cache hit among them)."""
    prefill, decoding, context = [], 0, 0
    for seq, tokens in scheduled.items():
        if seq.generated and seq.computed + 1 == seq.num_tokens:
            decoding += 1
            context += seq.num_tokens
        else:
            prefill.append((tokens, seq.computed))
    return StepShape(prefill=tuple(prefill), decode_count=decoding, decode_context=context)


class Scheduler:
    """Each step gives every running sequence (oldest first) the tokens it still needs, up to the step's token
    budget; with budget left and no preemption in the step, waiting sequences are admitted FCFS with their
    prompt in chunks; one whose adapter would make more than --max-loras in the batch is passed over for the step.
    When KV blocks run out the newest running sequence is preempted: it frees its blocks and goes back to the front
    of the queue to recompute (its prompt blocks may still be cached)."""

    def __init__(self, capacity: Capacity, speed: Speed | GpuSpeed, seed: int | None = None,
                 lora: LoraSettings | None = None):
        self.capacity, self.speed, self.lora = capacity, speed, lora
        self.lora_cache = LoraCache(lora.max_cpu_loras) if lora else None
        self.kv = KVCache(capacity.kv_blocks, capacity.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.scheduled: dict[Sequence, int] = {}   # this step's tokens per sequence, until end_step
        self.preemptions_total = 0
        self.prefix_queries = 0   # prompt tokens looked up in the prefix cache (vllm:prefix_cache_queries)
        self.prefix_hits = 0      # of those, tokens found cached (vllm:prefix_cache_hits)
        self._rng = random.Random(seed)

    @property
    def kv_usage(self) -> float:
        return self.kv.usage

    @property
    def free_blocks(self) -> int:
        return self.kv.free_blocks

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def submit(self, seq: Sequence) -> None:
        seq.state = "waiting"
        if self.capacity.enable_prefix_caching:
            seq.hashes = block_hashes(seq.prompt_ids, self.capacity.block_size)
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """Frees the slot and blocks at once; the next step can admit a waiting sequence."""
        if seq.state == "running":
            self.running.remove(seq)
            self.kv.release(seq.blocks)
        elif seq.state == "waiting":
            self.waiting.remove(seq)
        if seq.state != "finished":
            seq.state = "cancelled"

    def begin_step(self, now: float) -> Step:
        """Decide what this step computes and say how long it takes."""
        budget = self.capacity.max_num_batched_tokens
        scheduled = self.scheduled = {}
        preempted = False
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.state != "running":
                continue  # preempted for an older sequence earlier in this loop
            tokens = min(seq.num_tokens - seq.computed, budget)
            while not self.kv.allocate(seq.blocks, [], seq.computed + tokens):
                victim = self.running[-1]
                budget += scheduled.pop(victim, 0)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.state == "running":
                self.kv.cache_full_blocks(seq.blocks, seq.hashes, seq.computed + tokens)
                scheduled[seq] = tokens
                budget -= tokens
        admitted = 0
        # the adapters of every running sequence, scheduled in this step or not (vLLM's scheduled_loras)
        active = {seq.lora.id for seq in self.running if seq.lora}
        skipped = []
        # vLLM admits nobody in a step that had to preempt: the blocks are short already
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.capacity.max_num_seqs:
            seq = self.waiting[0]
            if self.lora and not admissible(seq.lora.id if seq.lora else None, active, self.lora.max_loras):
                # its adapter would be one too many in the batch: it waits this step, those behind it may go
                skipped.append(self.waiting.popleft())
                continue
            cached = self.kv.cached_prefix(seq.hashes, seq.num_tokens)
            hit = len(cached) * self.capacity.block_size
            tokens = min(seq.num_tokens - hit, budget)
            if not self.kv.allocate(seq.blocks, cached, hit + tokens):
                break  # FCFS: the head waits for blocks, nobody overtakes it
            self.waiting.popleft()
            if self.capacity.enable_prefix_caching:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += hit
            seq.computed, seq.cached_tokens, seq.state = hit, hit, "running"
            if seq.scheduled_at is None:
                seq.scheduled_at = now
            self.running.append(seq)
            # cached now, as vLLM does, so a copy admitted next in this very step (n > 1) shares the blocks
            self.kv.cache_full_blocks(seq.blocks, seq.hashes, hit + tokens)
            scheduled[seq] = tokens
            budget -= tokens
            admitted += 1
            if seq.lora:
                active.add(seq.lora.id)
        self.waiting.extendleft(reversed(skipped))  # back at the front, in their order
        shape = step_shape(scheduled)
        duration = self.speed.step_s(shape)
        if self.speed.jitter and duration:
            duration *= 1 + self.speed.jitter * self._rng.uniform(-1, 1)
        loras = {seq.lora.id: seq.lora for seq in scheduled if seq.lora}
        load_s = 0.0
        if loras:
            assert self.lora and self.lora_cache  # a sequence has an adapter only when LoRA is enabled
            duration *= 1 + self.lora.step_overhead
            load_s = self.lora_cache.use(loras.values())
        return Step(duration + load_s, admitted, shape.tokens, shape.prefill_tokens, shape.decode_count,
                    len(loras), load_s)

    def load_lora(self, lora: Lora, inplace: bool = False) -> float:
        """An adapter loaded into the worker's CPU cache (vLLM's add_lora): the seconds reading it takes."""
        assert self.lora_cache, "LoRA is not enabled"  # the server refuses loads first
        return self.lora_cache.load(lora, inplace)

    def end_step(self, now: float) -> list[Progress]:
        """The step's tokens are computed; a sequence whose every token is computed samples its next one (all of
        its remaining ones when decode is instant)."""
        progress = []
        for seq, tokens in self.scheduled.items():
            if seq.state != "running":
                continue  # cancelled during the step
            seq.computed += tokens
            if seq.computed < seq.num_tokens:
                continue  # a prefill chunk: no token yet
            count = seq.output_tokens - seq.generated if self.speed.instant_decode else 1
            gap = None if seq.last_token_at is None else now - seq.last_token_at
            seq.generated += count
            seq.last_token_at = now
            if seq.first_token_at is None:
                seq.first_token_at = now
            done = seq.generated >= seq.output_tokens
            if done:
                self.running.remove(seq)
                self.kv.release(seq.blocks)
                seq.state = "finished"
            progress.append(Progress(seq, count, gap, done))
        self.scheduled = {}
        return progress

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq.blocks)
        seq.computed, seq.state = 0, "waiting"
        seq.preemptions += 1
        self.preemptions_total += 1
        self.waiting.appendleft(seq)
