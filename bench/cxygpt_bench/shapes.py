"""The fleet benchmark's workload shapes (pure, seeded): multi-turn chat with tenant system prompts, requests sharing
a long document inside one user message, completions prompts sharing a few-shot block, a mix that shares nothing;
Poisson arrivals."""
from __future__ import annotations

import functools
import heapq
import random
from collections.abc import Sequence
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

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _words(rng: random.Random, n: int) -> str:
    """n words, each after a space once joined to a text ending in ': ' or '. ' (so each is one token)."""
    return " ".join(rng.choices(WORDS, k=n))


def _check_ranges(spec, names: Sequence[str]) -> None:
    for name in names:
        low, high = getattr(spec, name)
        if low <= 0 or high < low:
            raise ValueError(f"{name}: need 0 < low <= high, got {low}..{high}")


def arrivals(key: str, rate: float, duration: float) -> list[float]:
    """Poisson arrival times at `rate` per second over [0, duration), fixed by the key, the rate and the duration."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    rng = random.Random(f"arrivals:{key}:{rate!r}:{duration!r}")
    out, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < duration:
        out.append(t)
    return out


def ramp(key: str, stages: Sequence[tuple[float, float]]) -> list[tuple[float, int]]:
    """(time, stage) of Poisson arrivals over stages of (rate, seconds) run back to back: each stage's arrivals are
    fixed by the key, its place, its rate and its length, so every front gets the same ones."""
    out, start = [], 0.0
    for k, (rate, seconds) in enumerate(stages):
        out += [(start + t, k) for t in arrivals(f"{key}:{k}", rate, seconds)]
        start += seconds
    return out


def zipf_weights(n: int, s: float) -> list[float]:
    """Weights of ranks 1..n under Zipf's law with exponent s (0: uniform)."""
    return [1.0 / (k + 1) ** s for k in range(n)]


# --- shape 1: multi-turn chat ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatSpec:
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
        _check_ranges(self, ("system_words", "first_user_words", "user_words", "answer_tokens", "turns", "think_s"))


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


def system_prompts(spec: ChatSpec, salt: int = 0) -> list[str]:
    """One per tenant; each starts with its own name, so no two share a first block. The salt changes the words,
    not their number (as for every text below: a salt keeps one front's sweep out of another's cache)."""
    out = []
    for t in range(spec.tenants):
        n = random.Random(f"chat-tenant:{spec.seed}:{t}").randint(*spec.system_words)
        words = random.Random(f"chat-tenant-words:{spec.seed}:{salt}:{t}")
        out.append(f"You are the assistant of tenant {t}. Follow these instructions. " + _words(words, n))
    return out


def conversation(spec: ChatSpec, index: int, salt: int = 0, point: int = 0) -> Conversation:
    """Conversation `index` of the workload: the same tenant, turns, lengths and think times for every rate, router,
    run, salt and point (its own seeded stream); the salt and the point (new conversations at each point of a
    sweep) change the words only."""
    rng = random.Random(f"chat-conversation:{spec.seed}:{index}")
    tenant = rng.choices(range(spec.tenants), weights=spec.tenant_weights)[0]
    shapes = [(rng.randint(*(spec.first_user_words if k == 0 else spec.user_words)), rng.randint(*spec.answer_tokens),
               rng.uniform(*spec.think_s)) for k in range(rng.randint(*spec.turns))]
    words = random.Random(f"chat-words:{spec.seed}:{salt}:{point}:{index}")
    return Conversation(index, tenant, tuple(
        Turn(user=f"User {index} asks, turn {k + 1}: " + _words(words, n), max_tokens=m, think_s=think)
        for k, (n, m, think) in enumerate(shapes)))


def chat_schedule(spec: ChatSpec, times: Sequence[float], salt: int = 0,
                  point: int = 0) -> tuple[list[Send], list[Conversation]]:
    """Requests at the given arrival times: each arrival is the next turn of the conversation that has been ready
    longest (its previous turn sent at least its think time ago), or else the first turn of a new conversation.
    So the offered rate is the arrivals' from the first second, conversations start open-loop as users arrive, and
    turns follow their think times. The sends depend on the workload's seed and the times alone."""
    spec.check()
    sends: list[Send] = []
    conversations: list[Conversation] = []
    ready: list[tuple[float, int, int]] = []   # (ready at, conversation, next turn)
    for t in times:
        if ready and ready[0][0] <= t:
            _, c, k = heapq.heappop(ready)
        else:
            c, k = len(conversations), 0
            conversations.append(conversation(spec, c, salt, point))
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


# --- shapes 2-4: requests that do not depend on earlier answers ------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One request of a shape: its path, its body's prompt part (`messages` or `prompt`) and `max_tokens`, and the
    group whose prefix it shares (-1: none)."""
    path: str
    fields: dict
    max_tokens: int
    group: int


@dataclass(frozen=True)
class DocumentSpec:
    """Shape 2 (RAG, API traffic): one user message = one of `groups` long documents (or few-shot blocks), chosen
    by Zipf's law, then a question of its own; a short system prompt shared by all."""
    groups: int = 32
    zipf: float = 0.8
    document_words: tuple[int, int] = (3500, 4500)
    question_words: tuple[int, int] = (20, 150)
    answer_tokens: tuple[int, int] = (32, 128)
    system: str = "You answer questions about the document the user gives, from the document only."
    seed: int = 1

    def check(self) -> None:
        if self.groups < 1 or self.zipf < 0:
            raise ValueError("groups must be at least 1 and zipf not negative")
        _check_ranges(self, ("document_words", "question_words", "answer_tokens"))


@dataclass(frozen=True)
class CompletionsSpec:
    """Shape 3 (/v1/completions): every prompt = an instruction header shared by all, one of `groups` few-shot
    blocks (Zipf), then the item; the header is longer than a few hundred characters, as templates are."""
    groups: int = 24
    zipf: float = 0.8
    header_words: tuple[int, int] = (100, 100)
    shots_words: tuple[int, int] = (2500, 3500)
    item_words: tuple[int, int] = (50, 300)
    answer_tokens: tuple[int, int] = (32, 128)
    seed: int = 1

    def check(self) -> None:
        if self.groups < 1 or self.zipf < 0:
            raise ValueError("groups must be at least 1 and zipf not negative")
        _check_ranges(self, ("header_words", "shots_words", "item_words", "answer_tokens"))


@dataclass(frozen=True)
class UnsharedSpec:
    """Shape 4: a mix of short questions and long pasted texts in one user message each, no system prompt, so no
    two requests share even a first block."""
    long_share: float = 0.4
    short_words: tuple[int, int] = (50, 400)
    long_words: tuple[int, int] = (1500, 4000)
    answer_tokens: tuple[int, int] = (32, 128)
    seed: int = 1

    def check(self) -> None:
        if not 0 <= self.long_share <= 1:
            raise ValueError("long_share must be within 0..1")
        _check_ranges(self, ("short_words", "long_words", "answer_tokens"))


def _group(rng: random.Random, groups: int, s: float) -> int:
    return rng.choices(range(groups), weights=zipf_weights(groups, s))[0]


@functools.lru_cache(maxsize=256)
def _block(kind: str, seed: int, salt: int, group: int, words: tuple[int, int]) -> str:
    n = random.Random(f"{kind}:{seed}:{group}").randint(*words)
    return _words(random.Random(f"{kind}-words:{seed}:{salt}:{group}"), n)


def _grouped(kind: str, spec, index: int, own: tuple[int, int]) -> tuple[int, int, int]:
    """(group, words of its own, answer tokens) of a request of a grouped shape."""
    rng = random.Random(f"{kind}-request:{spec.seed}:{index}")
    return _group(rng, spec.groups, spec.zipf), rng.randint(*own), rng.randint(*spec.answer_tokens)


def document_request(spec: DocumentSpec, index: int, salt: int = 0, point: int = 0) -> Request:
    group, question, answer = _grouped("document", spec, index, spec.question_words)
    words = random.Random(f"document-question:{spec.seed}:{salt}:{point}:{index}")
    user = (f"Document {group}: " + _block("document", spec.seed, salt, group, spec.document_words)
            + f"\n\nQuestion {index}: " + _words(words, question))
    return Request(CHAT, {"messages": [{"role": "system", "content": spec.system}, {"role": "user", "content": user}]},
                   answer, group)


def completions_request(spec: CompletionsSpec, index: int, salt: int = 0, point: int = 0) -> Request:
    group, item, answer = _grouped("completions", spec, index, spec.item_words)
    words = random.Random(f"completions-item:{spec.seed}:{salt}:{point}:{index}")
    prompt = ("Instructions: " + _block("completions-header", spec.seed, salt, 0, spec.header_words)
              + f"\n\nExamples {group}: " + _block("completions-shots", spec.seed, salt, group, spec.shots_words)
              + f"\n\nInput {index}: " + _words(words, item) + "\nOutput:")
    return Request(COMPLETIONS, {"prompt": prompt}, answer, group)


def unshared_request(spec: UnsharedSpec, index: int, salt: int = 0, point: int = 0) -> Request:
    rng = random.Random(f"unshared-request:{spec.seed}:{index}")
    n = rng.randint(*(spec.long_words if rng.random() < spec.long_share else spec.short_words))
    answer = rng.randint(*spec.answer_tokens)
    words = random.Random(f"unshared-words:{spec.seed}:{salt}:{point}:{index}")
    return Request(CHAT, {"messages": [{"role": "user", "content": f"Request {index}: " + _words(words, n)}]},
                   answer, -1)


SHAPES = ("chat", "document", "completions", "unshared")
SHARING = ("chat", "document", "completions")   # the shapes whose requests share prefixes
SPECS = {"chat": ChatSpec, "document": DocumentSpec, "completions": CompletionsSpec, "unshared": UnsharedSpec}
_REQUEST = {"document": document_request, "completions": completions_request, "unshared": unshared_request}
_OWN = {"document": "question_words", "completions": "item_words"}   # the grouped shapes: their own part
AnySpec = ChatSpec | DocumentSpec | CompletionsSpec | UnsharedSpec


def spec_of(shape: str, seed: int) -> AnySpec:
    return SPECS[shape](seed=seed)


def request(shape: str, spec: AnySpec, index: int, salt: int = 0, point: int = 0) -> Request:
    """Request `index` of an independent shape: its group, lengths and `max_tokens` fixed by the seed and the index;
    its words by the salt too (the shared blocks: documents, headers, few-shot blocks) and by the point (its own
    part: a question, an item, a whole unshared prompt), so that each point of a sweep sends new requests over
    the same shared prefixes."""
    return _REQUEST[shape](spec, index, salt, point)


def warm_indices(shape: str, spec: AnySpec, limit: int = 100_000) -> list[int]:
    """Requests that cover every shared prefix of an independent shape once: the first request of each group
    (none for a shape without groups)."""
    if shape not in _OWN:
        return []
    found: dict[int, int] = {}
    for i in range(limit):
        if len(found) == spec.groups:
            break
        found.setdefault(_grouped(shape, spec, i, getattr(spec, _OWN[shape]))[0], i)
    return sorted(found.values())

