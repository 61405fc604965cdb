"""cxygpt-bench's statistics on known latency lists, and its distributions."""
from __future__ import annotations

import random

import pytest

from cxygpt_bench.load import Dist, prompt_of
from cxygpt_bench.stats import Record, Report, percentile, render, summarize


def test_percentiles_interpolate_between_closest_ranks():
    values = [float(v) for v in range(1, 11)]  # 1..10, shuffled order must not matter
    random.Random(3).shuffle(values)
    assert percentile(values, 50) == pytest.approx(5.5)
    assert percentile(values, 95) == pytest.approx(9.55)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 10.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_summary_of_a_skewed_list():
    s = summarize([0.010] * 98 + [1.0, 2.0])
    assert s["n"] == 100
    assert s["avg"] == pytest.approx((0.98 + 3.0) / 100)
    assert s["p50"] == pytest.approx(0.010)
    assert s["p95"] == pytest.approx(0.010)
    assert s["p99"] == pytest.approx(1.01)  # between the 99th (1.0) and 100th (2.0) value
    assert (s["min"], s["max"]) == (0.010, 2.0)
    assert summarize([])["p50"] is None


def test_report_counts_statuses_rates_and_rejections():
    records = ([Record(200, 0.010, 0.100, tokens=64, chunks=64)] * 6
               + [Record(413, None, 0.002), Record(429, None, 0.004, retry_after=True),
                  Record(503, None, 0.006, retry_after=True), Record(503, None, 0.020),
                  Record(0, None, 1.0), Record(599, 0.01, 0.5)])
    d = Report(records, elapsed_s=2.0, dropped=3).to_dict()
    assert d["requests"] == 12 and d["ok"] == 6 and d["dropped"] == 3
    assert d["rps"] == 6.0 and d["ok_rps"] == 3.0
    assert d["output_tokens"] == 384 and d["output_tokens_per_s"] == 192.0 and d["chunks_per_s"] == 192.0
    assert d["errors"] == {"413": 1, "429": 1, "503": 2, "other": 2}
    assert d["error_rates"]["503"] == pytest.approx(2 / 12)
    assert d["ttft_ms"]["p50"] == pytest.approx(10.0) and d["latency_ms"]["p99"] == pytest.approx(100.0)
    assert d["rejection_ms"]["n"] == 3 and d["rejections_with_retry_after"] == 2
    assert d["rejection_ms"]["max"] == pytest.approx(20.0)
    text = render(d)
    assert "503 2 (16.7%)" in text and "with Retry-After 2/3" in text and "p50 10.0" in text


def test_distributions():
    rng = random.Random(1)
    assert Dist("64").sample(rng) == 64
    assert all(10 <= Dist("uniform:20:10").sample(rng) <= 20 for _ in range(200))
    assert {Dist("choice:8,16").sample(rng) for _ in range(100)} == {8, 16}
    assert all(Dist("normal:5:50").sample(rng) >= 1 for _ in range(200))
    for bad in ("x", "uniform:1", "normal:a:b", "0", "lognormal:1:2"):
        with pytest.raises(ValueError):
            Dist(bad)
    assert len(prompt_of(50).split()) == 50


def test_window_rate_counts_only_successes_that_ended_inside_it():
    records = ([Record(200, 0.01, 0.5, end=t) for t in (0.5, 1.5, 2.0, 2.5, 3.0, 4.0, 5.5)]
               + [Record(503, None, 0.03, end=2.2)])
    report = Report(records, elapsed_s=6.0, window=(2.0, 4.0))
    assert report.window_ok_rps() == pytest.approx(4 / 2.0)  # 2.0, 2.5, 3.0 and 4.0
    assert report.to_dict()["window_ok_rps"] == pytest.approx(2.0)
    assert Report(records, elapsed_s=6.0).to_dict()["window_ok_rps"] is None
