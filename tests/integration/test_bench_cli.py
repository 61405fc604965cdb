"""cxygpt-bench against a real cxygpt-sim for a few seconds: closed and open loop, stream or not, JSON out."""
from __future__ import annotations

import json
import subprocess

import pytest
from test_gateway_support import start_sim

from harness import console_script


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    proc = start_sim(tmp_path_factory.mktemp("bench"), ttft_ms=5, itl_ms=1)
    yield proc
    proc.stop()


def bench(*args: str) -> dict:
    out = subprocess.run([console_script("cxygpt-bench"), "--json", "--quiet", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def test_streaming_closed_loop_counts_every_round(sim):
    d = bench("--url", sim.url + "/v1/chat/completions", "--concurrency", "4", "--rounds", "5", "--max-tokens", "8")
    assert d["requests"] == 20 and d["ok"] == 20
    assert d["output_tokens"] == 20 * 8  # from the usage chunk
    assert d["chunks"] == 20 * 9  # 8 token events and the finish_reason event; not the usage chunk nor [DONE]
    assert 0 < d["ttft_ms"]["p50"] <= d["latency_ms"]["p50"]
    assert d["errors"] == {"413": 0, "429": 0, "503": 0, "other": 0}


def test_non_streaming_open_loop_for_a_duration(sim):
    d = bench("--url", sim.url + "/v1/completions", "--no-stream", "--rate", "40", "--duration", "1.5",
              "--concurrency", "16", "--prompt-tokens", "uniform:8:32", "--max-tokens", "4")
    assert 30 <= d["requests"] + d["dropped"] <= 100
    assert d["ok"] == d["requests"] and d["output_tokens"] == 4 * d["ok"]
    assert d["rps"] > 10


def test_errors_are_counted_by_class(sim):
    d = bench("--url", sim.url + "/v1/chat/completions", "--rounds", "3", "--concurrency", "1",
              "--max-tokens", "100000")  # over --max-model-len: the engine's 400
    assert d["ok"] == 0 and d["errors"]["other"] == 3 and d["error_rates"]["other"] == 1.0
    out = subprocess.run([console_script("cxygpt-bench"), "--url", sim.url + "/v1/chat/completions", "--rounds", "2",
                          "--quiet"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "TTFT" in out.stdout and "errors   413 0" in out.stdout


def test_ramp_up_starts_the_users_one_after_another(sim):
    url = sim.url + "/v1/chat/completions"
    at_once = bench("--url", url, "--concurrency", "4", "--rounds", "1", "--max-tokens", "2")
    ramped = bench("--url", url, "--concurrency", "4", "--rounds", "1", "--max-tokens", "2", "--ramp-up", "0.6")
    assert ramped["ok"] == at_once["ok"] == 4
    assert at_once["elapsed_s"] < 0.3
    assert ramped["elapsed_s"] >= 0.45  # the 4th user starts 0.45 s in


@pytest.mark.parametrize("args", [["--ramp-up", "-1"], ["--ramp-up", "1", "--rate", "5"],
                                  ["--max-tokens", "uniform:9"]])
def test_settings_that_cannot_work_are_refused_before_any_request(args):
    out = subprocess.run([console_script("cxygpt-bench"), "--url", "http://127.0.0.1:9/v1/chat/completions",
                          "--rounds", "1", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("cxygpt-bench: ") and out.stdout == ""
