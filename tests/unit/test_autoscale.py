"""The autoscaler's decisions on an injected clock: the HPA's ratio and tolerance, stabilization windows, from and to
zero, unknown demand, and a history kept in the resource so that a restart decides the same."""
import random

import pytest

from cxygpt_operator.autoscaling.policy import (
    Demand,
    History,
    Policy,
    decide,
    decision_status,
    history_from_status,
    recommend,
    round_demand,
)

T0 = 1_800_000_000.0  # an epoch time; the core never reads a clock
TICK = 5.0


def run(policy, demands, current, *, restart_every=None, start=T0, history=None):
    """Decisions on successive ticks; with `restart_every`, the history goes through status.autoscaling (as an
    operator restart reads it back) before every n-th decision. Returns [(time, replicas, reason)]."""
    out, status, last_set = [], {}, None
    for i, value in enumerate(demands):
        now = start + i * TICK
        demand = value if isinstance(value, Demand) else Demand(value)
        if restart_every and i % restart_every == 0 and status:
            history, last_set = history_from_status(status), status["desiredReplicas"]
        d = decide(demand, current, policy, history, now, last_set=last_set)
        status = decision_status(d, demand, policy, current, status, now)
        history, last_set, current = d.history, d.replicas, d.replicas
        out.append((now, d.replicas, d.reason))
    return out


def changes(trace):
    return [(t, r) for (t, r, _), (_, before, _) in zip(trace[1:], trace) if r != before]


def test_the_ratio_rule_with_its_tolerance():
    policy = Policy(min_replicas=0, max_replicas=10, target=2)
    assert recommend(Demand(8.6), 4, policy)[0] == 4          # 8.6 / 8 = 1.075: within 10 %
    assert recommend(Demand(9.0), 4, policy)[0] == 5          # 1.125: ceil(9 / 2)
    assert recommend(Demand(7.0), 4, policy)[0] == 4          # 0.875 is outside, but ceil(3.5) is 4
    assert recommend(Demand(5.0), 4, policy)[0] == 3
    assert recommend(Demand(4.000000001), 1, policy)[0] == 2  # float noise is not a replica
    assert recommend(Demand(0.01), 0, policy)[0] == 1         # from zero: at least one
    assert recommend(Demand(0), 0, policy)[0] == 0


def test_steady_load_changes_the_count_at_most_once_per_minute():
    rng = random.Random(7)
    policy = Policy(min_replicas=0, max_replicas=16, target=2)
    demands = [8 * (1 + rng.uniform(-0.25, 0.25)) for _ in range(int(3600 / TICK))]  # an hour, ±25 % noise
    trace = run(policy, demands, current=4)
    moves = changes(trace)
    assert all(b - a >= 60 for (a, _), (b, _) in zip(moves, moves[1:])), moves
    assert len(moves) <= 2, moves  # up to the noise's top once, and no way back while it stays
    assert {r for _, r, _ in trace} <= {4, 5}


def test_a_step_reaches_the_maximum_at_the_next_decision_and_stays_for_the_window():
    policy = Policy(min_replicas=0, max_replicas=4, target=2)
    trace = run(policy, [1.0] * 6 + [30.0] * 6 + [0.0] * 80, current=1)
    assert [r for _, r, _ in trace[5:8]] == [1, 4, 4] and trace[6][2] == "ScaledUp"
    stepped_down = next(t for t, r, _ in trace[12:] if r < 4)
    assert stepped_down - trace[11][0] >= policy.scale_down_delay_s - TICK  # the highest of the window rules
    assert trace[-1][1] == 0


def test_a_step_with_a_scale_up_window_reaches_the_maximum_within_that_window():
    policy = Policy(min_replicas=1, max_replicas=4, target=2, scale_up_window_s=30)
    trace = run(policy, [1.0] * 4 + [30.0] * 12, current=1)
    step = trace[4][0]
    reached = next(t for t, r, _ in trace if r == 4)
    assert step < reached <= step + 30 + TICK
    assert trace[4][2] == "ScaleUpStabilized"


def test_flapping_demand_does_not_flap_the_count():
    policy = Policy(min_replicas=0, max_replicas=8, target=2, scale_down_delay_s=120)
    trace = run(policy, [0.0, 10.0] * 60 + [0.0] * 40, current=1)
    moves = changes(trace)
    assert moves[0] == (T0 + TICK, 5)                      # up at the first burst
    assert [r for _, r in moves[1:]] == [0]                # down only once the flapping stopped for the window
    last_burst = T0 + 119 * TICK
    assert moves[1][0] - last_burst >= 120


def test_to_zero_only_after_the_delay_without_demand_and_a_blip_restarts_it():
    policy = Policy(min_replicas=0, max_replicas=4, target=2, scale_down_delay_s=60)
    trace = run(policy, [0.0] * 10 + [0.3] + [0.0] * 20, current=1)
    zero = next(t for t, r, _ in trace if r == 0)
    assert zero - (T0 + 10 * TICK) >= 60        # counted from the blip, not from the start
    assert all(r == 1 for t, r, _ in trace if t < zero)


def test_the_first_decision_keeps_the_count_for_a_window():
    """Autoscaling just turned on (or history lost): the count found is not dropped at once."""
    policy = Policy(min_replicas=0, max_replicas=4, target=2, scale_down_delay_s=60)
    trace = run(policy, [0.0] * 20, current=3)
    assert trace[0][1:] == (3, "ScaleDownStabilized")
    assert next(t for t, r, _ in trace if r == 0) - T0 >= 60


def test_from_zero_starts_at_once_even_with_a_scale_up_window():
    policy = Policy(min_replicas=0, max_replicas=8, target=2, scale_up_window_s=120)
    d = decide(Demand(5), 0, policy, History(), T0)
    assert (d.replicas, d.reason) == (3, "ScaledFromZero")


def test_a_model_woken_from_zero_outside_the_autoscaler_is_kept_for_the_window():
    """A gateway set 0 -> 1 for a waiting request; the demand read before that still says 0."""
    policy = Policy(min_replicas=0, max_replicas=4, target=2, scale_down_delay_s=60)
    asleep = decide(Demand(0), 0, policy, None, T0)
    assert asleep.replicas == 0
    d = decide(Demand(0), 1, policy, asleep.history, T0 + 200, last_set=0)
    assert (d.replicas, d.reason) == (1, "Woken")
    later = decide(Demand(0), 1, policy, d.history, T0 + 250, last_set=1)
    assert later.replicas == 1
    gone = decide(Demand(0), 1, policy, later.history, T0 + 261, last_set=1)
    assert gone.replicas == 0


def test_unknown_demand_never_scales_down_but_may_scale_up():
    policy = Policy(min_replicas=0, max_replicas=8, target=2, scale_down_delay_s=10)
    history = decide(Demand(8), 4, policy, History(), T0).history
    partial = decide(Demand(1, complete=False, sources="1/2"), 4, policy, history, T0 + 100, last_set=4)
    assert (partial.replicas, partial.reason) == (4, "IncompleteMetrics")
    more = decide(Demand(14, complete=False, sources="1/2"), 4, policy, partial.history, T0 + 105, last_set=4)
    assert more.replicas == 7
    none = decide(Demand(None), 4, policy, history, T0 + 100, last_set=4)
    assert (none.replicas, none.reason) == (4, "NoMetrics")


def test_min_and_max_bound_every_decision():
    policy = Policy(min_replicas=2, max_replicas=3, target=1, scale_down_delay_s=10)
    assert decide(Demand(50), 2, policy, History(), T0).replicas == 3
    assert decide(Demand(50), 3, policy, History(), T0).reason == "LimitedByMax"
    d = decide(Demand(0), 5, policy, None, T0)   # above max (spec.replicas from before it was on): brought in
    assert d.replicas == 3
    assert decide(Demand(0), 0, policy, History(), T0).replicas == 2


@pytest.mark.parametrize("restart_every", [1, 3, 7])
def test_a_restart_reading_the_history_back_from_status_decides_the_same(restart_every):
    rng = random.Random(restart_every)
    policy = Policy(min_replicas=0, max_replicas=6, target=2, scale_down_delay_s=60, scale_up_window_s=15)
    demands = [rng.choice([0, 0, 1, 3, 6, 11]) for _ in range(300)]
    assert [r for _, r, _ in run(policy, demands, 1, restart_every=restart_every)] == \
        [r for _, r, _ in run(policy, demands, 1)]


def test_the_history_stays_bounded_and_the_status_does_not_churn_on_a_steady_count():
    policy = Policy(min_replicas=0, max_replicas=64, target=1, scale_down_delay_s=3600)
    history, current = None, 64
    for i in range(2000):   # a slow decline over ~3 hours: every count recommended once, then smaller ones
        d = decide(Demand(64 - i * 64 / 2000), current, policy, history, T0 + i * TICK, last_set=current)
        history, current = d.history, d.replicas
        assert len(history.highs) <= 65 and not history.lows
    steady = Policy(min_replicas=0, max_replicas=8, target=2, scale_down_delay_s=300)
    statuses, history, previous = [], None, {}
    for i in range(12):  # one minute of ticks at a steady 4
        d = decide(Demand(8), 4, steady, history, T0 + i * TICK, last_set=4 if i else None)
        previous = decision_status(d, Demand(8), steady, 4, previous, T0 + i * TICK)
        statuses.append(previous)
        history = d.history
    distinct = {str(s) for s in statuses}
    assert len(distinct) <= 60 / steady.time_step_s + 1   # 15 s steps: a write every 15 s at most


def test_round_demand_keeps_two_significant_digits():
    assert [round_demand(v) for v in (None, 0, 0.0123, 0.37, 3.94, 12.4, 123.4)] == [None, 0, 0.012, 0.37, 3.9, 12, 120]


def test_decision_status_says_what_and_why():
    policy = Policy(min_replicas=0, max_replicas=4, target=2)
    d = decide(Demand(6.2, sources="2/2"), 1, policy, History(), T0)
    status = decision_status(d, Demand(6.2, sources="2/2"), policy, 1, {}, T0)
    assert status["desiredReplicas"] == 4 and status["reason"] == "ScaledUp" and status["lastScaleTime"]
    assert status["demand"] == 6.2 and status["gateways"] == "2/2" and status["active"] and status["scaleFromZero"]
    assert "1 -> 4" in status["message"]
    assert history_from_status(status).highs == d.history.highs
    same = decision_status(decide(Demand(8), 4, policy, d.history, T0 + 5, last_set=4), Demand(8), policy, 4,
                           status, T0 + 5)
    assert same["lastScaleTime"] == status["lastScaleTime"]   # no change, no new time


def test_gateway_endpoints_are_the_ready_ones_on_the_http_port():
    from cxygpt_operator.autoscaling.demand import gateway_endpoints
    slices = [{"ports": [{"name": "metrics", "port": 9}, {"name": "http", "port": 8080}], "endpoints": [
        {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
        {"addresses": ["10.0.0.2"]},
        {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
        {"addresses": ["10.0.0.4"], "conditions": {"ready": True, "terminating": True}},
        {"addresses": ["fd00::5"], "conditions": {"ready": True}}]},
        {"ports": [], "endpoints": [{"addresses": ["10.0.0.9"]}]}]
    assert gateway_endpoints(slices) == ["http://10.0.0.1:8080", "http://10.0.0.2:8080", "http://[fd00::5]:8080"]


def test_demand_is_parsed_from_the_gateway_metrics_and_summed_over_gateways():
    from cxygpt_operator.autoscaling.demand import Snapshot, parse_demand
    page = ("# HELP cxygpt_gateway_demand d\n# TYPE cxygpt_gateway_demand gauge\n"
            'cxygpt_gateway_demand{model="a"} 1.5\ncxygpt_gateway_demand{model="b"} 0.0\n'
            "# TYPE cxygpt_gateway_in_flight gauge\n"
            'cxygpt_gateway_in_flight{model="a"} 9.0\n')
    assert parse_demand(page) == {"a": 1.5, "b": 0.0}
    with pytest.raises(ValueError):
        parse_demand("not {prometheus text")
    snapshot = Snapshot(0, {"g1": {"a": 1.5}, "g2": {"a": 2.0, "b": 1}}, known=3)
    assert snapshot.demand("a") == Demand(3.5, complete=False, sources="2/3")
    assert snapshot.demand("c") == Demand(0.0, complete=False, sources="2/3")
    assert Snapshot(0, {"g1": {}}, known=1).demand("a") == Demand(0.0, complete=True, sources="1/1")
    assert Snapshot(0, known=2).demand("a").value is None


def test_who_else_scales_a_model_deployment():
    from cxygpt_operator.autoscaling.step import scale_target

    def spec(target, api="cxygpt.io/v1alpha1", kind="ModelDeployment"):
        return {"scaleTargetRef": {"apiVersion": api, "kind": kind, "name": target}}
    assert scale_target("ScaledObject", "llm", "chat", spec("chat")) == {("llm", "chat"): "ScaledObject llm/chat"}
    assert scale_target("HorizontalPodAutoscaler", "llm", "h", spec("chat")) == \
        {("llm", "chat"): "HorizontalPodAutoscaler llm/h"}
    assert scale_target("HorizontalPodAutoscaler", "llm", "web", spec("web", "apps/v1", "Deployment")) == {}
    assert scale_target("ScaledObject", "llm", "x", {"scaleTargetRef": {"name": "web"}}) == {}  # KEDA: a Deployment
    assert scale_target("ScaledObject", "llm", "x", {}) == {}
