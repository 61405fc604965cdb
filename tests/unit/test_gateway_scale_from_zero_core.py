"""The gateway's side of autoscaling, pure parts: the demand window, the hold at zero, the wake signal and its
de-duplication, and what discovery reads from a ModelDeployment for it."""
from __future__ import annotations

import asyncio

import pytest
from test_gateway_discovery import endpointslice, modeldeployment

from cxygpt_gateway.admission.demand import ARRIVAL_FLOOR, DemandWindow, sample_period
from cxygpt_gateway.admission.queue import ModelQueue
from cxygpt_gateway.discovery.base import ModelSpec, ScaleTarget, Unavailable
from cxygpt_gateway.discovery.kubernetes import spec_from_modeldeployment, why_unavailable
from cxygpt_gateway.discovery.wake import REPEAT_S, Waker
from cxygpt_gateway.errors import GatewayError
from cxygpt_gateway.routing.registry import Registry
from cxygpt_profiles import default_table

LIMITS = default_table().get("DEV_32G").limits


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_demand_is_the_mean_over_the_window_and_an_arrival_keeps_it_above_zero():
    clock = Clock()
    w = DemandWindow(10, clock)
    assert w.value() == 0
    for level in (4, 4, 2, 2):
        w.sample(level)
        clock.t += 1
    assert w.value() == 3
    clock.t += 8        # the first two samples are out of the window now
    assert w.value() == 2
    clock.t += 10
    assert w.value() == 0
    w.arrived()          # a request that came and went between two samples
    clock.t += 9
    assert w.value() == ARRIVAL_FLOOR
    clock.t += 1.5
    assert w.value() == 0
    assert sample_period(10) == 0.25 and sample_period(60) == 1.5 and sample_period(1) == 0.25


async def test_a_queue_that_holds_at_zero_waits_instead_of_refusing_and_serves_the_first_replica():
    q = ModelQueue(queue_size=2, max_concurrency=1)
    with pytest.raises(GatewayError) as e:
        q.try_take()
    assert e.value.status == 503 and e.value.reason == "no_ready_replica"
    q.hold_empty = True
    assert q.try_take() is None
    waiters = [asyncio.create_task(q.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert q.waiting == 2
    with pytest.raises(GatewayError) as e:
        q.try_take()
    assert e.value.reason == "queue_full"       # bounded at zero too
    leaving = waiters.pop()
    leaving.cancel()                             # a client that leaves leaves the line
    await asyncio.gather(leaving, return_exceptions=True)
    assert q.waiting == 1
    q.set_backends(["http://10.0.0.1:8000"])     # the first replica is ready
    slot = await asyncio.wait_for(waiters[0], 1)
    assert slot.backend.url == "http://10.0.0.1:8000" and q.waiting == 0


def _spec(replicas=0, urls=(), scale=True, unavailable=None):
    return ModelSpec(name="m", urls=tuple(urls), limits=LIMITS, mode="multi", profile="DEV_32G",
                     scale_from_zero=ScaleTarget("llm", "m", replicas) if scale else None, unavailable=unavailable)


async def test_a_route_says_its_state_and_releases_the_held_requests_when_the_hold_ends():
    registry = Registry(default_table())
    registry.upsert(_spec())
    route = registry.get("m")
    assert route.queue.hold_empty and route.state() == "scaled_to_zero"
    registry.upsert(_spec(replicas=1))
    assert route.state() == "starting"
    held = asyncio.create_task(route.queue.wait())
    await asyncio.sleep(0)
    registry.upsert(_spec(replicas=1, scale=False, unavailable=Unavailable("model m cannot serve: crash loop")))
    with pytest.raises(GatewayError) as e:
        await asyncio.wait_for(held, 1)
    assert e.value.status == 503 and "crash loop" in e.value.message
    assert route.state() == "unavailable"
    registry.upsert(_spec(replicas=1, urls=["http://10.0.0.1:8000"], scale=False))
    assert route.state() == "ready"


class FakeDiscovery:
    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    async def wake(self, target):
        self.calls.append(target)
        return self.answers.pop(0)


async def test_a_wake_is_sent_once_per_model_then_not_again_for_a_while():
    clock, results = Clock(), []
    discovery = FakeDiscovery(["woken", "awake", "failed: 403 forbidden"])
    waker = Waker(discovery, clock=clock, on_result=lambda model, result: results.append((model, result)))
    target = ScaleTarget("llm", "m", 0)
    assert waker.wake("m", target) and not waker.wake("m", target)   # a burst of requests: one write
    assert not waker.wake("m", ScaleTarget("llm", "m", 1))            # not at zero: nothing to wake
    assert not waker.wake("m", None)                                 # not autoscaled
    await asyncio.gather(*waker.tasks)
    clock.t += REPEAT_S
    assert waker.wake("m", target)                                   # still asleep later (e.g. the watch lags)
    assert waker.wake("other", ScaleTarget("llm", "other", 0))
    await asyncio.gather(*waker.tasks)
    assert results == [("m", "woken"), ("m", "awake"), ("other", "failed")]
    assert [c.name for c in discovery.calls] == ["m", "m", "other"]
    assert not Waker(object()).wake("m", target)                     # a static backend file wakes nothing


def test_discovery_holds_only_for_an_autoscaler_that_scales_from_zero_and_a_model_that_can_serve():
    asleep = modeldeployment(phase="ScaledToZero", replicas=0, autoscaling={"scaleFromZero": True})
    spec = spec_from_modeldeployment(asleep, [])
    assert spec.scale_from_zero == ScaleTarget("llm", "qwen3-14b", 0) and spec.urls == ()
    assert "scaled to zero for want of requests; a request starts it" in spec.unavailable.message
    assert spec_from_modeldeployment(modeldeployment(phase="ScaledToZero", replicas=0), []).scale_from_zero is None
    assert "spec.replicas is 0" in why_unavailable(modeldeployment(phase="ScaledToZero", replicas=0)).message
    failed = modeldeployment(phase="Failed", replicas=1, autoscaling={"scaleFromZero": True})
    assert spec_from_modeldeployment(failed, []).scale_from_zero is None
    external = modeldeployment(replicas=2, autoscaling={"scaleFromZero": False, "scaler": "HorizontalPodAutoscaler"})
    ready = [endpointslice("qwen3-14b", endpoints=[{"addresses": ["10.0.0.1"], "conditions": {"ready": True}}])]
    assert spec_from_modeldeployment(external, ready).scale_from_zero is None


def test_a_model_no_gpu_node_can_hold_is_not_woken_and_says_it_cannot_start():
    """Waking it would leave a pod Pending while requests wait the cold-start timeout for nothing."""
    unplaceable = {"type": "ProfileSelected", "status": "False", "reason": "NoMatchingGPU",
                   "message": "no schedulable GPU node fits a multi profile (nodes: 1x 24 GiB)"}
    md = modeldeployment(phase="Pending", replicas=0, autoscaling={"scaleFromZero": True}, conditions=[unplaceable])
    spec = spec_from_modeldeployment(md, [])
    assert spec.scale_from_zero is None
    assert spec.unavailable.message.startswith("model qwen3-14b cannot start: no schedulable GPU node fits")
    assert spec.unavailable.retry_after_s == 60
    md = modeldeployment(phase="Pending", replicas=1, autoscaling={"scaleFromZero": True}, conditions=[unplaceable])
    assert "cannot start" in why_unavailable(md).message  # woken before the nodes changed: said as such too
    placed = dict(unplaceable, status="True", reason="AutoSelected")
    md = modeldeployment(phase="ScaledToZero", replicas=0, autoscaling={"scaleFromZero": True}, conditions=[placed])
    assert spec_from_modeldeployment(md, []).scale_from_zero is not None


def test_the_namespaces_a_model_takes_fallbacks_from():
    md = modeldeployment(namespace="team-b")
    md["spec"]["acceptFallbackFrom"] = ["team-a", 7]
    spec = spec_from_modeldeployment(md, [])
    assert (spec.namespace, spec.accept_fallback_from) == ("team-b", ("team-a",))
    assert spec.accepts_fallback_from("team-b") and spec.accepts_fallback_from("team-a")
    assert not spec.accepts_fallback_from("team-c")
    md["spec"]["acceptFallbackFrom"] = ["*"]
    assert spec_from_modeldeployment(md, []).accepts_fallback_from("anyone")
    static = ModelSpec(name="s", urls=(), limits=default_table().get("DEV_32G").limits, mode="multi")
    assert static.accepts_fallback_from(None)  # the static file's models are one owner's
