"""One autoscaling step with the API and the gateways faked: what it writes (count and status.autoscaling) and
when it leaves the count to someone else."""
from __future__ import annotations

import pytest

from cxygpt_operator.autoscaling.demand import Snapshot
from cxygpt_operator.autoscaling.policy import autoscaling_of
from cxygpt_operator.autoscaling.step import Scaler, autoscale


async def one_step(body: dict, scaler, **kw):
    """One autoscaling step, spec.autoscaling parsed once as the operator's loop does."""
    return await autoscale(body, autoscaling_of(body.get("spec") or {}), scaler, **kw)


NOW = 1_800_000_000.0


class FakeKube:
    def __init__(self, scale_ok=True):
        self.scales, self.patches, self.scale_ok = [], [], scale_ok

    def scale(self, namespace, name, replicas, expected):
        self.scales.append((name, expected, replicas))
        return self.scale_ok

    def patch_status(self, namespace, name, patch):
        self.patches.append(patch)


class FakeReader:
    def __init__(self, demand):
        self.demand = demand

    async def latest(self):
        return Snapshot(0, {"gw": {"chat": self.demand}}, known=1)


def md(replicas=1, autoscaling=None, status=None):
    spec = {"model": {"name": "chat"}, "replicas": replicas}
    if autoscaling is not None:
        spec["autoscaling"] = autoscaling
    return {"metadata": {"name": "chat", "namespace": "llm"}, "spec": spec,
            "status": {"limits": {"maxConcurrency": 8}, **(status or {})}}


async def test_the_target_defaults_to_the_profile_concurrency_and_the_count_is_written_from_the_one_seen():
    kube = FakeKube()
    step = await one_step(md(1, {"minReplicas": 0, "maxReplicas": 4}), Scaler(kube, FakeReader(20)), now=NOW)
    assert kube.scales == [("chat", 1, 3)]                       # ceil(20 / 8)
    assert step.status["target"] == 8 and step.status["desiredReplicas"] == 3
    assert step.status["lastScaleMessage"].startswith("1 -> 3") and step.event[:2] == ("Normal", "ScaledUp")
    assert kube.patches == [{"autoscaling": step.status}]
    # the next step from what it wrote, before the body shows it: nothing new to write
    again = await one_step(md(3, {"minReplicas": 0, "maxReplicas": 4}), Scaler(kube, FakeReader(20)),
                            written=step.status, now=NOW + 5)
    assert kube.scales == [("chat", 1, 3)] and again.event is None
    assert again.status["lastScaleMessage"] == step.status["lastScaleMessage"]


async def test_a_count_changed_meanwhile_is_not_overwritten():
    kube = FakeKube(scale_ok=False)
    step = await one_step(md(1, {"maxReplicas": 4, "targetInFlightPerReplica": 2}), Scaler(kube, FakeReader(8)),
                           now=NOW)
    assert kube.scales == [("chat", 1, 4)] and kube.patches == [] and step.status == {} and step.event is None


async def test_without_a_target_or_a_profile_it_waits():
    kube = FakeKube()
    body = md(1, {"maxReplicas": 4})
    body["status"] = {}
    step = await one_step(body, Scaler(kube, FakeReader(8)), now=NOW)
    assert step.status["reason"] == "WaitingForProfile" and kube.scales == []


@pytest.mark.parametrize("others, autoscaling, reason, scale_from_zero", [
    (["HorizontalPodAutoscaler llm/h"], {"maxReplicas": 4}, "ConflictingAutoscaler", False),
    (["ScaledObject llm/chat", "HorizontalPodAutoscaler llm/keda-hpa-chat"], {"maxReplicas": 4},
     "ConflictingAutoscaler", True),
    (["ScaledObject llm/chat"], None, "ExternalAutoscaler", True),
])
async def test_someone_else_setting_the_count_wins(others, autoscaling, reason, scale_from_zero):
    kube = FakeKube()
    step = await one_step(md(1, autoscaling), Scaler(kube, FakeReader(50)), others=others, now=NOW)
    assert kube.scales == []
    assert (step.status["reason"], step.status["active"], step.status["scaleFromZero"]) == (reason, False, scale_from_zero)
    assert step.status["scaler"] == others[0]
    assert (step.event or ("",))[0] == ("Warning" if reason == "ConflictingAutoscaler" else "")
    again = await one_step(md(1, autoscaling), Scaler(kube, FakeReader(50)), others=others, written=step.status,
                            now=NOW + 5)
    assert again.event is None and len(kube.patches) == 1        # said once


async def test_an_hpa_alone_is_none_of_its_business_and_old_state_is_removed():
    kube = FakeKube()
    stale = {"autoscaling": {"scaler": "Operator", "active": True, "desiredReplicas": 2}}
    step = await one_step(md(2, None, stale), Scaler(kube, FakeReader(0)), others=["HorizontalPodAutoscaler llm/h"],
                           now=NOW)
    assert step.status == {} and kube.patches == [{"autoscaling": None}] and kube.scales == []
