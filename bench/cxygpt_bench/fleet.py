"""The fleet benchmark's pure parts: the multi-turn chat workload and its arrival schedule, the ideal prefix-cache
hit rate, load balance from samples, and the goals (issue 15)."""
from __future__ import annotations

import hashlib
import heapq
import random
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# Common English words that Qwen's tokenizer (the simulator's) keeps whole after a space, so a text of N words is
# close to N tokens; the benchmark reports the measured token counts
WORDS = tuple("""
the of and to in is for on with as by at from that this it be are was or an not which have has can will one all
their more other its new also time when there would some use first two only may any most over people such these
after work system data model user page team case part place group point order rate level state power line form price
value plan note cost area view hand life home study month story week light voice water market field class river
money music party night paper range start sound table design budget report service support account access policy
option update change review request result error issue question answer client server network cloud cluster engine
memory cache token stream queue limit route batch scale metric alert build test deploy release version branch commit
merge check debug trace log event record index search filter sort share store load save send read write open close
begin end stop run wait call reply agent tool task job
""".split())


@dataclass(frozen=True)
class WorkloadSpec:
    """Tenants with long system prompts; conversations of a tenant with user messages, answer lengths and think
    times; every range inclusive and seeded."""
    tenants: int = 4
    tenant_weights: tuple[float, ...] = (4, 3, 2, 1)   # share of conversations per tenant (skewed: a hot tenant)
    system_words: tuple[int, int] = (1000, 3000)
    first_user_words: tuple[int, int] = (400, 1600)  # a conversation opens with pasted text (a document, code)
    user_words: tuple[int, int] = (30, 200)
    answer_tokens: tuple[int, int] = (32, 128)
    turns: tuple[int, int] = (2, 10)
    think_s: tuple[float, float] = (2.0, 5.0)        # from one turn's send to the next's, at the earliest
    seed: int = 1

    def check(self) -> None:
        if self.tenants < 1 or len(self.tenant_weights) != self.tenants or min(self.tenant_weights) <= 0:
            raise ValueError("one positive weight per tenant")
        for name in ("system_words", "first_user_words", "user_words", "answer_tokens", "turns", "think_s"):
            low, high = getattr(self, name)
            if low <= 0 or high < low:
                raise ValueError(f"{name}: need 0 < low <= high, got {low}..{high}")


@dataclass(frozen=True)
class Turn:
    user: str
    max_tokens: int
    think_s: float       # until the next turn may be sent


@dataclass(frozen=True)
class Conversation:
    index: int
    tenant: int
    turns: tuple[Turn, ...]

    @property
    def id(self) -> str:
        return f"c{self.index}"


@dataclass(frozen=True)
class Send:
    at: float            # seconds from the start of the point
    conversation: int
    turn: int


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def system_prompts(spec: WorkloadSpec) -> list[str]:
    """One per tenant; each starts with its own name, so no two share a first block."""
    out = []
    for t in range(spec.tenants):
        rng = random.Random(f"fleet-tenant:{spec.seed}:{t}")
        n = rng.randint(*spec.system_words)
        out.append(f"You are the assistant of tenant {t}. Follow these instructions. " + _words(rng, n))
    return out


def conversation(spec: WorkloadSpec, index: int) -> Conversation:
    """Conversation `index` of the workload: the same for every rate, router and run (its own seeded stream)."""
    rng = random.Random(f"fleet-conversation:{spec.seed}:{index}")
    tenant = rng.choices(range(spec.tenants), weights=spec.tenant_weights)[0]
    turns = tuple(Turn(user=f"User {index} asks, turn {k + 1}: "
                       + _words(rng, rng.randint(*(spec.first_user_words if k == 0 else spec.user_words))),
                       max_tokens=rng.randint(*spec.answer_tokens), think_s=rng.uniform(*spec.think_s))
                  for k in range(rng.randint(*spec.turns)))
    return Conversation(index, tenant, turns)


def schedule(spec: WorkloadSpec, rate: float, duration: float) -> tuple[list[Send], list[Conversation]]:
    """Requests as Poisson arrivals at `rate` per second over `duration`: each arrival is the next turn of the
    conversation that has been ready longest (its previous turn sent at least its think time ago), or else the
    first turn of a new conversation. So the offered rate is the target from the first second, conversations
    start open-loop as users arrive, and turns follow their think times. Seeded by the workload's seed and the
    rate alone: every front gets the same arrivals at a load."""
    spec.check()
    rng = random.Random(f"fleet-schedule:{spec.seed}:{rate!r}:{duration!r}")
    sends: list[Send] = []
    conversations: list[Conversation] = []
    ready: list[tuple[float, int, int]] = []   # (ready at, conversation, next turn)
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        if ready and ready[0][0] <= t:
            _, c, k = heapq.heappop(ready)
        else:
            c, k = len(conversations), 0
            conversations.append(conversation(spec, c))
        sends.append(Send(t, c, k))
        turns = conversations[c].turns
        if k + 1 < len(turns):
            heapq.heappush(ready, (t + turns[k].think_s, c, k + 1))
    return sends, conversations


def messages(system: str, conv: Conversation, turn: int, answers: Sequence[str]) -> list[dict]:
    """The chat history of `turn`: the tenant's system prompt, then each earlier user message and the assistant's
    actual answer to it, then this turn's user message."""
    out = [{"role": "system", "content": system}]
    for k in range(turn):
        out += [{"role": "user", "content": conv.turns[k].user}, {"role": "assistant", "content": answers[k]}]
    out.append({"role": "user", "content": conv.turns[turn].user})
    return out


def replica_of(seed: int, conversation_index: int, turn: int, replicas: int) -> int:
    """The client's random choice per request (a Kubernetes Service's): fixed by the request, not by timing."""
    return zlib.crc32(f"{seed}:{conversation_index}:{turn}".encode()) % replicas


# --- the ideal hit rate -----------------------------------------------------------------------------------

class PromptTokens:
    """Token ids of chat prompts as an engine renders and tokenizes them, given its `encode(text)` and
    `render(messages, add_generation_prompt)` (the simulator's: ChatML and Qwen3's tokenizer). Each message is
    tokenized once: ChatML puts a special token at both ends of every message and special tokens split the text
    before BPE, so a prompt's ids are its messages' ids in order."""

    def __init__(self, encode: Callable[[str], list[int]], render: Callable[..., str]):
        self.encode, self.render = encode, render
        self.cache: dict[bytes, list[int]] = {}
        self.tail = encode(render([{"role": "user", "content": ""}], add_generation_prompt=True)
                           [len(render([{"role": "user", "content": ""}], add_generation_prompt=False)):])

    def _message(self, m: dict) -> list[int]:
        key = hashlib.blake2b(f"{m['role']}\0{m['content']}".encode(), digest_size=16).digest()
        ids = self.cache.get(key)
        if ids is None:
            ids = self.cache[key] = self.encode(self.render([m], add_generation_prompt=False))
        return ids

    def ids(self, messages: Sequence[dict]) -> list[int]:
        out: list[int] = []
        for m in messages:
            out += self._message(m)
        return out + self.tail


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks, as the simulator's prefix cache keys them: equal means equal prefix."""
    hashes, parent = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return hashes


def ideal_hits(prompts: Iterable[Sequence[int]], block_size: int = 16) -> tuple[int, int]:
    """(hit tokens, queried tokens) of the prompts, in order, against one prefix cache that never evicts, counted
    as the simulator counts vllm:prefix_cache_hits/queries: every prompt token is queried, the longest cached run of
    full blocks is hit, never the block holding the last token (it must be computed); every full block of a prompt
    is cached after it."""
    seen: set[int] = set()
    hits = queries = 0
    for ids in prompts:
        hashes = block_hashes(ids, block_size)
        queries += len(ids)
        for h in hashes[:(len(ids) - 1) // block_size]:
            if h not in seen:
                break
            hits += block_size
        seen.update(hashes)
    return hits, queries


def working_set(events: Iterable[tuple[float, int, int, bool]], shared_tokens: int) -> dict:
    """The prompt tokens the fleet would have to keep cached to miss nothing of what comes back: at each request,
    the latest prompt of every conversation that will send another turn (the shared system prompts counted once,
    in `shared_tokens`). events: (time sent, conversation, its prompt's tokens beyond the system prompt, whether
    it is the conversation's last turn), any order. Mean and max over the requests."""
    live: dict[int, int] = {}
    total, sizes = 0, []
    for _, conv, tokens, last in sorted(events):
        total -= live.pop(conv, 0)
        if not last:
            live[conv] = tokens
            total += tokens
        sizes.append(total + shared_tokens)
    return {"mean": sum(sizes) / len(sizes) if sizes else None, "max": max(sizes, default=None)}


# --- load balance -----------------------------------------------------------------------------------------

def balance(samples: Sequence[Sequence[float]]) -> dict:
    """From samples of requests in flight (running + waiting) per replica: each replica's mean and peak, and the
    busiest replica's mean over the mean of all (1.0 = even; the goal's max/mean)."""
    if not samples:
        return {"samples": 0, "mean": [], "peak": [], "max_over_mean": None}
    n = len(samples[0])
    means = [sum(s[i] for s in samples) / len(samples) for i in range(n)]
    peaks = [max(s[i] for s in samples) for i in range(n)]
    overall = sum(means) / n
    return {"samples": len(samples), "mean": means, "peak": peaks,
            "max_over_mean": max(means) / overall if overall > 0 else None}


# --- goals ------------------------------------------------------------------------------------------------

P90_VS_LEAST_LOAD = 5.0        # prefix's p90 TTFT at least this many times lower than least-load's
P90_VS_CACHE_AWARE = 1.5       # ... and than vllm-router cache_aware's
TOKENS_VS_LEAST_LOAD = 1.3     # output tokens/s at least this many times least-load's
HIT_OF_IDEAL = 0.90            # prefix hit rate at least this share of the ideal
MAX_OVER_MEAN = 1.25           # the busiest replica's mean in flight over the fleet's mean
TWO_P90_SLACK = 0.10           # two gateways "as good as one": p90 TTFT at most 10 % above one's
TWO_HIT_POINTS = 0.02          # ... and hit rate at most 2 points below
JUDGED_LOADS = ("80%", "100%")

PREFIX, LEAST, CACHE_AWARE, TWO = "gw-prefix", "gw-least-load", "vr-cache_aware", "gw-prefix-x2"


def _ratio(a, b):
    return a / b if a is not None and b else None


def judge(points: dict[str, dict[str, dict]], loads: Iterable[str] = JUDGED_LOADS) -> list[dict]:
    """The goals at each judged load, from the points' summaries (front -> load -> {ttft_p90_ms,
    output_tokens_per_s, hit_rate, ideal_hit_rate, max_over_mean, errors}); a row per goal with its measured value
    and met (None when a front it needs was not measured)."""
    rows = []
    for load in loads:
        get = lambda front, load=load: (points.get(front) or {}).get(load)
        p, ll, ca, two = get(PREFIX), get(LEAST), get(CACHE_AWARE), get(TWO)

        def row(goal, target, value, met, fmt="{:.2f}×", load=load):
            rows.append({"load": load, "goal": goal, "target": target,
                         "measured": "-" if value is None else fmt.format(value),
                         "met": None if value is None else bool(met)})

        v = _ratio(ll and ll["ttft_p90_ms"], p and p["ttft_p90_ms"])
        row("p90 TTFT: least-load / prefix", f"≥ {P90_VS_LEAST_LOAD:g}×", v, v is not None and v >= P90_VS_LEAST_LOAD)
        v = _ratio(ca and ca["ttft_p90_ms"], p and p["ttft_p90_ms"])
        row("p90 TTFT: vllm-router cache_aware / prefix", f"≥ {P90_VS_CACHE_AWARE:g}×", v,
            v is not None and v >= P90_VS_CACHE_AWARE)
        v = _ratio(p and p["output_tokens_per_s"], ll and ll["output_tokens_per_s"])
        row("output tokens/s: prefix / least-load", f"≥ {TOKENS_VS_LEAST_LOAD:g}×", v,
            v is not None and v >= TOKENS_VS_LEAST_LOAD)
        v = _ratio(p and p["hit_rate"], p and p["ideal_hit_rate"])
        row("prefix hit rate / ideal", f"≥ {HIT_OF_IDEAL:.0%}", v, v is not None and v >= HIT_OF_IDEAL, "{:.0%}")
        v = p and p["max_over_mean"]
        row("prefix max/mean in flight per replica", f"≤ {MAX_OVER_MEAN:g}", v, v is not None and v <= MAX_OVER_MEAN,
            "{:.2f}")
        if p and two and p["ttft_p90_ms"] and two["ttft_p90_ms"] is not None and p["hit_rate"] is not None \
                and two["hit_rate"] is not None:
            slower = two["ttft_p90_ms"] / p["ttft_p90_ms"] - 1
            lost = p["hit_rate"] - two["hit_rate"]
            rows.append({"load": load, "goal": "two gateways as good as one: p90 TTFT, hit rate",
                         "target": f"≤ +{TWO_P90_SLACK:.0%}, ≥ −{TWO_HIT_POINTS * 100:g} points",
                         "measured": f"{slower:+.0%}, {-lost * 100:+.1f} points",
                         "met": two["ttft_p90_ms"] <= (1 + TWO_P90_SLACK) * p["ttft_p90_ms"] + 1e-9
                         and two["hit_rate"] >= p["hit_rate"] - TWO_HIT_POINTS - 1e-9})
        else:
            row("two gateways as good as one: p90 TTFT, hit rate", f"≤ +{TWO_P90_SLACK:.0%}, "
                f"≥ −{TWO_HIT_POINTS * 100:g} points", None, None)
        for front, point in ((PREFIX, p), (TWO, two)):
            v = point and point["errors"]
            row(f"{front}: errors", "0", v, v == 0, "{:d}")
    return rows
