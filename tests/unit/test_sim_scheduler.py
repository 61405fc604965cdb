"""vLLM V1's scheduling on an injected clock: budget, decode first, chunks, preemption, prefix cache, no leaks."""
import random

import pytest

from cxygpt_sim.engine import Capacity, Scheduler, Sequence
from cxygpt_sim.kvcache import KVCache, block_hashes
from cxygpt_sim.speed import Speed

STEADY = Speed(ttft_ms=100, itl_ms=10, prefill_ms_per_1k=0, itl_batch_slope=0)


def seq(name: str, prompt, output: int = 5) -> Sequence:
    ids = list(range(1000 * hash(name) % 10**6, 1000 * hash(name) % 10**6 + prompt)) if isinstance(prompt, int) \
        else list(prompt)
    return Sequence(id=name, prompt_ids=ids, output_tokens=output, arrived=0.0)


def step(s: Scheduler, now: float = 0.0):
    st = s.begin_step(now)
    planned = {q.id: n for q, n in s.scheduled.items()}
    return st, planned, s.end_step(now + st.duration_s)


def test_decode_tokens_come_first_then_prefill_chunks_fcfs_within_the_budget():
    s = Scheduler(Capacity(max_num_seqs=8, kv_blocks=100, max_num_batched_tokens=20), STEADY)
    for name in "abc":
        s.submit(seq(name, 4, output=50))
    step(s)  # a, b, c prefilled together (12 tokens), each has its first token
    s.submit(seq("long", 40))
    s.submit(seq("next", 4))
    st, planned, progress = step(s)
    assert planned == {"a": 1, "b": 1, "c": 1, "long": 17}  # "next" waits: the budget is spent
    assert (st.tokens, st.decoding, st.prefill_tokens) == (20, 3, 17)
    assert {p.seq.id for p in progress} == {"a", "b", "c"}  # a partial prefill samples nothing


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding():
    s = Scheduler(Capacity(max_num_seqs=8, kv_blocks=100, max_num_batched_tokens=32), STEADY)
    for name in "ab":
        s.submit(seq(name, 4, output=50))
    step(s)
    long = seq("long", 100)
    s.submit(long)
    chunks = []
    while long.first_token_at is None:
        _, planned, progress = step(s)
        chunks.append(planned["long"])
        assert planned["a"] == planned["b"] == 1 and {"a", "b"} <= {p.seq.id for p in progress}
    assert chunks == [30, 30, 30, 10]


def test_the_budget_and_max_num_seqs_hold_in_every_step():
    rng = random.Random(1)
    s = Scheduler(Capacity(max_num_seqs=5, kv_blocks=400, max_num_batched_tokens=64), STEADY)
    for i in range(30):
        s.submit(seq(str(i), rng.randint(1, 300), output=rng.randint(1, 40)))
    steps = 0
    while s.has_work:
        st, planned, _ = step(s)
        assert st.tokens == sum(planned.values()) <= 64 and len(s.running) <= 5
        steps += 1
    assert steps > 30


def test_preemption_frees_the_newest_sequences_blocks_and_it_recomputes_first_in_line():
    # 6 blocks of 4 tokens: a and b fill them as they decode, c waits for a slot
    # a budget of 4: the preempted one could restart with a 3-token chunk in the very step that preempts it
    s = Scheduler(Capacity(max_num_seqs=2, kv_blocks=6, block_size=4, max_num_batched_tokens=4,
                           enable_prefix_caching=False), STEADY)
    a, b, c = seq("a", 4, output=12), seq("b", 4, output=12), seq("c", 4, output=2)
    for q in (a, b, c):
        s.submit(q)
    while b.preemptions == 0:
        st, _, _ = step(s)
    assert b.state == "waiting" and list(s.waiting) == [b, c] and b.computed == 0 and b.blocks == []
    assert st.admitted == 0  # a step that preempts admits nobody, though a slot is free
    assert a.state == "running" and a.preemptions == 0 and b.generated > 0
    generated = b.generated
    recomputed = 0
    while b.generated == generated:
        _, planned, _ = step(s)
        recomputed += planned.get("b", 0)
    # back in: its prompt and what it had generated are computed again (in chunks) before its next token
    assert recomputed == 4 + generated
    while s.has_work:
        step(s)
    assert all(q.state == "finished" for q in (a, b, c)) and a.generated == b.generated == 12
    assert s.preemptions_total >= 1 and s.free_blocks == 6


def test_a_prefix_hit_skips_the_cached_blocks_prefill_and_is_counted():
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=100, block_size=16), STEADY)
    system = list(range(64))
    first, second = seq("1", system + [1, 2, 3]), seq("2", system + [7, 8, 9, 10])
    s.submit(first)
    _, planned, _ = step(s)
    assert planned == {"1": 67}
    s.submit(second)
    _, planned, _ = step(s)
    assert planned == {"1": 1, "2": 4} and second.cached_tokens == 64
    assert (s.prefix_queries, s.prefix_hits) == (67 + 68, 64)
    assert first.blocks[:4] == second.blocks[:4]  # shared, not copied
    assert all(s.kv.ref_counts[b] == 2 for b in first.blocks[:4])


def test_copies_admitted_in_one_step_share_the_prompt_blocks_as_n_sequences_do():
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=100, block_size=16), STEADY)
    prompt = list(range(40))
    for i in range(3):
        s.submit(seq(str(i), prompt))
    _, planned, _ = step(s)
    assert planned == {"0": 40, "1": 8, "2": 8} and s.prefix_hits == 64


def test_the_last_prompt_token_is_always_computed():
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=100, block_size=16), STEADY)
    prompt = list(range(32))  # exactly two blocks
    s.submit(seq("1", prompt))
    step(s)
    s.submit(seq("2", prompt))
    _, planned, _ = step(s)
    assert planned["2"] == 16  # one block from the cache, the last one recomputed


def test_prefix_caching_off_computes_everything_and_counts_nothing():
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=100, block_size=16, enable_prefix_caching=False), STEADY)
    s.submit(seq("1", list(range(64))))
    step(s)
    s.submit(seq("2", list(range(64))))
    _, planned, _ = step(s)
    assert planned["2"] == 64 and (s.prefix_queries, s.prefix_hits) == (0, 0)


def test_block_hashes_chain_on_the_parent():
    a = block_hashes(list(range(48)), 16)
    b = block_hashes([99] + list(range(1, 48)), 16)
    assert len(a) == 3 and len(block_hashes(list(range(47)), 16)) == 2
    # same tokens in blocks 2 and 3, different first block: no hash in common
    assert not set(a) & set(b)
    assert block_hashes(list(range(48)) + [5], 16) == a


def test_free_cached_blocks_are_evicted_least_recently_freed_first():
    kv = KVCache(num_blocks=4, block_size=2)
    old, new = [], []
    old_hashes, new_hashes = block_hashes([1, 2, 3, 4], 2), block_hashes([5, 6, 7, 8], 2)
    assert kv.allocate(old, [], 4) and kv.allocate(new, [], 4)
    kv.cache_full_blocks(old, old_hashes, 4)
    kv.cache_full_blocks(new, new_hashes, 4)
    kv.release(old)
    kv.release(new)
    assert kv.usage == 0 and len(kv.cached_prefix(old_hashes, 5)) == 2
    # one new block evicts the oldest freed one: old's tail (a request's tail goes before its shared head)
    taker = []
    assert kv.allocate(taker, [], 1)
    assert len(kv.cached_prefix(old_hashes, 5)) == 1 and len(kv.cached_prefix(new_hashes, 5)) == 2
    assert kv.allocate(taker, [], 4)  # total tokens: one more block
    assert kv.cached_prefix(old_hashes, 5) == [] and len(kv.cached_prefix(new_hashes, 5)) == 2


def test_a_hit_on_a_free_block_takes_it_off_the_free_queue():
    kv = KVCache(num_blocks=3, block_size=2)
    hashes = block_hashes([1, 2, 3, 4], 2)
    first = []
    kv.allocate(first, [], 4)
    kv.cache_full_blocks(first, hashes, 4)
    kv.release(first)
    again = []
    cached = kv.cached_prefix(hashes, 5)
    # 3 blocks for 5 tokens: the 2 cached ones and the last free one; none may be handed out twice
    assert kv.allocate(again, cached, 5) and sorted(again) == [0, 1, 2] and kv.usage == 1
    assert not kv.allocate([], [], 1)
    kv.release(again)
    # 4 blocks for 7 tokens: the 2 cached free ones do not count twice, so 2 new ones are missing
    held = []
    assert not kv.allocate(held, kv.cached_prefix(hashes, 7), 7) and held == [] and kv.usage == 0


def test_cancel_frees_blocks_but_a_shared_prefix_stays_with_its_other_user():
    s = Scheduler(Capacity(max_num_seqs=4, kv_blocks=20, block_size=16), STEADY)
    system = list(range(32))
    a, b = seq("a", system + [1], output=50), seq("b", system + [2], output=50)
    s.submit(a)
    step(s)
    s.submit(b)
    step(s)
    shared = a.blocks[:2]
    s.cancel(a)
    assert a.state == "cancelled" and a.blocks == [] and all(s.kv.ref_counts[x] == 1 for x in shared)
    s.cancel(b)
    assert s.kv.usage == 0 and not s.has_work


def check_blocks(s: Scheduler, live: list[Sequence]) -> None:
    held = {}
    for q in live:
        for block in q.blocks:
            held[block] = held.get(block, 0) + 1
    assert s.kv.ref_counts == held
    used = set(range(s.kv.never_used_from))
    assert set(s.kv.freed) == used - set(held) and s.kv.free_blocks == s.kv.num_blocks - len(held)
    assert s.kv.hash_of == {b: h for h, b in s.kv.by_hash.items()}
    for q in live:
        assert len(q.blocks) == s.kv.blocks_for(q.computed + s.scheduled.get(q, 0)) or q.state == "waiting"


@pytest.mark.parametrize("caching", [True, False])
def test_no_block_leaks_after_random_submits_steps_and_cancels(caching):
    rng = random.Random(14)
    s = Scheduler(Capacity(max_num_seqs=6, kv_blocks=40, block_size=4, max_num_batched_tokens=24,
                           enable_prefix_caching=caching), STEADY)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(0, 20))] for _ in range(4)]
    live, now = [], 0.0
    for i in range(600):
        action = rng.random()
        if action < 0.3:
            q = seq(str(i), rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 30))],
                    output=rng.randint(1, 30))
            s.submit(q)
            live.append(q)
        elif action < 0.4 and live:
            s.cancel(live.pop(rng.randrange(len(live))))
        else:
            st = s.begin_step(now)
            if action < 0.45 and s.scheduled:  # a cancel while the step runs
                victim = rng.choice(list(s.scheduled))
                s.cancel(victim)
                live.remove(victim)
            check_blocks(s, live)
            now += st.duration_s
            s.end_step(now)
        live = [q for q in live if q.state in ("waiting", "running")]
        check_blocks(s, live)
    while s.has_work:
        step(s)
    assert s.kv.usage == 0 and s.kv.ref_counts == {}
    if caching:
        assert s.prefix_hits > 0


def test_blocks_never_used_go_before_any_cached_one_is_evicted():
    kv = KVCache(num_blocks=4, block_size=2)
    hashes, held = block_hashes([1, 2, 3, 4], 2), []
    kv.allocate(held, [], 4)
    kv.cache_full_blocks(held, hashes, 4)
    kv.release(held)
    assert kv.allocate([], [], 4) and len(kv.cached_prefix(hashes, 5)) == 2
