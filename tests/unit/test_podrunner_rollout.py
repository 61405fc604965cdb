"""The pod runner's Deployment-controller decisions: rollout order, scaling, Recreate, the engine cap."""
import time

from cxygpt_dev.containers import requests_in_flight, tail_message
from cxygpt_dev.podrunner import template_hash
from cxygpt_dev.rollout import PodView, Step, Strategy, rollout_step, strategy_of

SURGE = Strategy(max_surge=1, max_unavailable=0)
IN_PLACE = Strategy(max_surge=0, max_unavailable=1)


def pods(*specs):
    """'old+' = a ready pod of template 'old'; 'new-' = not ready; 'old~' = terminating."""
    return [PodView(f"p{i}-{s}", s[:-1], s[-1] == "+", s[-1] == "~") for i, s in enumerate(specs)]


def simulate(state, desired, strategy, capacity=100):
    """Run the controller until it settles; every started pod turns ready and every terminated one vanishes
    before the next step. Returns the pods' history: one sorted tuple of (template, ready) per step."""
    history = []
    for _ in range(20):
        step = rollout_step(state, desired, "new", strategy, capacity)
        if step == Step():
            return history
        assert not (step.start and step.terminate and strategy.max_unavailable == 0
                    and sum(p.ready for p in state if p.name not in step.terminate) < desired), \
            "never fewer ready pods than desired with maxUnavailable 0"
        state = [p for p in state if p.name not in step.terminate]
        state += [PodView(f"n{len(history)}-{i}", "new", False) for i in range(step.start)]
        history.append(sorted((p.template_hash, p.ready) for p in state))
        state = [PodView(p.name, p.template_hash, True) for p in state]
    raise AssertionError("no fixed point")


def test_surge_one_starts_a_new_pod_and_waits_until_it_is_ready():
    assert rollout_step(pods("old+", "old+"), 2, "new", SURGE, 10) == Step(start=1)
    # the new pod is not ready yet: nothing else happens
    assert rollout_step(pods("old+", "old+", "new-"), 2, "new", SURGE, 10) == Step()
    # it is ready: one old pod goes, and the next new one starts
    assert rollout_step(pods("old+", "old+", "new+"), 2, "new", SURGE, 10) == Step(start=1, terminate=("p0-old+",))
    # the last new one is ready: the last old one goes
    assert rollout_step(pods("old+", "new+", "new+"), 2, "new", SURGE, 10) == Step(terminate=("p0-old+",))
    assert rollout_step(pods("new+", "new+"), 2, "new", SURGE, 10) == Step()


def test_a_whole_surge_rollout_never_drops_below_desired_ready():
    history = simulate(pods("old+", "old+", "old+"), 3, SURGE)
    for state in history:
        assert sum(ready for _, ready in state) >= 3 and len(state) <= 4
    assert history[-1] == [("new", True)] * 3


def test_replace_in_place_terminates_first_and_never_exceeds_desired():
    assert rollout_step(pods("old+", "old+"), 2, "new", IN_PLACE, 10) == Step(start=1, terminate=("p0-old+",))
    history = simulate(pods("old+", "old+"), 2, IN_PLACE)
    assert all(len(state) <= 2 for state in history)


def test_scale_up_adds_pods_and_old_ones_stay():
    assert rollout_step(pods("new+", "new+"), 3, "new", SURGE, 10) == Step(start=1)
    assert rollout_step(pods("new+", "new+"), 5, "new", Strategy(max_surge=2), 10) == Step(start=3)


def test_scale_down_drains_the_extra_pods_not_ready_ones_first():
    assert rollout_step(pods("new+", "new-", "new+"), 1, "new", SURGE, 10) == Step(terminate=("p1-new-", "p0-new+"))
    assert rollout_step(pods("new+", "new+"), 0, "new", SURGE, 10) == Step(terminate=("p0-new+", "p1-new+"))


def test_terminating_pods_are_neither_counted_nor_terminated_again():
    assert rollout_step(pods("new~", "new+"), 2, "new", SURGE, 10) == Step(start=1)
    assert rollout_step(pods("old~", "new+"), 1, "new", SURGE, 10) == Step()


def test_old_pods_that_are_not_ready_go_at_once():
    # a crash-looping old pod serves nothing: removing it costs no availability
    assert rollout_step(pods("old-", "old+"), 2, "new", SURGE, 10) == Step(start=2, terminate=("p0-old-",))


def test_a_crash_looping_new_pod_holds_the_rollout():
    assert rollout_step(pods("old+", "old+", "new-"), 2, "new", SURGE, 10) == Step()


def test_recreate_stops_every_old_pod_before_starting_new_ones():
    recreate = Strategy(recreate=True)
    assert rollout_step(pods("old+", "old+"), 2, "new", recreate, 10) == Step(terminate=("p0-old+", "p1-old+"))
    assert rollout_step(pods("old~"), 2, "new", recreate, 10) == Step()
    assert rollout_step([], 2, "new", recreate, 10) == Step(start=2)


def test_capacity_refuses_the_rest_in_linear_time():
    assert rollout_step([], 100000, "new", SURGE, 32) == Step(start=32, refused=99968)
    many = [PodView(f"p{i}", "new", True) for i in range(32)]
    began = time.monotonic()
    assert rollout_step(many, 100000, "new", SURGE, 0) == Step(refused=99968)
    assert rollout_step(many, 10**9, "new", SURGE, 0).refused == 10**9 - 32
    assert time.monotonic() - began < 0.1


def test_strategy_from_the_deployment_spec():
    assert strategy_of({"replicas": 2, "strategy": {"type": "RollingUpdate",
                                                    "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}}) == SURGE
    assert strategy_of({"replicas": 2, "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}}) == IN_PLACE
    # Kubernetes' defaults: 25% each, surge rounded up and unavailable down
    assert strategy_of({"replicas": 2}) == Strategy(max_surge=1, max_unavailable=0)
    assert strategy_of({"replicas": 8, "strategy": {"rollingUpdate": {"maxSurge": "50%"}}}) == Strategy(
        max_surge=4, max_unavailable=2)
    assert strategy_of({"strategy": {"type": "Recreate"}}).recreate


def test_template_hash_pod_message_and_metrics():
    assert template_hash({"a": 1, "b": 2}) == template_hash({"b": 2, "a": 1})
    h = template_hash({"spec": {"containers": [{"name": "engine"}]}})
    assert len(h) == 10 and h.isalnum() and h == h.lower()
    assert h != template_hash({"spec": {"containers": [{"name": "engine", "env": [{"name": "X"}]}]}})
    assert tail_message(["x" * 3000, "last line"]).endswith("last line")
    assert len(tail_message(["x" * 3000, "last line"]).encode()) == 2048
    metrics = ('# HELP vllm:num_requests_running x\nvllm:num_requests_running{model_name="m"} 2.0\n'
               'vllm:num_requests_waiting{model_name="m"} 1.0\nvllm:num_requests_swapped 5.0\n')
    assert requests_in_flight(metrics) == 3.0


def test_old_pods_stay_while_a_full_set_of_new_ones_is_not_ready_yet():
    # the new pods number `desired`, but one is still starting: the last ready old pod must stay
    assert rollout_step(pods("old~", "old+", "new+", "new-"), 2, "new", SURGE, 10) == Step()
    assert rollout_step(pods("old+", "new+", "new+"), 2, "new", SURGE, 10) == Step(terminate=("p0-old+",))
