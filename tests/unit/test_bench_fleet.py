"""The fleet benchmark's pure parts: the workload shapes, the ideal hit rate, a point's summary, the throughput at
the SLO, the goals, the report; and the Service front relaying bytes."""
from __future__ import annotations

import asyncio
import math
import random
from collections import Counter

import pytest

from cxygpt_bench import fleet, service, shapes
from cxygpt_sim import text
from cxygpt_sim.kvcache import KVCache, block_hashes

CHAT = shapes.ChatSpec()
PT = fleet.PromptTokens(text.token_ids, text.render_chat)


def prompt_ids(req: shapes.Request) -> list[int]:
    return PT.of(req.fields)


# --- arrivals and the chat shape ---------------------------------------------------------------------------

def test_arrivals_are_poisson_at_the_rate_and_fixed_by_key_rate_and_duration():
    a = shapes.arrivals("k", 10.0, 60.0)
    assert a == shapes.arrivals("k", 10.0, 60.0)
    assert 540 <= len(a) <= 660 and a == sorted(a) and 0 < a[0] and a[-1] < 60
    gaps = [y - x for x, y in zip([0.0] + a, a)]
    assert 0.08 <= sum(gaps) / len(gaps) <= 0.12
    assert shapes.arrivals("other", 10.0, 60.0) != a and shapes.arrivals("k", 10.5, 60.0) != a
    with pytest.raises(ValueError):
        shapes.arrivals("k", 0, 10)


def test_a_ramp_runs_its_stages_back_to_back_each_at_its_rate_and_the_same_for_the_same_stages():
    stages = [(5.0, 20.0), (20.0, 30.0), (10.0, 10.0)]
    r = shapes.ramp("k", stages)
    assert r == shapes.ramp("k", stages) and [t for t, _ in r] == sorted(t for t, _ in r)
    per = Counter(k for _, k in r)
    assert 60 <= per[0] <= 140 and 480 <= per[1] <= 720 and 60 <= per[2] <= 140
    assert all(0 <= t < 20 for t, k in r if k == 0) and all(20 <= t < 50 for t, k in r if k == 1)
    assert all(50 <= t < 60 for t, k in r if k == 2)
    # a stage's arrivals do not depend on the stages after it, and two stages alike are not a copy of each other
    assert [x for x in shapes.ramp("k", stages[:2]) if x[1] < 2] == [x for x in r if x[1] < 2]
    twice = shapes.ramp("k", [(5.0, 20.0), (5.0, 20.0)])
    assert [round(t, 6) for t, k in twice if k == 0] != [round(t - 20, 6) for t, k in twice if k == 1]


def chat_sends(rate: float, seconds: float, spec: shapes.ChatSpec = CHAT):
    return shapes.chat_schedule(spec, shapes.arrivals("chat", rate, seconds))


def test_the_chat_schedule_is_the_same_for_the_same_arrivals_and_sends_one_turn_at_each():
    a, convs_a = chat_sends(10.0, 60.0)
    b, convs_b = chat_sends(10.0, 60.0)
    assert a == b and convs_a == convs_b
    assert [s.at for s in a] == shapes.arrivals("chat", 10.0, 60.0)
    other, _ = chat_sends(10.0, 60.0, shapes.ChatSpec(seed=2))
    assert other != a


def test_turns_come_in_order_after_their_think_time_and_conversations_do_not_depend_on_the_rate():
    sends, convs = chat_sends(8.0, 60.0)
    last: dict[int, shapes.Send] = {}
    for s in sends:
        prev = last.get(s.conversation)
        if prev is None:
            assert s.turn == 0
        else:
            assert s.turn == prev.turn + 1
            assert s.at - prev.at >= convs[s.conversation].turns[prev.turn].think_s
        last[s.conversation] = s
    assert any(s.turn >= 3 for s in sends)  # histories grow
    _, slow = chat_sends(2.0, 30.0)
    assert slow[:5] == convs[:5] == [shapes.conversation(CHAT, i) for i in range(5)]


def test_conversations_follow_the_spec_and_tenants_their_weights():
    convs = [shapes.conversation(CHAT, i) for i in range(400)]
    for c in convs:
        assert CHAT.turns[0] <= len(c.turns) <= CHAT.turns[1]
        for t in c.turns:
            assert CHAT.answer_tokens[0] <= t.max_tokens <= CHAT.answer_tokens[1]
            assert CHAT.think_s[0] <= t.think_s <= CHAT.think_s[1]
    share = [sum(c.tenant == k for c in convs) / len(convs) for k in range(4)]
    assert share[0] > share[1] > share[2] > share[3] > 0.03


def test_system_prompts_are_long_and_differ_from_their_first_block():
    systems = shapes.system_prompts(CHAT)
    assert len(systems) == 4 and len(set(s[:40] for s in systems)) == 4
    tokens = [text.count_tokens(s) for s in systems]
    assert all(900 <= n <= 3300 for n in tokens), tokens


def test_messages_carry_the_history_with_the_actual_answers():
    conv = next(c for c in (shapes.conversation(CHAT, i) for i in range(50)) if len(c.turns) >= 3)
    m = shapes.messages("sys", conv, 2, ["first answer", "second answer"])
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert m[2]["content"] == "first answer" and m[4]["content"] == "second answer"
    assert m[-1]["content"] == conv.turns[2].user


def test_a_salt_or_a_point_changes_every_word_but_no_length_in_tokens():
    base = [text.count_tokens(s) for s in shapes.system_prompts(CHAT)]
    salted = shapes.system_prompts(CHAT, salt=7)
    assert [text.count_tokens(s) for s in salted] == base
    assert all(a[60:200] != b[60:200] for a, b in zip(shapes.system_prompts(CHAT), salted))
    for salt, point in ((3, 0), (0, 5), (3, 5)):
        for i in range(5):
            c0, c1 = shapes.conversation(CHAT, i), shapes.conversation(CHAT, i, salt, point)
            assert c0.tenant == c1.tenant and [t.max_tokens for t in c0.turns] == [t.max_tokens for t in c1.turns]
            assert [text.count_tokens(t.user) for t in c0.turns] == [text.count_tokens(t.user) for t in c1.turns]
            assert c0.turns[0].user != c1.turns[0].user
        for shape in ("document", "completions", "unshared"):
            spec = shapes.spec_of(shape, 1)
            for i in range(5):
                r0, r1 = shapes.request(shape, spec, i), shapes.request(shape, spec, i, salt, point)
                assert (r0.path, r0.group, r0.max_tokens) == (r1.path, r1.group, r1.max_tokens)
                assert len(prompt_ids(r0)) == len(prompt_ids(r1)) and prompt_ids(r0) != prompt_ids(r1)


# --- the shapes that share prefixes inside a message, and the one that shares nothing ------------------------

def shared_tokens(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_document_requests_of_a_group_share_the_document_inside_one_user_message():
    spec = shapes.DocumentSpec()
    reqs = [shapes.request("document", spec, i) for i in range(300)]
    assert all(r.path == shapes.CHAT and [m["role"] for m in r.fields["messages"]] == ["system", "user"] for r in reqs)
    by_group: dict[int, list[shapes.Request]] = {}
    for r in reqs:
        by_group.setdefault(r.group, []).append(r)
    a, b = by_group[0][:2]
    same = shared_tokens(prompt_ids(a), prompt_ids(b))
    assert 3500 <= same <= 4600 and same < min(len(prompt_ids(a)), len(prompt_ids(b)))
    other = by_group[1][0]
    assert shared_tokens(prompt_ids(a), prompt_ids(other)) < 40   # the system prompt and ChatML only
    for r in reqs[:20]:
        assert 3500 <= len(prompt_ids(r)) <= 4800
        assert spec.answer_tokens[0] <= r.max_tokens <= spec.answer_tokens[1]
    counts = Counter(r.group for r in reqs)
    assert counts[0] == max(counts.values()) and len(counts) >= 20   # Zipf: group 0 the hottest, most groups seen


def test_completions_prompts_share_the_header_and_their_groups_few_shot_block():
    spec = shapes.CompletionsSpec()
    reqs = [shapes.request("completions", spec, i) for i in range(200)]
    assert all(r.path == shapes.COMPLETIONS and set(r.fields) == {"prompt"} for r in reqs)
    header = reqs[0].fields["prompt"].split("\n\n")[0]
    assert len(header) > 256 and all(r.fields["prompt"].startswith(header + "\n\n") for r in reqs)
    by_group: dict[int, list[shapes.Request]] = {}
    for r in reqs:
        by_group.setdefault(r.group, []).append(r)
    a, b = by_group[0][:2]
    assert 2600 <= shared_tokens(prompt_ids(a), prompt_ids(b)) <= 3700
    other = by_group[1][0]
    assert 100 <= shared_tokens(prompt_ids(a), prompt_ids(other)) <= 120   # the header


def test_unshared_requests_share_no_block_and_mix_short_and_long_prompts():
    spec = shapes.UnsharedSpec()
    reqs = [shapes.request("unshared", spec, i) for i in range(200)]
    firsts = [block_hashes(prompt_ids(r), 16)[0] for r in reqs]
    assert len(set(firsts)) == len(reqs)
    lengths = [len(prompt_ids(r)) for r in reqs]
    short = sum(n < 500 for n in lengths)
    assert sum(n > 1400 for n in lengths) + short == len(reqs) and 0.45 <= short / len(reqs) <= 0.75
    assert {r.group for r in reqs} == {-1}
    assert all([m["role"] for m in r.fields["messages"]] == ["user"] for r in reqs)   # no system prompt at all


def test_the_warm_up_covers_each_group_once_with_its_first_request():
    spec = shapes.DocumentSpec()
    warm = shapes.warm_indices("document", spec)
    groups = [shapes.request("document", spec, i).group for i in warm]
    assert sorted(groups) == list(range(spec.groups)) and warm == sorted(warm)
    for i in warm:
        assert all(shapes.request("document", spec, j).group != shapes.request("document", spec, i).group
                   for j in range(i))
    assert len(shapes.warm_indices("completions", shapes.CompletionsSpec())) == 24
    assert shapes.warm_indices("unshared", shapes.UnsharedSpec()) == []


@pytest.mark.parametrize("spec", [shapes.ChatSpec(turns=(3, 2)), shapes.ChatSpec(tenant_weights=(1, 1)),
                                  shapes.DocumentSpec(groups=0), shapes.DocumentSpec(question_words=(0, 5)),
                                  shapes.CompletionsSpec(zipf=-1), shapes.UnsharedSpec(long_share=1.5)])
def test_a_spec_out_of_range_is_refused(spec):
    with pytest.raises(ValueError):
        spec.check()


# --- the ideal hit rate ------------------------------------------------------------------------------------

def test_prompt_tokens_equal_the_simulators_tokenization_of_the_whole_prompt():
    conv = next(c for c in (shapes.conversation(CHAT, i) for i in range(50)) if len(c.turns) >= 3)
    m = shapes.messages(shapes.system_prompts(CHAT)[1][:500], conv, 2, ["An answer. With, punctuation!\n", "中文 ok"])
    assert PT.ids(m) == text.token_ids(text.render_chat(m))
    assert PT.of({"messages": m}) == PT.ids(m)
    assert PT.of({"prompt": "Instructions: the of\nOutput:"}) == text.token_ids("Instructions: the of\nOutput:")


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


def test_ideal_hits_carry_the_cache_over_the_points_of_a_sweep():
    seen: set[int] = set()
    assert fleet.ideal_hits([list(range(40))], 16, seen) == (0, 40)
    assert fleet.ideal_hits([list(range(40))], 16, seen) == (32, 40)
    assert fleet.ideal_hits([list(range(40))], 16) == (0, 40)


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


def test_balance_is_the_busiest_replicas_mean_over_the_fleets():
    b = fleet.balance([[2, 2, 2, 2], [4, 2, 2, 0]])
    assert b["mean"] == [3, 2, 2, 1] and b["peak"] == [4, 2, 2, 2]
    assert b["max_over_mean"] == pytest.approx(1.5)
    assert fleet.balance([])["max_over_mean"] is None
    assert fleet.balance([[0, 0]])["max_over_mean"] is None


def test_the_words_are_one_token_each_after_a_space():
    assert len(set(shapes.WORDS)) == len(shapes.WORDS)
    assert [w for w in shapes.WORDS if len(text.token_ids(" " + w)) != 1] == []


# --- a point ---------------------------------------------------------------------------------------------

def test_a_percentile_with_lower_bounds_is_exact_only_when_none_is_at_or_below_its_ranks():
    exact = [(float(v), False) for v in range(1, 11)]
    assert fleet.percentile_bound(exact, 90) == (pytest.approx(9.1), True)
    bounded = exact[:9] + [(30.0, True)]   # the largest is a lower bound: p90 interpolates towards it
    value, is_exact = fleet.percentile_bound(bounded, 90)
    assert value == pytest.approx(9 + 0.1 * 21) and not is_exact
    assert fleet.percentile_bound(bounded, 50) == (pytest.approx(5.5), True)
    assert fleet.percentile_bound([], 90) == (None, True)


def R(sent, status="ok", ttft=0.1, end=None, tokens=10, scheduled=None):
    return fleet.Result(sent=sent, scheduled=sent if scheduled is None else scheduled, status=status, ttft=ttft,
                        end=sent + 1 if end is None else end, tokens=tokens)


def test_a_stages_summary_counts_its_window_its_cut_requests_as_lower_bounds_and_its_errors():
    results = [R(0.5, ttft=9.0),                                   # before the stage: left out
               *[R(2 + 0.5 * i, ttft=0.2 + 0.1 * i) for i in range(12)],  # 2.0 .. 7.5 s, TTFT 0.2 .. 1.3 s
               R(8.0, status="cut", ttft=None, end=13.0),          # waited 5 s when stopped: a lower bound
               R(8.5, status="cut", ttft=0.4, end=13.0, tokens=3),  # streaming when stopped: its TTFT is known
               R(9.0, status="http-500", ttft=None), R(9.5, status="broken", ttft=0.3),
               R(10.5, status="http-500", ttft=None)]               # after the stage: not its error
    metrics = lambda q0, h0, q1, h1: [{"vllm:prefix_cache_queries_total": q0, "vllm:prefix_cache_hits_total": h0},
                                      {"vllm:prefix_cache_queries_total": q1, "vllm:prefix_cache_hits_total": h1}]
    samples = [(1.0, [50, 0], metrics(50, 0, 100, 10)), (1.9, [9, 9], metrics(100, 10, 100, 10)),
               (3.0, [3, 1], metrics(200, 60, 100, 10)), (5.0, [1, 3], metrics(300, 110, 100, 10)),
               (10.5, [0, 0], metrics(900, 900, 900, 900))]
    p = fleet.summarize(results, start=2.0, end=10.0, stopped_at=13.0, slo_s=1.0, samples=samples)
    assert p["sent"] == 16 and p["cut"] == 2 and p["censored"] == 1
    assert p["errors"] == 2 and p["errors_by_kind"] == {"http-500": 1, "broken": 1}
    # TTFTs in the window: 12 served (0.2..1.3), 0.4 (cut while streaming), 5.0 (lower bound); not the errors'
    assert p["ttft_p50_ms"] == pytest.approx(750) and p["ttft_exact"]["p50"]
    assert p["ttft_p99_ms"] > 1300 and not p["ttft_exact"]["p99"]
    assert p["goodput_rps"] == pytest.approx(9 / 8)  # ok, in the window, TTFT <= 1 s: 0.2 .. 1.0
    # answers that ended in [2, 10]: those sent at 1.0 .. 9.0 and ok (the first ends at 1.5: no)
    assert p["ok_rps"] == pytest.approx(12 / 8) and p["output_tokens_per_s"] == pytest.approx(120 / 8)
    assert p["hit_rate"] == pytest.approx(100 / 200)   # from the reading at 1.9 s to the one at 5.0 s
    assert p["in_flight_mean"] == [2, 2] and p["max_over_mean"] == pytest.approx(1.0)
    assert not fleet.passes(p, 2000)   # errors
    p["errors"] = 0
    assert fleet.passes(p, 2000) == (p["ttft_p90_ms"] <= 2000)


def test_the_counters_of_a_stage_are_the_readings_that_bracket_it():
    samples = [(1.0, [], [{"n": 1}]), (2.0, [], [{"n": 2}]), (3.0, [], [{"n": 3}])]
    assert fleet.bracket(samples, 2.5, 2.9) == ([{"n": 2}], [{"n": 2}])
    assert fleet.bracket(samples, 0.5, 9.0) == ([{"n": 1}], [{"n": 3}])
    assert fleet.bracket([], 0, 1) == ((), ())


def test_a_point_passes_within_the_slo_and_without_errors():
    assert fleet.passes({"errors": 0, "ttft_p90_ms": 2000.0}, 2000)
    assert not fleet.passes({"errors": 0, "ttft_p90_ms": 2000.1}, 2000)
    assert not fleet.passes({"errors": 1, "ttft_p90_ms": 10.0}, 2000)
    assert not fleet.passes({"errors": 0, "ttft_p90_ms": None}, 2000)


# --- throughput at the SLO ---------------------------------------------------------------------------------

def P(rate, p90, errors=0):
    return {"offered_rps": rate, "ttft_p90_ms": p90, "errors": errors}


def test_the_throughput_at_the_slo_interpolates_where_p90_crosses_it():
    t = fleet.throughput_at_slo([P(15, 2500), P(5, 300), P(10, 1500)], 2000)
    assert t["grid"] == 10 and t["first_miss"] == 15 and t["why"] == "p90"
    assert t["value"] == pytest.approx(12.5) and t["lo"] == t["hi"] == t["value"]


def test_the_throughput_at_the_slo_stops_at_the_first_miss_and_an_error_keeps_the_grid_rate():
    t = fleet.throughput_at_slo([P(5, 300), P(10, 2100), P(15, 1900)], 2000)
    assert t["grid"] == 5 and t["first_miss"] == 10   # a later point within the SLO does not count
    t = fleet.throughput_at_slo([P(5, 300), P(10, 500, errors=1)], 2000)
    assert t["value"] == 5 and t["why"] == "errors"


def test_the_throughput_at_the_slo_is_a_range_when_the_sweep_does_not_bracket_it():
    t = fleet.throughput_at_slo([P(5, 300), P(10, 900)], 2000)
    assert (t["lo"], t["hi"], t["first_miss"]) == (10, math.inf, None)
    t = fleet.throughput_at_slo([P(5, 2300), P(10, 9000)], 2000)
    assert (t["value"], t["lo"], t["hi"], t["grid"]) == (None, 0.0, 5, None)


def test_ratios_of_ranges_and_the_best_of_several():
    a, b = fleet.exact(10), fleet.exact(5)
    assert fleet.ratio(a, b) == (2, 2)
    above = {"lo": 10, "hi": math.inf}
    below = {"lo": 0.0, "hi": 4}
    assert fleet.ratio(a, above) == (0, 1) and fleet.ratio(a, below) == (2.5, math.inf)
    assert fleet.best([a, b, below])["lo"] == 10 and fleet.best([]) is None
    assert fleet.fmt_range(2, 2) == "2.00×" and fleet.fmt_range(2.5, math.inf) == "≥ 2.50×"
    assert fleet.fmt_range(0, 1) == "< 1.00×" and fleet.fmt_range(1, 2) == "1.00–2.00×"


# --- the goals ---------------------------------------------------------------------------------------------

def good_run() -> tuple[dict, dict]:
    tas = {}
    for shape in shapes.SHAPES:
        tas[shape] = {"perfect": fleet.exact(20), "gw-prefix": fleet.exact(19), "gw-least-load": fleet.exact(14),
                      "service": fleet.exact(9), "vr-cache_aware": fleet.exact(15), "vr-consistent_hash":
                      fleet.exact(8), "vr-power_of_two": fleet.exact(14), "gw-prefix-x2": fleet.exact(18)}
    tas["unshared"]["gw-least-load"] = fleet.exact(19.5)
    errors = {s: {f: 0 for f in tas[s]} for s in shapes.SHAPES}
    return tas, errors


def test_the_goals_are_met_by_a_prefix_router_that_is_good_enough():
    tas, errors = good_run()
    rows = fleet.judge(tas, errors)
    assert [r["met"] for r in rows] == [True] * len(rows), rows
    assert len(rows) == 3 * 6 + 3
    with_cpu = fleet.judge(tas, errors, {"chat": {"gw-prefix": 1.234, "gw-least-load": 1.0}})
    assert len(with_cpu) == len(rows) + 1 and [r for r in with_cpu if r not in rows] == [
        {"shape": "chat", "goal": "the gateway's CPU per request (prefix)", "target": "≤ before",
         "measured": "1.23 ms", "met": None}]


def failed(tas, errors):
    return [(r["shape"], r["goal"]) for r in fleet.judge(tas, errors) if r["met"] is False]


@pytest.mark.parametrize("shape,front,value,goal", [
    ("chat", "service", 9.6, "prefix / random (a Service)"),
    ("document", "gw-least-load", 14.7, "prefix / least-load"),
    ("completions", "vr-consistent_hash", 15.9, "prefix / best vllm-router policy"),
    ("chat", "perfect", 21.2, "prefix / perfect router"),
    ("unshared", "gw-least-load", 20.1, "prefix / least-load"),
    ("document", "gw-prefix-x2", 17.0, "two gateways / one"),
])
def test_each_goal_fails_on_its_own(shape, front, value, goal):
    tas, errors = good_run()
    tas[shape][front] = fleet.exact(value)
    assert failed(tas, errors) == [(shape, goal)]


def test_an_error_through_a_gateway_fails_its_shape_and_a_peers_does_not():
    tas, errors = good_run()
    errors["chat"]["vr-cache_aware"] = 3
    assert failed(tas, errors) == []
    errors["chat"]["gw-prefix-x2"] = 1
    assert failed(tas, errors) == [("chat", "errors through our gateways")]


def test_a_goal_is_open_when_a_front_is_missing_or_the_ranges_cannot_tell():
    tas, errors = good_run()
    del tas["chat"]["service"]
    tas["document"]["service"] = {"lo": 0.0, "hi": 12.0, "value": None}   # random missed at its lowest rate
    tas["completions"]["service"] = {"lo": 0.0, "hi": 9.0, "value": None}
    rows = {(r["shape"], r["goal"]): r for r in fleet.judge(tas, errors)}
    assert rows[("chat", "prefix / random (a Service)")]["met"] is None
    assert rows[("document", "prefix / random (a Service)")]["met"] is None   # 19 / [0, 12): ≥ 1.58× only
    assert rows[("completions", "prefix / random (a Service)")]["met"] is True   # ≥ 19 / 9
    assert rows[("completions", "prefix / random (a Service)")]["measured"] == "≥ 2.11×"
    assert ("unshared", "prefix / random (a Service)") not in rows


# --- the report --------------------------------------------------------------------------------------------

def point(front: str, x: float, p90: float, exact: bool = True, **kw) -> dict:
    return {"front": front, "rate_x": x, "offered_rps": 20 * x, "ttft_p50_ms": p90 / 2, "ttft_p90_ms": p90,
            "ttft_p99_ms": p90 * 1.5, "ttft_exact": {"p50": True, "p90": exact, "p99": exact}, "errors": 0, "cut": 0,
            "goodput_rps": 10.0, "output_tokens_per_s": 800.0, "hit_rate": 0.8, "ideal_hit_rate": 0.9,
            "in_flight_mean": [4.0, 4.0, 4.0, 4.0], "max_over_mean": 1.0, "loadavg": 2.5,
            "cpu_cores": {"client": 0.2, "sims_total": 0.3, "front": 0.05}, "front_cpu_ms_per_request": 1.25,
            "prompt_tokens_mean": 4000, "sent": 40, **kw}


def test_a_fronts_cpu_per_request_weighs_its_stages_by_their_requests():
    points = [{"front_cpu_ms_per_request": 2.0, "sent": 10}, {"front_cpu_ms_per_request": 5.0, "sent": 30},
              {"front_cpu_ms_per_request": None, "sent": 0}]
    assert fleet.cpu_per_request(points) == pytest.approx((20 + 150) / 40)
    assert fleet.cpu_per_request([]) is None


def test_the_report_shows_the_throughput_the_goals_and_each_point():
    points = {"document": {"gw-prefix": [point("gw-prefix", 0.5, 400), point("gw-prefix", 0.75, 900),
                                         point("gw-prefix", 0.85, 2600, exact=False)],
                           "service": [point("service", 0.5, 3000, exact=False)],
                           "gw-least-load": [point("gw-least-load", 0.4, 500), point("gw-least-load", 0.5, 2500)]}}
    r = {"started": "2026-12-06 07:00 UTC", "finished": "07:30 UTC", "machine": "2 CPUs", "revision": "abc1234", "vllm_router": "0.1.17",
         "load_before": "load average 1.00", "load_after": "load average 2.00", "load_during": "1.0–3.0 (mean 2.0)",
         "command": "python bench/fleet.py", "results_file": "bench/results/fleet-x.json", "slo_ttft_s": 2.0,
         "grid": [0.4, 0.5, 0.75, 0.85], "duration_s": 8, "lead_s": 2, "grace_s": 3, "notes": ["a note"],
         "shapes": ["document"], "fronts": ["gw-prefix", "service", "gw-least-load"], "replicas": 4, "points": points,
         "capacity": {"document": {"fleet_rps": 20.0, "given": True}},
         "front_cpu_ms_per_request": {"document": {"gw-prefix": 1.25}}, "prompt_tokens_mean": {"document": 4000}}
    r["throughput"] = {"document": {"perfect": fleet.exact(20.0), **{
        f: fleet.throughput_at_slo(ps, 2000) for f, ps in points["document"].items()}}}
    r["goals"] = fleet.judge(r["throughput"], {"document": {"gw-prefix": 0, "service": 0, "gw-least-load": 0}})
    out = fleet.render(r, "<!-- b -->", "<!-- e -->")
    assert out.startswith("<!-- b -->") and out.endswith("<!-- e -->")
    assert "```sh\npython bench/fleet.py\n```" in out and "- note: a note" in out
    assert "SLO: p90 TTFT ≤ 2 s and no error" in out and "revision abc1234, vllm-router 0.1.17;" in out
    # 0.75 × 20 = 15 passes at 900 ms, 17 misses at 2600: crossing at 15 + 1100 / 1700 × 2 = 16.29
    assert "| gw-prefix | 16.3 (0.81×) |" in out and "| service | < 10.0 (< 0.50×) |" in out
    assert "| perfect | 20.0 (1.00×) |" in out
    assert "| gw-prefix | 900 · 1.25 ms |" in out and "| service | missed at 0.5× · 1.25 ms |" in out
    assert "| gw-least-load | missed at 0.5× · 1.25 ms |" in out
    assert "| document | prefix / random (a Service) | ≥ 2× | ≥ 1.63× | n/a |" in out   # 16.29 / [0, 10)
    assert "| document | prefix / perfect router | ≥ 0.9× | 0.81× | no |" in out
    assert "| 0.85 (17.0) | gw-prefix | 1300 / > 2600 / > 3900 | no |" in out
    assert "| 0.5 (10.0) | gw-prefix | 200 / 400 / 600 | yes | 10.00 | 800 | 80% (90%) | 4.0 4.0 4.0 4.0 (1.00) |" in out


# --- the Service front -------------------------------------------------------------------------------------

def test_a_backend_url_is_host_and_port():
    assert service.parse_backend("http://127.0.0.1:8000") == ("127.0.0.1", 8000)
    for bad in ("http://127.0.0.1", "http://127.0.0.1:80/v1", "127.0.0.1:x"):
        with pytest.raises(ValueError):
            service.parse_backend(bad)
    with pytest.raises(ValueError):
        service.Service([], 1)


async def test_the_service_relays_each_connection_to_one_random_backend_both_ways():
    async def backend(name: bytes):
        async def handle(reader, writer):
            writer.write(name)   # who answers, then an echo of what comes
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
        return await asyncio.start_server(handle, "127.0.0.1", 0)

    servers = [await backend(b"a"), await backend(b"b"), await backend(b"c")]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    svc = service.Service([("127.0.0.1", p) for p in ports], seed=3)
    front = await asyncio.start_server(svc.handle, "127.0.0.1", 0)
    port = front.sockets[0].getsockname()[1]
    seen = Counter()
    big = random.Random(1).randbytes(300_000)
    try:
        for _ in range(30):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            name = await asyncio.wait_for(reader.readexactly(1), 5)
            writer.write(big)   # a body larger than a read comes back whole
            assert await asyncio.wait_for(reader.readexactly(len(big)), 5) == big
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""   # the backend's close reaches the client
            seen[name] += 1
            writer.close()
    finally:
        front.close()
        for s in servers:
            s.close()
    assert set(seen) == {b"a", b"b", b"c"} and min(seen.values()) >= 4 and sum(svc.picked) == 30
