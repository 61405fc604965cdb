"""Attacks on the gateway as a client could make them, against real processes on 127.0.0.1 (bounded in count and
time): each bound holds with a clear error, and a probe from someone else is answered meanwhile."""
from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import sys
import textwrap
import threading
import time

import httpx
import openai
import pytest
from test_gateway_support import metric, start_gateway, start_sim

from harness import ServerProcess, free_port, wait_until

# an upstream whose /tokenize is slow and counts how many calls it holds at once
COUNTING_UPSTREAM = textwrap.dedent('''
    import asyncio, sys
    from aiohttp import web
    state = {"open": 0, "most": 0, "calls": 0}
    async def tokenize(request):
        body = await request.json()
        state["open"] += 1; state["calls"] += 1
        state["most"] = max(state["most"], state["open"])
        try:
            await asyncio.sleep(0.05)
        finally:
            state["open"] -= 1
        return web.json_response({"count": len(body.get("prompt") or "") // 4, "max_model_len": 4096})
    async def completions(request):
        return web.json_response({"id": "c", "object": "text_completion", "model": "m", "choices": [
            {"index": 0, "text": "ok", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    async def stats(request):
        return web.json_response(state)
    async def health(request):
        return web.Response(text="ok")
    app = web.Application(client_max_size=1 << 24)
    app.add_routes([web.post("/tokenize", tokenize), web.post("/v1/completions", completions),
                    web.get("/stats", stats), web.get("/health", health)])
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
''')


def open_fds(server: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def rss_mib(server: ServerProcess) -> float:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def probe(url: str, model: str = "m") -> float:
    """Seconds a small request by someone else takes (it must be answered, and soon)."""
    started = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 200, r.text
    return time.monotonic() - started


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("counting")
    script = tmp / "upstream.py"
    script.write_text(COUNTING_UPSTREAM)
    port = free_port()
    upstream = ServerProcess([sys.executable, str(script), str(port)], port=port, log_path=tmp / "upstream.log").start()
    gw = start_gateway(tmp, {"max_body_bytes": 4 << 20, "tokenize_concurrency": 4, "tokenize": "auto",
                             "models": [{"name": "m", "url": upstream.url, "profile": "DEV_32G",
                                         "limits": {"rate_qps": 1000, "rate_tpm": None}}]})
    yield gw, upstream
    gw.stop()
    upstream.stop()


def test_a_batch_of_prompts_is_bounded_and_counted_a_few_calls_at_a_time(counting):
    gw, upstream = counting
    started = time.monotonic()
    r = httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": ["x"] * 25_000}, timeout=10)
    assert r.status_code == 400 and time.monotonic() - started < 3
    error = r.json()["error"]
    assert error["code"] == "batch_too_large" and "25000 prompts" in error["message"] and "64" in error["message"]
    assert httpx.get(upstream.url + "/stats").json()["calls"] == 0  # refused before a single /tokenize

    # 64 prompts that each might be over the limit (4000 bytes + the template margin > 3840 tokens), three such
    # requests at once: every prompt is counted, never more than 4 calls at a time, and others are served meanwhile
    fds = open_fds(gw)
    prompts = ["word " * 800] * 64
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        batches = [pool.submit(httpx.post, gw.url + "/v1/completions",
                               json={"model": "m", "prompt": prompts, "max_tokens": 1}, timeout=30) for _ in range(3)]
        time.sleep(0.2)
        assert probe(gw.url) < 2
        assert open_fds(gw) < fds + 20
        assert [b.result().status_code for b in batches] == [200, 200, 200]
    stats = httpx.get(upstream.url + "/stats").json()
    assert stats["calls"] == 3 * 64 and stats["most"] <= 4, stats
    assert metric(gw.url, "cxygpt_gateway_tokenize_calls_total", model="m") == 3 * 64
    # prompts that cannot be over the limit are not counted at all
    r = httpx.post(gw.url + "/v1/completions", json={"model": "m", "prompt": ["short"] * 64}, timeout=10)
    assert r.status_code == 200 and httpx.get(upstream.url + "/stats").json()["calls"] == 3 * 64


def test_an_unknown_model_is_quoted_short_in_the_answer_and_the_log(counting):
    gw, _ = counting
    before = gw.log_path.stat().st_size
    name = "q" * 1_000_000
    for _ in range(5):
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=10,
                       json={"model": name, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and len(r.content) < 1000
        assert "1000000 characters" in r.json()["error"]["message"]
    time.sleep(0.2)  # request lines are flushed every 50 ms
    assert gw.log_path.stat().st_size - before < 5 * 2000
    assert probe(gw.url) < 2


def test_json_nested_past_the_encoders_depth_is_a_400_not_a_500(counting):
    gw, _ = counting
    deep = "[" * 300 + "]" * 300
    body = ('{"model": "m", "prompt": "hi", "logit_bias": {"x": ' + deep + "}}").encode()
    for path in ("/v1/completions", "/v1/completions?via=asgi"):
        r = httpx.post(gw.url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_request" and "255" in r.json()["error"]["message"]


# -- connections ---------------------------------------------------------------------------------------------------

def dial(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def answer(sock: socket.socket, limit: float = 10) -> bytes:
    """What the server sends until it closes (or `limit` seconds pass)."""
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


CHAT = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2}).encode()


def request(path: str = "/v1/completions", body: bytes = CHAT, method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("timed")
    sim = start_sim(tmp, "m", itl_ms=0)
    gw = start_gateway(tmp, {"header_timeout_s": 1, "body_timeout_s": 1, "keepalive_timeout_s": 1,
                             "models": [{"name": "m", "url": sim.url, "profile": "DEV_32G",
                                         "limits": {"rate_qps": 1000}}]})
    yield gw
    gw.stop()
    sim.stop()


def test_idle_slow_and_trickling_connections_end_in_408_and_their_descriptors_come_back(timed):
    gw = timed
    baseline, memory = open_fds(gw), rss_mib(gw)
    idle = [dial(gw.port) for _ in range(60)]
    slowloris = [dial(gw.port) for _ in range(60)]
    trickling = [dial(gw.port) for _ in range(30)]
    for sock in trickling:  # whole headers, a body that never ends
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n{")
    stop = threading.Event()

    def trickle():  # a byte of headers every 0.3 s, forever
        while not stop.is_set():
            for sock in slowloris:
                try:
                    sock.sendall(b"X")
                except OSError:
                    pass
            stop.wait(0.3)
    for sock in slowloris:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nX-Slow: ")
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        assert probe(gw.url) < 1  # while 150 hold connections open
        started = time.monotonic()
        answers = [answer(s, 6) for s in idle + slowloris + trickling]
        assert time.monotonic() - started < 8
    finally:
        stop.set()
        thread.join()
    for data in answers[:120]:
        assert data.startswith(b"HTTP/1.1 408") and b"request line and headers did not arrive within 1 s" in data
    for data in answers[120:]:
        assert data.startswith(b"HTTP/1.1 408") and b"request body did not arrive within 1 s" in data
    for sock in idle + slowloris + trickling:
        sock.close()
    wait_until(lambda: open_fds(gw) <= baseline + 2, timeout=5, what="the descriptors back")
    assert rss_mib(gw) < memory + 20  # nothing kept of 150 slow connections
    assert metric(gw.url, "cxygpt_gateway_connections_refused_total", reason="header_timeout") >= 120
    assert metric(gw.url, "cxygpt_gateway_rejections_total", reason="body_timeout") >= 30
    # a kept-alive connection left idle is closed after keepalive_timeout_s
    sock = dial(gw.port)
    sock.sendall(request())
    assert answer(sock, 4).startswith(b"HTTP/1.1 200")  # and then closed: answer() returned before its limit


def test_a_head_over_the_limit_is_431(timed):
    sock = dial(timed.port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    data = answer(sock)
    assert data.startswith(b"HTTP/1.1 431") and b"65536 bytes" in data
    assert probe(timed.url) < 1


def test_a_connection_flood_is_capped_with_room_for_health_checks(tmp_path):
    sim = start_sim(tmp_path, "m", itl_ms=0)
    gw = start_gateway(tmp_path, {"max_connections": 60, "max_connections_per_client": 40, "health_connections": 10,
                                  "header_timeout_s": 60,
                                  "models": [{"name": "m", "url": sim.url, "profile": "DEV_32G",
                                              "limits": {"rate_qps": 1000}}]})
    held: list[socket.socket] = []
    try:
        baseline, memory = open_fds(gw), rss_mib(gw)
        held += [dial(gw.port, "127.0.0.2") for _ in range(40)]
        wait_until(lambda: metric(gw.url, "cxygpt_gateway_connections") >= 41, what="40 connections held")
        # one client past its share: its requests are refused, its health checks are not; others are served
        over = dial(gw.port, "127.0.0.2")
        held.append(over)
        over.sendall(request())
        refusal = answer(over)
        assert refusal.startswith(b"HTTP/1.1 503") and b"connection_limit" in refusal and b"retry-after: 1" in refusal
        check = dial(gw.port, "127.0.0.2")
        check.sendall(request("/healthz", b"", "GET"))
        assert answer(check, 2).startswith(b"HTTP/1.1 200")
        check.close()
        assert probe(gw.url) < 1  # from 127.0.0.1
        # the whole gateway past its connections: health checks still answered, requests refused
        held += [dial(gw.port, "127.0.0.3") for _ in range(22)]
        wait_until(lambda: metric(gw.url, "cxygpt_gateway_connections") >= 62, what="62 connections held")
        late = dial(gw.port, "127.0.0.4")
        late.sendall(request())
        assert answer(late).startswith(b"HTTP/1.1 503")
        late.close()
        health = dial(gw.port, "127.0.0.4")
        health.sendall(request("/readyz", b"", "GET"))
        assert answer(health, 2).startswith(b"HTTP/1.1 200")
        health.close()
        # past the health checks' room too: closed before a byte is read, no descriptor kept
        held += [dial(gw.port, "127.0.0.5") for _ in range(10)]
        dropped = dial(gw.port, "127.0.0.6")
        assert answer(dropped, 3) == b""
        assert open_fds(gw) <= baseline + 60 + 10 + 5 and rss_mib(gw) < memory + 20
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: probe(gw.url) < 1, timeout=5, what="served again once the flood is gone")
    assert metric(gw.url, "cxygpt_gateway_connections_refused_total", reason="connection_limit") >= 3
    assert "Invalid HTTP request" not in gw.log()  # a refusal writes no log line
    gw.stop()
    sim.stop()


# -- what one request may spend ------------------------------------------------------------------------------------

def test_n_is_bounded_and_tokens_are_reserved_so_concurrent_requests_cannot_pass_the_budget(tmp_path):
    sim = start_sim(tmp_path, "m", itl_ms=20)
    gw = start_gateway(tmp_path, {"models": [{"name": "m", "url": sim.url, "profile": "DEV_32G",
                                              "limits": {"rate_qps": 1000, "rate_tpm": 1000}}]})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="m", prompt="hi", n=10_000, max_tokens=4)
        assert "'n' is 10000, over this model's limit of 8" in e.value.message
        # each request may use ~3 + 200 tokens: four of them fit in 1000, the rest are refused at once
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: _try(client), range(10)))
        served = [r for r in results if r != 429]
        assert len(served) == 4 and results.count(429) == 6, results
        assert sum(served) <= 1000
    finally:
        gw.stop()
        sim.stop()


def _try(client) -> int:
    """Tokens a request used, or 429."""
    try:
        r = client.completions.create(model="m", prompt="hi", max_tokens=200,
                                      extra_body={"ignore_eos": True})
        return r.usage.total_tokens
    except openai.RateLimitError:
        return 429


def test_a_fallback_request_is_charged_to_the_fallback_models_limits(tmp_path):
    sim = start_sim(tmp_path, "b", itl_ms=0)
    gw = start_gateway(tmp_path, {"health_interval_s": 60, "models": [
        {"name": "a", "url": f"http://127.0.0.1:{free_port()}", "profile": "DEV_32G", "fallback": "b",
         "limits": {"rate_qps": 1000}},
        {"name": "b", "url": sim.url, "profile": "DEV_32G", "limits": {"rate_qps": 0.5}}]})  # 5 per 10 s
    try:
        codes = [httpx.post(gw.url + "/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2},
                            timeout=10) for _ in range(20)]
        served = [r for r in codes if r.status_code == 200]
        refused = [r for r in codes if r.status_code == 429]
        assert 1 <= len(served) <= 5 and len(served) + len(refused) == 20
        assert all(r.headers["x-cxygpt-fallback-from"] == "a" for r in served)
        assert "model b" in refused[0].json()["error"]["message"]
    finally:
        gw.stop()
        sim.stop()
