"""Degradation enters under a real overload of a slow simulator, shows everywhere, and leaves after it."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from test_gateway_support import metric, start_gateway, start_sim, wait_until

SHORT = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "describe the sea " * 40}]  # ~160 tokens: over half of 200


def test_degradation_under_overload_then_recovery(tmp_path):
    slow = start_sim(tmp_path, "busy", ttft_ms=150, itl_ms=2, max_num_seqs=1)
    fast = start_sim(tmp_path, "qwen3-14b", ttft_ms=10, itl_ms=1)
    config = {
        "auto_degrade": True, "degrade_window_s": 2,
        "models": [
            {"name": "busy", "url": slow.url, "profile": "DEV_32G", "fallback": "small",
             "limits": {"max_input_tokens": 200, "rate_qps": 1000,
                        "degrade": {"p95_ttft_ms": 300, "queue_depth": 100, "hold_s": 0.5, "recover_s": 1}}},
            {"name": "small", "url": fast.url, "upstream_model": "qwen3-14b", "profile": "DEV_32G",
             "limits": {"rate_qps": 1000}},
        ]}
    gateway = start_gateway(tmp_path, config)
    url = gateway.url
    stop = threading.Event()

    def load():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                with c.stream("POST", url + "/v1/chat/completions", json={
                        "model": "busy", "messages": SHORT, "max_tokens": 10, "stream": True}) as r:
                    r.read()

    def limits(model="busy"):
        return httpx.get(url + "/v1/limits", params={"model": model}).json()

    try:
        assert limits()["degraded"] is False
        with ThreadPoolExecutor(6) as pool:
            for _ in range(6):  # six streams on an engine that runs one at a time: TTFT climbs past 300 ms
                pool.submit(load)
            try:
                state = wait_until(lambda: (s := limits())["degraded"] and s, timeout=20, what="degraded")
                assert "p95 TTFT" in state["models"]["busy"]["degraded_reason"]
                assert metric(url, "cxygpt_gateway_degraded", model="busy") == 1
                r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
                    "model": "busy", "messages": SHORT, "max_tokens": 256})
                assert r.headers["x-cxygpt-degraded"] == "1" and r.headers["x-cxygpt-max-tokens"] == "128"
                # a long input goes to the fallback model while degraded
                r = httpx.post(url + "/v1/chat/completions", timeout=30, json={"model": "busy", "messages": LONG})
                assert r.status_code == 200, r.text
                assert (r.headers["x-cxygpt-model"], r.headers["x-cxygpt-fallback-from"]) == ("small", "busy")
            finally:
                stop.set()
        wait_until(lambda: limits()["degraded"] is False, timeout=15, what="recovered")
        assert metric(url, "cxygpt_gateway_degraded", model="busy") == 0
        r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "busy", "messages": SHORT, "max_tokens": 256})
        assert r.headers["x-cxygpt-degraded"] == "0" and r.headers["x-cxygpt-max-tokens"] == "256"
        log = gateway.log_path.read_text()
        assert '"msg":"model busy degraded' in log and '"msg":"model busy recovered' in log
    finally:
        stop.set()
        for proc in (gateway, slow, fast):
            proc.stop()


def test_degradation_when_admission_sheds_the_overload(tmp_path):
    """An overload the queue refuses keeps admitted TTFT and the queue low; the share shed still degrades."""
    sim = start_sim(tmp_path, "busy", ttft_ms=40, itl_ms=5, max_num_seqs=1)
    config = {
        "auto_degrade": True, "degrade_window_s": 2,
        "models": [{"name": "busy", "url": sim.url, "profile": "DEV_32G",
                    "limits": {"rate_qps": 10000, "rate_tpm": 100_000_000, "queue_size": 0, "max_concurrency": 1,
                               "degrade": {"p95_ttft_ms": 60000, "queue_depth": 100, "shed_share": 0.25,
                                           "hold_s": 0.5, "recover_s": 1}}}]}
    gateway = start_gateway(tmp_path, config)
    url = gateway.url
    stop = threading.Event()
    answers: list[int] = []

    def load():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(url + "/v1/chat/completions", json={"model": "busy", "messages": SHORT, "max_tokens": 8})
                answers.append(r.status_code)
                stop.wait(0.02)

    def limits():
        return httpx.get(url + "/v1/limits", params={"model": "busy"}).json()

    try:
        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):  # four callers, one slot, no queue: most are refused with queue_full
                pool.submit(load)
            try:
                state = wait_until(lambda: (s := limits())["degraded"] and s, timeout=20, what="degraded")
                assert "of arrivals shed for capacity > 25%" in state["models"]["busy"]["degraded_reason"]
            finally:
                stop.set()
        assert set(answers) <= {200, 503} and answers.count(503) > answers.count(200) > 0
        wait_until(lambda: limits()["degraded"] is False, timeout=15, what="recovered")
        assert metric(url, "cxygpt_gateway_degrade_transitions_total", model="busy") == 1
        assert metric(url, "cxygpt_gateway_degraded", model="busy") == 0
    finally:
        stop.set()
        for proc in (gateway, sim):
            proc.stop()
