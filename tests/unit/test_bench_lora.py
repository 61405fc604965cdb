"""The LoRA benchmark's pure parts: the same requests for every front, spread over the adapters; its report."""
from __future__ import annotations

import sys
from collections import Counter

import orjson

from harness import REPO

sys.path.insert(0, str(REPO / "bench"))
import lora  # noqa: E402


def test_every_front_gets_the_same_requests_spread_over_the_adapters():
    adapters = [f"lora-{i}" for i in range(lora.ADAPTERS)]
    one, other = lora.AdapterLoad(adapters, seed=1), lora.AdapterLoad(adapters, seed=1)
    bodies = [one.body(i) for i in range(800)]
    assert bodies == [other.body(i) for i in range(800)]
    assert lora.AdapterLoad(adapters, seed=2).body(0) != bodies[0]
    asked = Counter(orjson.loads(body)["model"] for _, body, _ in bodies)
    assert set(asked) == set(adapters) and max(asked.values()) < 1.3 * 800 / len(adapters)
    first = orjson.loads(bodies[0][1])
    assert first["stream"] and first["ignore_eos"] and first["max_tokens"] == lora.OUTPUT_TOKENS
    assert len({orjson.loads(body)["messages"][0]["content"][:40] for _, body, _ in bodies}) == 800  # own homes


def test_zipf_popularity_makes_a_few_adapters_hot_on_the_same_requests():
    adapters = [f"lora-{i}" for i in range(lora.ADAPTERS)]
    zipf = lora.AdapterLoad(adapters, seed=1, popularity="zipf")
    asked = Counter(orjson.loads(zipf.body(i)[1])["model"] for i in range(4000))
    assert 0.33 < asked["lora-0"] / 4000 < 0.41 and asked["lora-0"] > 1.7 * asked["lora-1"] > asked["lora-7"]
    assert lora.marks("zipf") != lora.marks("uniform") == (lora.MARK_BEGIN, lora.MARK_END)


def test_the_report_names_the_command_and_each_fronts_throughput_at_the_slo():
    point = {"offered_rps": 4.0, "ttft_p90_ms": 150.0, "errors": 0}
    miss = {"offered_rps": 8.0, "ttft_p90_ms": 2500.0, "errors": 0}
    r = {"started": "2026-12-06 09:00 UTC", "machine": "2 CPUs", "revision": "abc", "load_before": "load 1",
         "load_during": "load 1–2", "elapsed_s": 200.0, "command": "python bench/lora.py", "duration_s": 8.0,
         "grid": [4.0, 8.0], "slo_ttft_s": 2.0, "notes": [],
         "points": {"gw-adapter-aware": [point, miss]},
         "throughput": {"gw-adapter-aware": lora.fleet.throughput_at_slo([point, miss], 2000)}}
    text = lora.render(r)
    assert text.startswith(lora.MARK_BEGIN) and text.endswith(lora.MARK_END)
    assert "python bench/lora.py" in text and "| gw-adapter-aware | 7.1 | 8/s (p90) | 4: 150, 8: 2500 | 0 |" in text
