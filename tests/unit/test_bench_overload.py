"""G4's criteria on hand-made load points."""
from __future__ import annotations

from cxygpt_bench.overload import judge


def point(**kw):
    p = {"ttft_p95_ms": 80.0, "goodput_ratio": 0.92, "rejections": 10, "reject_max_ms": 40.0,
         "rejections_with_retry_after": 10}
    return {**p, **kw}


def test_ttft_bound_is_one_and_a_half_times_the_engines_own_plus_the_queue_timeout():
    v = judge(point(ttft_p95_ms=90.0), engine_full_ttft_p95_ms=40.0, queue_s=0.03, degrade=False)
    assert v["ttft_bound_ms"] == 90.0 and v["ttft_ok"] and v["met"]
    v = judge(point(ttft_p95_ms=90.1), engine_full_ttft_p95_ms=40.0, queue_s=0.03, degrade=False)
    assert not v["ttft_ok"] and not v["met"]


def test_no_admitted_request_does_not_meet_the_ttft_bound():
    assert not judge(point(ttft_p95_ms=None), engine_full_ttft_p95_ms=40.0, queue_s=0.03, degrade=False)["ttft_ok"]


def test_goodput_needs_ninety_per_cent_without_degradation_and_ninety_five_with_it():
    assert judge(point(goodput_ratio=0.90), engine_full_ttft_p95_ms=40.0, queue_s=0.03, degrade=False)["goodput_ok"]
    v = judge(point(goodput_ratio=0.92), engine_full_ttft_p95_ms=40.0, queue_s=0.03, degrade=True)
    assert v["goodput_min"] == 0.95 and not v["goodput_ok"] and not v["met"]


def test_every_rejection_within_50_ms_and_with_retry_after():
    base = dict(engine_full_ttft_p95_ms=40.0, queue_s=0.03, degrade=False)
    assert judge(point(rejections=0, reject_max_ms=None, rejections_with_retry_after=0), **base)["rejections_ok"]
    assert judge(point(reject_max_ms=50.0), **base)["rejections_ok"]
    assert not judge(point(reject_max_ms=50.5), **base)["rejections_ok"]
    assert not judge(point(rejections_with_retry_after=9), **base)["rejections_ok"]
