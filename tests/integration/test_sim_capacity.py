"""Load-faithful timing on a real `cxygpt-sim` process: slots, the waiting queue, queueing TTFT, disconnects."""
import json
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import ServerProcess, console_script, free_port, wait_until

MODEL = "sim-model"
MAX_NUM_SEQS = 4
TTFT_S, ITL_S, TOKENS = 0.1, 0.02, 25
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    port = free_port()
    argv = [console_script("cxygpt-sim"), "serve", "org/sim-model", "--served-model-name", MODEL, "--host",
            "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--max-num-seqs", str(MAX_NUM_SEQS),
            "--ttft-ms", str(TTFT_S * 1000), "--itl-ms", str(ITL_S * 1000), "--sim-itl-batch-slope", "0",
            "--sim-prefill-ms-per-1k", "0"]
    with ServerProcess(argv, port=port, log_path=tmp_path_factory.mktemp("sim") / "sim.log") as proc:
        yield proc


def engine_state(sim) -> dict:
    """Gauges and counters from /metrics, by sample name (+ finished_reason for request_success)."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(sim.url + "/metrics", timeout=5).text):
        for s in family.samples:
            out[s.name + (f"[{s.labels['finished_reason']}]" if "finished_reason" in s.labels else "")] = s.value
    return out


def streamed_ttft(sim, results: list, index: int, barrier: threading.Barrier):
    """Client-side time to the first token of a streamed completion, stored once the stream ends in [DONE]."""
    body = {"model": MODEL, "prompt": f"request {index}", "max_tokens": TOKENS, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as client:  # built before the barrier: its setup is not the engine's time
        barrier.wait(timeout=10)
        start, ttft = time.monotonic(), None
        with client.stream("POST", sim.url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and ttft is None:
                    ttft = time.monotonic() - start
                if line == "data: [DONE]":
                    results[index] = ttft


def test_twelve_requests_on_four_slots_queue_in_waves(sim):
    results = [None] * 12
    barrier = threading.Barrier(12)
    threads = [threading.Thread(target=streamed_ttft, args=(sim, results, i, barrier)) for i in range(12)]
    for t in threads:
        t.start()
    wait_until(lambda: (s := engine_state(sim))["vllm:num_requests_running"] == 4
               and s["vllm:num_requests_waiting"] == 8, timeout=5, interval=0.02, what="4 running / 8 waiting")
    for t in threads:
        t.join(timeout=30)
    assert all(r is not None for r in results), results
    ttfts = sorted(results)
    # each slot serves three requests in turn; one request holds it for TTFT + (TOKENS - 1) x ITL. Admitting
    # a request into a running batch also stalls that step's decodes by its prefill (vLLM's prefill-decode
    # interference), hence the loose upper bound.
    service = TTFT_S + (TOKENS - 1) * ITL_S
    predicted_last_wave = 2 * service + TTFT_S
    assert ttfts[0] < 0.5
    assert 0.9 * predicted_last_wave <= min(ttfts[8:]) and max(ttfts[8:]) <= 1.6 * predicted_last_wave + 0.3, ttfts
    state = engine_state(sim)
    assert state["vllm:time_to_first_token_seconds_count"] >= 12
    assert state["vllm:num_requests_running"] == state["vllm:num_requests_waiting"] == 0


def open_raw(sim, *, stream: bool) -> socket.socket:
    """A request on a bare socket, so the test can drop the connection like a vanished client."""
    body = json.dumps({"model": MODEL, "prompt": "hold the line", "max_tokens": 2000, "ignore_eos": True,
                       "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", sim.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def test_a_client_disconnect_frees_its_slot(sim):
    running = [open_raw(sim, stream=True) for _ in range(MAX_NUM_SEQS)]
    queued = open_raw(sim, stream=False)
    try:
        wait_until(lambda: (s := engine_state(sim))["vllm:num_requests_running"] == MAX_NUM_SEQS
                   and s["vllm:num_requests_waiting"] == 1, timeout=5, what="slots full and one waiting")
        aborted_before = engine_state(sim)["vllm:request_success_total[abort]"]
        queued.close()
        wait_until(lambda: engine_state(sim)["vllm:num_requests_waiting"] == 0, timeout=5, what="waiting drops")
        running.pop().close()
        wait_until(lambda: engine_state(sim)["vllm:num_requests_running"] == MAX_NUM_SEQS - 1, timeout=5,
                   what="running drops")
        assert engine_state(sim)["vllm:request_success_total[abort]"] == aborted_before + 2
    finally:
        for sock in [*running, queued]:
            sock.close()
    wait_until(lambda: (s := engine_state(sim))["vllm:num_requests_running"] == 0
               and s["vllm:kv_cache_usage_perc"] == 0, timeout=5, what="all slots and KV blocks free")
    assert httpx.get(sim.url + "/health", timeout=5).status_code == 200


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(sim):
    system = {"role": "system", "content": "You answer questions about the cluster. " * 20}
    before = engine_state(sim)
    for question in ("How many GPUs?", "Which node?"):
        r = httpx.post(sim.url + "/v1/chat/completions", timeout=10, json={
            "model": MODEL, "max_tokens": 2, "messages": [system, {"role": "user", "content": question}]})
        assert r.status_code == 200
    after = engine_state(sim)
    prompt = r.json()["usage"]["prompt_tokens"]
    queried = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    # the second request finds the system prompt's full blocks of 16 tokens; the first finds nothing
    assert queried > prompt and prompt // 2 < hits < prompt and hits % 16 == 0
    assert after["vllm:iteration_tokens_total_count"] > before["vllm:iteration_tokens_total_count"]


def test_sigterm_aborts_in_flight_requests_by_default(tmp_path):
    port = free_port()
    argv = [console_script("cxygpt-sim"), MODEL, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096",
            "--itl-ms", "50"]
    proc = ServerProcess(argv, port=port, log_path=tmp_path / "sim.log").start()
    try:
        sock = open_raw(proc, stream=True)
        wait_until(lambda: engine_state(proc)["vllm:num_requests_running"] == 1, timeout=5, what="a running stream")
        started = time.monotonic()
        proc.stop()
        assert proc.proc.returncode is not None and time.monotonic() - started < 5, proc.log()
        sock.close()
    finally:
        proc.kill()
