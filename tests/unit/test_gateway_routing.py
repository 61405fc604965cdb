"""Routing (pure): the prefix key, the hash ring, bounded loads, least load and its ties, round robin, and the
queue taking the first free replica of the order."""
import asyncio
import random

import pytest

from cxygpt_gateway.admission.queue import MAX_PASSES, Backend, ModelQueue
from cxygpt_gateway.routing.index import PrefixIndex
from cxygpt_gateway.routing.keys import (
    CHUNK_CHARS,
    KEY_CHARS,
    MAX_CHUNKS,
    PROMPT_KEY_CHARS,
    RouteKey,
    chunk_chain,
    request_key,
    route_key,
)
from cxygpt_gateway.routing.policies import Router, Routing, load_bound, order, resolve
from cxygpt_gateway.routing.ring import Ring
from cxygpt_gateway.upstream.engine_metrics import EngineLoad, engine_load

PREFIX = Routing("prefix", 0.25)
LEAST = Routing("least-load")
ROUND = Routing("round-robin")
SYSTEM = {"role": "system", "content": "You are the support assistant of ACME. " * 60}


def replicas(n, **state):
    out = [Backend(f"http://10.0.0.{i}:8000") for i in range(n)]
    for b in out:
        for k, v in state.items():
            setattr(b, k, v)
    return out


def chat(*messages, **fields):
    return {"model": "m", "messages": list(messages), **fields}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---- the key --------------------------------------------------------------------------------------------------

def test_the_key_is_the_same_in_every_process_and_release():
    """A literal: Python's hash() would differ per process (PYTHONHASHSEED), so two gateways would not agree."""
    assert request_key("chat", chat(SYSTEM, user("hi"))) == 0x7D81F0EA3C7C3CE7
    assert request_key("chat", chat(user("hi")), session="s-1") == 0x5F3F145E049E305B


def test_every_turn_of_a_conversation_has_its_first_turns_key():
    first = chat(SYSTEM, user("my printer is on fire"))
    later = chat(SYSTEM, user("my printer is on fire"), assistant("Unplug it."), user("done, now what?"))
    assert request_key("chat", first) == request_key("chat", later)


def test_users_who_share_a_long_system_prompt_get_different_keys():
    keys = {request_key("chat", chat(SYSTEM, user(f"question {i}"))) for i in range(50)}
    assert len(keys) == 50
    other_tenant = {**SYSTEM, "content": SYSTEM["content"] + "!"}
    assert request_key("chat", chat(other_tenant, user("question 0"))) not in keys


def test_content_parts_count_as_their_text():
    parts = [{"type": "text", "text": "my printer"}, {"type": "text", "text": "is on fire"}]
    assert (request_key("chat", chat(user(parts)))
            == request_key("chat", chat(user(parts), assistant("Unplug it."), user("ok"))))
    assert request_key("chat", chat(user(parts))) != request_key("chat", chat(user("my printer is on fire")))


def test_a_session_header_or_the_user_field_replaces_the_prefix_key():
    a = chat(SYSTEM, user("one"), user="alice")
    b = chat(SYSTEM, user("two"), user="alice")
    assert request_key("chat", a) == request_key("chat", b)  # the user field: one session
    assert request_key("chat", a, session="s-9") == request_key("chat", chat(user("x")), session="s-9")
    assert request_key("chat", a, session="s-9") != request_key("chat", a)  # the header wins over `user`
    assert request_key("chat", chat(user("one"), user="")) == request_key("chat", chat(user("one")))


def test_the_key_reads_a_bounded_part_of_the_prompt():
    long = "x" * (KEY_CHARS * 10)
    assert request_key("chat", chat(user(long + "a"))) == request_key("chat", chat(user(long + "b")))
    # the first user message's leading characters alone: a long prefix inside it (a document, examples) is shared
    assert request_key("chat", chat(user(long))) == request_key("chat", chat(user(long + "b")))
    system = {"role": "system", "content": long}  # the messages before it count with their whole length
    assert request_key("chat", chat(system, user("q"))) != request_key("chat", chat({**system, "content": long + "b"},
                                                                                   user("q")))
    prompt = "p" * PROMPT_KEY_CHARS
    assert request_key("completions", {"prompt": prompt + " turn 1"}) == request_key(
        "completions", {"prompt": prompt + " turn 1 ... turn 2"})  # a growing prompt keeps its key
    assert request_key("completions", {"prompt": ["a" * 300, "b"]}) == request_key("completions", {"prompt": "a" * 300})
    ids = PROMPT_KEY_CHARS // 4  # token ids: a quarter as many
    assert request_key("completions", {"prompt": list(range(ids + 36))}) == request_key(
        "completions", {"prompt": [list(range(ids)) + [7]]})


def test_a_responses_input_is_keyed_like_its_messages():
    as_chat = request_key("chat", chat({"role": "system", "content": "be brief"}, user("hi")))
    assert request_key("responses", {"instructions": "be brief", "input": "hi"}) == as_chat
    items = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "more"}]
    assert request_key("responses", {"instructions": "be brief", "input": items}) == as_chat


# ---- the ring -------------------------------------------------------------------------------------------------

_RNG = random.Random(7)
KEYS = [_RNG.getrandbits(64) for _ in range(20000)]
RK = [RouteKey(k) for k in KEYS]  # the same as routing keys (a home, no prefix chain)


def homes(ring):
    return [ring.walk(k)[0] for k in KEYS]


def test_the_ring_does_not_depend_on_the_order_replicas_are_given_in():
    urls = [b.url for b in replicas(5)]
    assert Ring(urls).walk(KEYS[0]) == Ring(reversed(urls)).walk(KEYS[0])
    assert sorted(Ring(urls).walk(KEYS[0])) == sorted(urls)  # every replica once


def test_a_replica_joining_takes_about_a_fair_share_of_keys_and_moves_no_other():
    urls = [b.url for b in replicas(5)]
    before, after = homes(Ring(urls[:4])), homes(Ring(urls))
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert all(b == urls[4] for _, b in moved)  # only to the new replica
    assert 0.12 < len(moved) / len(KEYS) < 0.28  # ~1/5


def test_a_replica_leaving_moves_only_its_own_keys():
    urls = [b.url for b in replicas(5)]
    before, after = homes(Ring(urls)), homes(Ring(urls[1:]))
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert all(a == urls[0] for a, _ in moved) and len(moved) == before.count(urls[0])
    assert 0.12 < len(moved) / len(KEYS) < 0.28


def test_the_ring_shares_keys_about_evenly():
    urls = [b.url for b in replicas(4)]
    owned = homes(Ring(urls))
    assert all(0.17 < owned.count(u) / len(KEYS) < 0.33 for u in urls)


# ---- the order ------------------------------------------------------------------------------------------------

def test_prefix_sends_a_key_to_its_home_then_along_the_ring():
    rs = replicas(3)
    ring = Ring(r.url for r in rs)
    walk = ring.walk(KEYS[1])
    assert [r.url for r in order(PREFIX, rs, RouteKey(KEYS[1]), ring=ring)] == list(walk)
    rs[[r.url for r in rs].index(walk[0])].healthy = False  # the home is down: the next on the ring
    assert [r.url for r in order(PREFIX, rs, RouteKey(KEYS[1]), ring=ring)] == list(walk[1:])


def test_prefix_skips_a_replica_that_would_go_above_the_bound():
    rs = replicas(3)
    ring = Ring(r.url for r in rs)
    home, second, third = (next(r for r in rs if r.url == u) for u in ring.walk(KEYS[2]))
    home.outstanding = 2  # bound: ⌈1.25 × (2 + 1) / 3⌉ = 2, and the home would hold 3
    assert order(PREFIX, rs, RouteKey(KEYS[2]), ring=ring) == [second, third, home]
    home.outstanding, second.outstanding, third.outstanding = 3, 3, 2  # bound ⌈1.25 × 9 / 3⌉ = 4
    assert order(PREFIX, rs, RouteKey(KEYS[2]), ring=ring) == [home, second, third]


def test_load_bound_always_leaves_the_least_loaded_a_place():
    for n in range(1, 9):
        for total in range(0, 200):
            loads = [total // n + (i < total % n) for i in range(n)]  # as even as it gets
            assert min(loads) + 1 <= load_bound(0.01, total, n)
    assert load_bound(0.25, 11, 3) == 5 and load_bound(0.25, 0, 4) == 1


def test_under_a_skewed_key_distribution_nobody_goes_above_the_bound():
    """A hot key (half the traffic) and a Zipf tail, requests arriving and finishing at random: every placement is
    within ⌈(1 + ε) × the mean⌉ (the request counted), and the hot key spills to other replicas."""
    rng = random.Random(3)
    rs = replicas(4)
    router = Router(PREFIX, [r.url for r in rs])
    tail = [rng.getrandbits(64) for _ in range(200)]
    running, hot = [], set()
    for _ in range(5000):
        if running and rng.random() < 0.45:
            running.pop(rng.randrange(len(running))).outstanding -= 1
            continue
        key = RouteKey(KEYS[0] if rng.random() < 0.5 else tail[min(int(rng.paretovariate(1.2)), 199)])
        total = sum(r.outstanding for r in rs)
        chosen, _ = router.pick(key, rs, limit=1000)
        assert chosen.outstanding + 1 <= load_bound(0.25, total, len(rs))
        chosen.outstanding += 1
        running.append(chosen)
        if key.home == KEYS[0]:
            hot.add(chosen.url)
    assert len(hot) == len(rs) and max(r.outstanding for r in rs) <= 1.25 * len(running) / len(rs) + 1


def test_least_load_ties_go_to_fewest_waiting_then_lowest_kv_usage_then_the_first_given():
    a, b, c = replicas(3)
    a.outstanding, b.outstanding, c.outstanding = 1, 1, 1
    a.waiting, b.waiting, c.waiting = 3, 0, 0
    b.kv_usage, c.kv_usage = 0.5, 0.2
    assert order(LEAST, [a, b, c]) == [c, b, a]
    b.kv_usage = c.kv_usage
    assert order(LEAST, [a, b, c]) == [b, c, a]
    assert Router(LEAST).pick(None, [a, b, c], limit=8) == (b, "affinity")
    c.outstanding = 0
    assert order(LEAST, [a, b, c])[0] is c


def test_round_robin_rotates_and_passes_over_full_and_sick_replicas():
    rs = replicas(3)
    router = Router(ROUND)
    picks = [router.pick(None, rs, limit=8)[0].url for _ in range(6)]
    assert picks == [r.url for r in rs] * 2
    rs[1].outstanding = 8  # full: passed over, counted as a spill
    assert [router.pick(None, rs, limit=8) for _ in range(2)] == [(rs[0], "affinity"), (rs[2], "spill")]
    rs[2].healthy = False
    assert [router.pick(None, rs, limit=8)[0] for _ in range(2)] == [rs[0], rs[0]]


@pytest.mark.parametrize("routing", [PREFIX, LEAST, ROUND], ids=lambda r: r.policy)
def test_pick_is_the_first_free_replica_of_the_order(routing):
    rng = random.Random(11)
    for _ in range(2000):
        rs = replicas(rng.randint(1, 6))
        for r in rs:
            r.outstanding, r.waiting, r.kv_usage = rng.randint(0, 4), rng.randint(0, 2), rng.choice([0.0, 0.5])
            r.others = rng.choice([0, 0, 1, 3])
            r.healthy = rng.random() < 0.8
        router = Router(routing, [r.url for r in rs])
        router.turn = turn = rng.randint(0, 10)
        key, tried = RouteKey(rng.getrandbits(64)), tuple(r for r in rs if rng.random() < 0.2)
        ranked = order(routing, rs, key, ring=router.ring, turn=router.turn)
        home = next((r for url in router.ring.walk(key.home) for r in rs if r.url == url and r.healthy), None) \
            if routing.policy == "prefix" else None
        # prefix: the key's home, first when within the bound, has ⌊0.25 × 4⌋ = 1 place more
        expected = next((r for at, r in enumerate(ranked)
                         if r.outstanding + r.others < 4 + (at == 0 and r is home) and r not in tried), None)
        assert router.pick(key, rs, limit=4, exclude=tried)[0] is expected
        share, router.turn = rng.randint(0, 4), turn  # own requests under the share: free whatever others hold
        expected = next((r for at, r in enumerate(ranked)
                         if (r.outstanding + r.others < 4 + (at == 0 and r is home) or r.outstanding < share)
                         and r not in tried), None)
        assert router.pick(key, rs, limit=4, exclude=tried, share=share)[0] is expected


def test_a_keys_home_within_the_bound_holds_epsilon_more_than_its_slots():
    rs = replicas(4)
    router = Router(PREFIX, [r.url for r in rs])
    home, second, *_ = (next(r for r in rs if r.url == url) for url in router.ring.walk(KEYS[3]))
    for r in rs:
        r.outstanding = 8
    assert router.pick(RouteKey(KEYS[3]), rs, limit=8) == (home, "affinity")     # 8 < 8 + ⌊0.25 × 8⌋
    home.outstanding = 10
    assert router.pick(RouteKey(KEYS[3]), rs, limit=8) == (None, "")             # only the home has more, and it is full
    home.outstanding, second.outstanding = 10, 7
    assert router.pick(RouteKey(KEYS[3]), rs, limit=8) == (second, "spill")      # another replica only into a free slot
    for r in rs:
        r.outstanding = 2
    home.outstanding = 7                                               # above ⌈1.25 × 14 / 4⌉ = 5: no extra
    assert router.pick(RouteKey(KEYS[3]), rs, limit=8)[1] == "spill"
    for r in rs:
        r.outstanding = 8
    home.outstanding = 12                                              # at ⌈1.25 × 37 / 4⌉ = 12: nobody has more
    assert router.pick(RouteKey(KEYS[3]), rs, limit=8) == (None, "")
    home.outstanding = 8
    assert Router(PREFIX, [r.url for r in rs]).pick(None, rs, limit=8) == (None, "")   # no key: no home


@pytest.mark.parametrize("routing", [PREFIX, LEAST, ROUND], ids=lambda r: r.policy)
def test_the_slots_are_the_engines_and_what_other_senders_hold_there_fills_them(routing):
    rs = replicas(2)
    router = Router(routing, [r.url for r in rs])
    home = next(r for r in rs if r.url == router.ring.walk(KEYS[5])[0]) if router.ring else rs[0]
    other = rs[1] if home is rs[0] else rs[0]
    home.others = 10  # another gateway's requests: the engine is full though this gateway sends it nothing
    assert router.pick(RouteKey(KEYS[5]), rs, limit=8) == (other, "spill" if routing.policy != "least-load" else "affinity")
    other.outstanding, other.others = 3, 5
    assert router.pick(RouteKey(KEYS[5]), rs, limit=8) == (None, "")
    home.others = 0
    assert router.pick(RouteKey(KEYS[5]), rs, limit=8)[0] is home


@pytest.mark.parametrize("routing", [PREFIX, LEAST, ROUND], ids=lambda r: r.policy)
def test_a_gateway_may_always_use_its_share_of_an_engines_slots(routing):
    rs = replicas(1)
    router = Router(routing, [r.url for r in rs])
    rs[0].others = 8                                   # full by the engine's count
    assert router.pick(RouteKey(KEYS[7]), rs, limit=8, share=4)[0] is rs[0]
    rs[0].outstanding = 4                              # its share used: the rest only as the engine's count allows
    assert router.pick(RouteKey(KEYS[7]), rs, limit=8, share=4) == (None, "")
    rs[0].others = 3
    assert router.pick(RouteKey(KEYS[7]), rs, limit=8, share=4)[0] is rs[0]


def test_least_load_ranks_a_replica_free_by_the_share_by_its_load():
    a, b = replicas(2)
    a.others, b.outstanding, b.others = 8, 5, 1        # a: full by the engine's count; b: 6 of 8
    assert Router(LEAST).pick(None, [a, b], limit=8, share=4)[0] is b
    b.others = 3                                       # b full: a, within this gateway's share
    assert Router(LEAST).pick(None, [a, b], limit=8, share=4)[0] is a


def test_the_load_bound_balances_this_gateways_own_requests():
    rs = replicas(4)
    router = Router(PREFIX, [r.url for r in rs])
    home = next(r for r in rs if r.url == router.ring.walk(KEYS[6])[0])
    home.others = 4          # another gateway's 4 at the home (read up to an interval ago): still its home
    assert router.pick(RouteKey(KEYS[6]), rs, limit=8) == (home, "affinity")
    home.outstanding = 1     # this gateway's own 1 + 1 > ⌈1.25 × 2 / 4⌉ = 1: the next one on the ring
    assert router.pick(RouteKey(KEYS[6]), rs, limit=8)[1] == "spill"


def test_prefix_names_its_choices():
    rs = replicas(3)
    router = Router(PREFIX, [r.url for r in rs])
    home = next(r for r in rs if r.url == router.ring.walk(KEYS[4])[0])
    assert router.pick(RouteKey(KEYS[4]), rs, limit=2) == (home, "affinity")
    home.outstanding = 2  # full
    assert router.pick(RouteKey(KEYS[4]), rs, limit=2)[1] == "spill"
    assert router.pick(RouteKey(KEYS[4]), rs, limit=2, exclude=(rs[0],))[1] == "other"


def test_the_default_policy_follows_the_mode():
    assert resolve(None, None, "multi") == Routing("prefix", 0.25)
    assert resolve(None, None, "single") == Routing("least-load", 0.25)
    assert resolve("round-robin", 1.0, "multi") == Routing("round-robin", 1.0)


# ---- the queue ------------------------------------------------------------------------------------------------

def prefix_queue(n, limit=1, size=4):
    q = ModelQueue(queue_size=size, max_concurrency=limit, routing=PREFIX)
    q.set_backends([f"http://10.0.0.{i}:8000" for i in range(n)])
    return q


def walk_of(q, key):
    return [q.backends[u] for u in q.router.ring.walk(key.home)]


async def test_the_queue_takes_the_first_free_replica_in_the_keys_order():
    q = prefix_queue(3, limit=1)
    home, second, third = walk_of(q, RK[5])
    first = q.try_take(RK[5])
    assert first.backend is home and first.choice == "affinity" and first.key == RK[5]
    spilled = q.try_take(RK[5])
    assert spilled.backend is second and spilled.choice == "spill"


async def test_a_failover_takes_the_next_in_the_keys_order():
    q = prefix_queue(3, limit=4)
    home, second, third = walk_of(q, RK[6])
    slot = q.try_take(RK[6])
    other = q.take_other((slot.backend,), key=slot.key)
    assert other.backend is second and other.choice == "other"
    assert q.take_other((home, second), key=slot.key).backend is third


async def test_the_head_of_the_line_takes_its_best_free_replica_when_one_frees():
    q = prefix_queue(2, limit=1)
    home, other = walk_of(q, RK[7])
    held = [q.try_take(RK[7]), q.try_take(RK[7])]
    assert {s.backend for s in held} == {home, other}
    waiting = asyncio.ensure_future(q.wait(key=RK[7]))
    behind = asyncio.ensure_future(q.wait(key=RK[7]))
    await asyncio.sleep(0)
    next(s for s in held if s.backend is other).release()  # not its home, but the only free one: it takes it
    slot = await asyncio.wait_for(waiting, 1)
    assert slot.backend is other and slot.choice == "spill" and not behind.done()
    next(s for s in held if s.backend is home).release()
    assert (await asyncio.wait_for(behind, 1)).backend is home


async def test_nobody_overtakes_the_head_of_the_line():
    q = prefix_queue(2, limit=1)
    home, other = walk_of(q, RK[8])
    held = [q.try_take(RK[8]), q.try_take(RK[8])]
    waiting = asyncio.ensure_future(q.wait(key=RK[8]))
    await asyncio.sleep(0)
    assert q.try_take(RK[9]) is None  # a slot would have to free first, and it goes to the head
    for s in held:
        s.release()
    assert (await asyncio.wait_for(waiting, 1)).backend is home


def homed_at(q, backend, count=1):
    """`count` keys whose home is `backend`."""
    return [k for k in RK if walk_of(q, k)[0] is backend][:count]


def full(q, keys):
    """Every replica busy: one slot taken at each key's home."""
    return {walk_of(q, k)[0]: q.try_take(k) for k in keys}


async def test_a_freed_slot_goes_to_a_waiter_close_behind_whose_home_it_is():
    q = prefix_queue(2, limit=1)
    a, b = q.backends.values()
    (ka,), (kb,) = homed_at(q, a), homed_at(q, b)
    held = full(q, [ka, kb])
    head = asyncio.ensure_future(q.wait(key=ka))      # waits for a
    behind = asyncio.ensure_future(q.wait(key=kb))    # waits for b
    await asyncio.sleep(0)
    held[b].release()                                  # b is not the head's home, but is the one behind's
    slot = await asyncio.wait_for(behind, 1)
    assert slot.backend is b and slot.choice == "affinity" and not head.done() and q.waiting == 1
    held[a].release()
    slot = await asyncio.wait_for(head, 1)
    assert slot.backend is a and slot.choice == "affinity" and q.waiting == 0 and not q._heap


async def test_the_head_is_passed_over_a_bounded_number_of_times():
    q = prefix_queue(2, limit=1, size=MAX_PASSES + 4)
    a, b = q.backends.values()
    (ka,), kbs = homed_at(q, a), homed_at(q, b, MAX_PASSES + 2)
    held = full(q, [ka, kbs[0]])
    head = asyncio.ensure_future(q.wait(key=ka))
    behind = [asyncio.ensure_future(q.wait(key=k)) for k in kbs[1:]]
    await asyncio.sleep(0)
    slot = held[b]
    for passed in range(MAX_PASSES):                   # b frees again and again: its own waiters take it
        slot.release()
        slot = await asyncio.wait_for(behind[passed], 1)
        assert slot.backend is b and not head.done()
    slot.release()                                     # then the head has waited long enough: it spills
    taken = await asyncio.wait_for(head, 1)
    assert taken.backend is b and taken.choice == "spill" and not behind[MAX_PASSES].done()


async def test_nobody_behind_at_home_or_of_another_priority_leaves_the_spill_to_the_head():
    q = prefix_queue(2, limit=1)
    a, b = q.backends.values()
    ka, ka2 = homed_at(q, a, 2)
    (kb,) = homed_at(q, b)
    held = full(q, [ka, kb])
    head = asyncio.ensure_future(q.wait(key=ka))
    same_home = asyncio.ensure_future(q.wait(key=ka2))   # wants a too
    later = asyncio.ensure_future(q.wait(1, key=kb))     # b's, but of a later priority
    cancelled = asyncio.ensure_future(q.wait(key=kb))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    held[b].release()
    slot = await asyncio.wait_for(head, 1)
    assert slot.backend is b and slot.choice == "spill"
    assert not same_home.done() and not later.done() and q.waiting == 2


async def test_a_queue_changes_its_policy_and_its_ring_follows_its_replicas():
    q = ModelQueue(queue_size=1, max_concurrency=1)
    q.set_backends(["http://a", "http://b"])
    assert not q.router.uses_key
    q.set_routing(PREFIX)
    assert q.router.ring.urls == ("http://a", "http://b")
    q.set_backends(["http://c", "http://a", "http://b"])
    assert q.router.ring.urls == ("http://a", "http://b", "http://c")


# ---- engine metrics -------------------------------------------------------------------------------------------

VLLM_PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 8.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="m"} 1.0
"""


def test_engine_load_is_read_from_vllms_metrics_page():
    # running and waiting summed over the engines, the fullest KV cache
    assert engine_load(VLLM_PAGE) == EngineLoad(running=8, waiting=5, kv_usage=0.75)


@pytest.mark.parametrize("page", ["", "not prometheus at all {{{", "# TYPE x gauge\nx 1\n",
                                  "vllm:num_requests_waiting{engine=\"0\" 3\n"])
def test_a_page_without_the_engines_load_says_nothing(page):
    assert engine_load(page) is None


# ---- configuration --------------------------------------------------------------------------------------------

def test_a_models_routing_comes_from_its_entry_then_the_top_level_then_its_mode(tmp_path):
    from cxygpt_gateway.discovery.static import StaticDiscovery
    from cxygpt_gateway.routing.registry import Registry
    from cxygpt_gateway.settings import load_settings
    from cxygpt_profiles import default_table
    config = tmp_path / "gateway.yaml"
    config.write_text("""
routing: {epsilon: 0.5}
models:
  - {name: multi, url: http://a, profile: DEV_32G}
  - {name: single, url: http://b, profile: SINGLE_32G}
  - {name: own, url: http://c, profile: DEV_32G, routing: {policy: round-robin, epsilon: 1}}
""")
    settings = load_settings(config)
    table = default_table()
    registry = Registry(table, routing_policy=settings.routing.policy, routing_epsilon=settings.routing.epsilon)
    for spec in StaticDiscovery(settings.models, table).specs:
        registry.upsert(spec)
    assert {name: registry.get(name).routing for name in ("multi", "single", "own")} == {
        "multi": Routing("prefix", 0.5), "single": Routing("least-load", 0.5), "own": Routing("round-robin", 1.0)}


@pytest.mark.parametrize("routing", [{"policy": "random"}, {"epsilon": 0}, {"epsilon": 5}, {"other": 1}])
def test_a_routing_the_gateway_cannot_use_is_refused_at_start(routing):
    from pydantic import ValidationError

    from cxygpt_gateway.settings import GatewaySettings
    with pytest.raises(ValidationError):
        GatewaySettings(routing=routing)


# ---- the longest cached prefix (issue 26) ------------------------------------------------------------------------

DOC = "".join(f"Clause {i}: the tenant shall keep the premises in good order. " for i in range(300))  # ~18 KiB


def test_requests_sharing_a_prefix_inside_one_message_share_their_home_and_leading_chunks():
    a = route_key("chat", chat(SYSTEM, user(DOC + "\nQuestion: how long is the lease?")))
    b = route_key("chat", chat(SYSTEM, user(DOC + "\nQuestion: who repairs the roof, and when?")))
    assert a.home == b.home
    shared = len(SYSTEM["content"]) + len(DOC)
    assert len(a.chain) == len(b.chain) >= shared // CHUNK_CHARS - 1
    assert a.chain[:shared // CHUNK_CHARS] == b.chain[:shared // CHUNK_CHARS]
    other = route_key("chat", chat(SYSTEM, user(DOC.replace("Clause 7", "Clause Z") + "\nQuestion: how long?")))
    assert other.chain[0] == a.chain[0] and other.chain[-1] != a.chain[-1]  # apart from the chunk that differs
    completions = [route_key("completions", {"prompt": DOC + q}) for q in ("Q1", "Q2: longer")]
    assert completions[0].home == completions[1].home and completions[0].chain == completions[1].chain
    as_responses = route_key("responses", {"instructions": SYSTEM["content"], "input": DOC + "\nQuestion: x"})
    assert as_responses.chain[:shared // CHUNK_CHARS] == a.chain[:shared // CHUNK_CHARS]


def test_the_chain_is_bounded_and_leaves_a_partial_chunk_out():
    assert chunk_chain("x" * (CHUNK_CHARS - 1)) == ()
    assert len(chunk_chain("x" * (CHUNK_CHARS * 2 + 5))) == 2
    huge = route_key("chat", chat(user("y" * 10_000_000)))
    assert len(huge.chain) == MAX_CHUNKS
    short = route_key("chat", chat(user("hi")))
    assert short.chain == () and short.home == request_key("chat", chat(user("hi")))


def test_the_index_knows_where_each_prefix_went_forgets_the_oldest_and_a_replica_that_left():
    index = PrefixIndex(capacity=6)
    index.record((1, 2, 3, 4), "a")
    index.record((1, 2, 9), "b")
    assert index.depths((1, 2, 3, 4, 5), {"a", "b", "c"}) == {"a": 4, "b": 2}
    assert index.depths((7,), {"a"}) == {}
    index.record((11, 12, 13), "c")  # 7 chunks in all: the least recently sent one (3) goes
    assert index.depths((1, 2, 3, 4), {"a"}) == {"a": 2} and len(index) == 6
    index.forget("a")
    assert index.depths((1, 2), {"a", "b"}) == {"b": 2}


def test_a_request_goes_where_its_longest_prefix_is_cached_within_the_load_bound():
    rs = replicas(4)
    router = Router(PREFIX, [r.url for r in rs])
    first = route_key("chat", chat(SYSTEM, user(DOC + "\nQ: one")))
    home, _ = router.pick(first, rs, limit=8)
    assert home is next(r for r in rs if r.url == router.ring.walk(first.home)[0])  # a prefix nobody holds: home
    router.placed(first, home.url)
    # another request with the same document but whose home (a session) is elsewhere still goes where it is cached
    second = route_key("chat", chat(SYSTEM, user(DOC + "\nQ: two")), session="someone")
    assert router.ring.walk(second.home)[0] != home.url
    assert router.pick(second, rs, limit=8) == (home, "affinity")
    # ... while that replica stays within the load bound; past it, the request spills to the least loaded
    home.outstanding = 5
    chosen, choice = router.pick(second, rs, limit=8)
    assert chosen is not home and choice == "spill" and chosen.outstanding == 0


def test_two_gateways_place_a_prefix_neither_has_seen_alike_and_learn_the_same():
    rs = replicas(4)
    gateways = [Router(PREFIX, [r.url for r in rs]) for _ in range(2)]
    for n in range(50):
        key = route_key("completions", {"prompt": f"document {n} " * 100 + "question"})
        picks = [g.pick(key, rs, limit=8)[0] for g in gateways]
        assert picks[0] is picks[1]
        for g in gateways:
            g.placed(key, picks[0].url)


def test_a_hot_shared_prefix_spreads_over_the_replicas_that_hold_it_within_the_bound():
    """Many conversations of one tenant with a long system prompt: none piles onto one replica."""
    rs = replicas(4)
    router = Router(PREFIX, [r.url for r in rs])
    for i in range(200):
        key = route_key("chat", chat(SYSTEM, user(f"question number {i} about my invoice")))
        chosen, _ = router.pick(key, rs, limit=1000)
        bound = load_bound(PREFIX.epsilon, sum(r.outstanding for r in rs), len(rs))
        assert chosen.outstanding < bound
        chosen.outstanding += 1
        router.placed(key, chosen.url)
    assert max(r.outstanding for r in rs) <= 1.25 * 200 / 4 + 1


async def test_the_queue_records_where_it_placed_each_prefix():
    q = prefix_queue(3, limit=4)
    key = route_key("chat", chat(SYSTEM, user(DOC)))
    slot = q.try_take(key)
    assert q.router.index.depths(key.chain, {slot.backend.url}) == {slot.backend.url: len(key.chain)}
    q.set_backends([u for u in q.backends if u != slot.backend.url])  # the replica left
    assert q.router.index.depths(key.chain, {slot.backend.url}) == {}


def test_what_every_request_of_a_tenant_shares_does_not_move_a_new_conversation_off_its_home():
    """Only a prefix held beyond what the home key covers overrides the home: a conversation's own history (or a
    document the load bound sent elsewhere), not the system prompt every conversation of the tenant shares."""
    rs = replicas(4)
    router = Router(PREFIX, [r.url for r in rs])
    for i in range(40):
        key = route_key("chat", chat(SYSTEM, user(f"conversation {i}: where is my order?")))
        home = router.ring.walk(key.home)[0]
        chosen, choice = router.pick(key, rs, limit=1000)
        assert (chosen.url, choice) == (home, "affinity")
        router.placed(key, chosen.url)
    # a later turn of one of them goes where its history is, even with a session that names another home
    first = chat(SYSTEM, user("conversation 3: where is my order?"))
    placed = router.ring.walk(route_key("chat", first).home)[0]
    later = route_key("chat", {**first, "messages": first["messages"] + [
        {"role": "assistant", "content": "It left the warehouse yesterday. " * 20}, user("thanks")]})
    router.placed(later, placed)
    again = route_key("chat", {**first, "messages": first["messages"] + [
        {"role": "assistant", "content": "It left the warehouse yesterday. " * 20}, user("thanks"),
        {"role": "assistant", "content": "You are welcome."}, user("one more thing")]}, session="elsewhere")
    assert router.ring.walk(again.home)[0] != placed
    assert router.pick(again, rs, limit=1000)[0].url == placed
