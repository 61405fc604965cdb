"""The fleet benchmark's pure parts: workload and schedule, the ideal hit rate, balance, goals."""
from __future__ import annotations

import pytest

from cxygpt_bench import fleet
from cxygpt_sim import text
from cxygpt_sim.kvcache import KVCache, block_hashes

SPEC = fleet.WorkloadSpec()


def test_the_schedule_is_the_same_for_the_same_seed_and_rate_and_offers_the_rate():
    a, convs_a = fleet.schedule(SPEC, 10.0, 60.0)
    b, convs_b = fleet.schedule(SPEC, 10.0, 60.0)
    assert a == b and convs_a == convs_b
    assert 540 <= len(a) <= 660  # Poisson at 10/s over 60 s
    other, _ = fleet.schedule(fleet.WorkloadSpec(seed=2), 10.0, 60.0)
    assert other != a


def test_turns_come_in_order_after_their_think_time_and_conversations_do_not_depend_on_the_rate():
    sends, convs = fleet.schedule(SPEC, 8.0, 60.0)
    last: dict[int, fleet.Send] = {}
    for s in sends:
        prev = last.get(s.conversation)
        if prev is None:
            assert s.turn == 0
        else:
            assert s.turn == prev.turn + 1
            assert s.at - prev.at >= convs[s.conversation].turns[prev.turn].think_s
        last[s.conversation] = s
    assert any(s.turn >= 3 for s in sends)  # histories grow
    _, slow = fleet.schedule(SPEC, 2.0, 30.0)
    assert slow[:5] == convs[:5] == [fleet.conversation(SPEC, i) for i in range(5)]


def test_conversations_follow_the_spec_and_tenants_their_weights():
    convs = [fleet.conversation(SPEC, i) for i in range(400)]
    for c in convs:
        assert SPEC.turns[0] <= len(c.turns) <= SPEC.turns[1]
        for t in c.turns:
            assert SPEC.answer_tokens[0] <= t.max_tokens <= SPEC.answer_tokens[1]
            assert SPEC.think_s[0] <= t.think_s <= SPEC.think_s[1]
    share = [sum(c.tenant == k for c in convs) / len(convs) for k in range(4)]
    assert share[0] > share[1] > share[2] > share[3] > 0.03


def test_system_prompts_are_long_and_differ_from_their_first_block():
    systems = fleet.system_prompts(SPEC)
    assert len(systems) == 4 and len(set(s[:40] for s in systems)) == 4
    tokens = [text.count_tokens(s) for s in systems]
    assert all(900 <= n <= 3300 for n in tokens), tokens


def test_messages_carry_the_history_with_the_actual_answers():
    conv = fleet.conversation(SPEC, 3)
    m = fleet.messages("sys", conv, 2, ["first answer", "second answer"])
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert m[2]["content"] == "first answer" and m[4]["content"] == "second answer"
    assert m[-1]["content"] == conv.turns[2].user


def test_prompt_tokens_equal_the_simulators_tokenization_of_the_whole_prompt():
    conv = fleet.conversation(SPEC, 7)
    m = fleet.messages(fleet.system_prompts(SPEC)[1][:500], conv, 2, ["An answer. With, punctuation!\n", "中文 ok"])
    pt = fleet.PromptTokens(text.token_ids, text.render_chat)
    assert pt.ids(m) == text.token_ids(text.render_chat(m))


def test_block_hashes_are_the_simulators():
    ids = list(range(100))
    assert fleet.block_hashes(ids, 16) == block_hashes(ids, 16)


def test_ideal_hits_count_as_the_simulator_counts_against_a_cache_that_never_evicts():
    p33 = list(range(33))
    assert fleet.ideal_hits([p33, p33]) == (32, 66)
    p32 = list(range(32))
    assert fleet.ideal_hits([p32, p32]) == (16, 64)  # the block with the last token is always computed
    longer = p33 + list(range(1000, 1040))  # a next turn: the earlier prompt's full blocks hit
    assert fleet.ideal_hits([p33, longer]) == (32, 33 + 73)
    other = [7] + p33[1:]
    assert fleet.ideal_hits([p33, other]) == (0, 66)  # a different first block: nothing after it matches


def test_ideal_hits_match_the_simulators_cache_when_it_is_large_enough():
    prompts = [list(range(50)), list(range(50)) + [9] * 30, list(range(20)), list(range(80))]
    kv = KVCache(10_000, 16)
    hits = 0
    for ids in prompts:
        hashes = block_hashes(ids, 16)
        cached = kv.cached_prefix(hashes, len(ids))
        hits += 16 * len(cached)
        held: list[int] = []
        assert kv.allocate(held, cached, len(ids))
        kv.cache_full_blocks(held, hashes, len(ids))
        kv.release(held)
    assert fleet.ideal_hits(prompts)[0] == hits


def test_the_working_set_holds_the_latest_prompt_of_each_conversation_that_comes_back():
    events = [(0.0, 1, 100, False), (1.0, 2, 50, False), (2.0, 1, 300, False), (3.0, 2, 80, True), (4.0, 1, 400, True)]
    ws = fleet.working_set(reversed(events), shared_tokens=1000)
    # after each request: 1100, 1150, 1350, 1300 (conversation 2 is done), 1000
    assert ws == {"mean": (1100 + 1150 + 1350 + 1300 + 1000) / 5, "max": 1350}
    assert fleet.working_set([], 10) == {"mean": None, "max": None}


def test_balance_is_the_busiest_replicas_mean_over_the_fleets():
    b = fleet.balance([[2, 2, 2, 2], [4, 2, 2, 0]])
    assert b["mean"] == [3, 2, 2, 1] and b["peak"] == [4, 2, 2, 2]
    assert b["max_over_mean"] == pytest.approx(1.5)
    assert fleet.balance([])["max_over_mean"] is None
    assert fleet.balance([[0, 0]])["max_over_mean"] is None


def test_the_random_choice_is_fixed_by_the_request_and_spreads():
    picks = [fleet.replica_of(1, c, k, 4) for c in range(100) for k in range(4)]
    assert picks == [fleet.replica_of(1, c, k, 4) for c in range(100) for k in range(4)]
    assert all(60 <= picks.count(i) <= 140 for i in range(4))


def point(**kw):
    p = {"ttft_p90_ms": 100.0, "output_tokens_per_s": 1300.0, "hit_rate": 0.85, "ideal_hit_rate": 0.9,
         "max_over_mean": 1.1, "errors": 0}
    return {**p, **kw}


def test_the_goals_are_met_by_a_prefix_router_that_is_good_enough():
    points = {"gw-prefix": {"80%": point()}, "gw-least-load": {"80%": point(ttft_p90_ms=500.0, output_tokens_per_s=1000)},
              "vr-cache_aware": {"80%": point(ttft_p90_ms=150.0)}, "gw-prefix-x2": {"80%": point(ttft_p90_ms=110.0,
                                                                                                     hit_rate=0.83)}}
    rows = fleet.judge(points, ["80%"])
    assert [r["met"] for r in rows] == [True] * len(rows), rows


def test_each_goal_fails_on_its_own():
    base = {"gw-least-load": {"100%": point(ttft_p90_ms=500.0, output_tokens_per_s=1000)},
            "vr-cache_aware": {"100%": point(ttft_p90_ms=150.0)}, "gw-prefix-x2": {"100%": point()}}

    def failed(prefix=None, x2=None):
        points = {**base, "gw-prefix": {"100%": prefix or point()}}
        if x2:
            points["gw-prefix-x2"] = {"100%": x2}
        return [r["goal"] for r in fleet.judge(points, ["100%"]) if r["met"] is False]

    assert failed(point(ttft_p90_ms=100.1)) == ["p90 TTFT: least-load / prefix", "p90 TTFT: vllm-router cache_aware / prefix"]
    assert failed(point(output_tokens_per_s=1299.0)) == ["output tokens/s: prefix / least-load"]
    assert failed(point(hit_rate=0.80)) == ["prefix hit rate / ideal"]
    assert failed(point(max_over_mean=1.26)) == ["prefix max/mean in flight per replica"]
    assert failed(x2=point(ttft_p90_ms=111.0)) == ["two gateways as good as one: p90 TTFT, hit rate"]
    assert failed(x2=point(hit_rate=0.829)) == ["two gateways as good as one: p90 TTFT, hit rate"]
    assert failed(point(errors=1)) == ["gw-prefix: errors"]


def test_a_front_not_measured_leaves_its_goals_open():
    rows = fleet.judge({"gw-prefix": {"80%": point()}}, ["80%"])
    open_goals = [r["goal"] for r in rows if r["met"] is None]
    assert "p90 TTFT: least-load / prefix" in open_goals and "gw-prefix-x2: errors" in open_goals
    assert [r["goal"] for r in rows if r["met"]] == ["prefix hit rate / ideal", "prefix max/mean in flight per replica",
                                                   "gw-prefix: errors"]


def test_the_words_are_one_token_each_after_a_space():
    assert len(set(fleet.WORDS)) == len(fleet.WORDS)
    assert [w for w in fleet.WORDS if len(text.token_ids(" " + w)) != 1] == []
