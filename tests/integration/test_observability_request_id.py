"""One request id from the client to the engine: X-Request-Id → the gateway's request_id (log line and response
header) → the upstream request's X-Request-Id → the engine's response id (chatcmpl-<id>, as vLLM does)."""
from __future__ import annotations

import json

import httpx
import pytest
from test_gateway_support import start_gateway, start_sim, wait_until

CHAT = {"model": "qwen3-14b", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("request-id")
    sim = start_sim(tmp)
    gateway = start_gateway(tmp, {"models": [{"name": "qwen3-14b", "url": sim.url, "profile": "DEV_32G"}]})
    yield gateway
    gateway.stop()
    sim.stop()


def request_lines(gateway) -> dict[str, dict]:
    lines = (json.loads(line) for line in gateway.log_path.read_text().splitlines() if line.startswith("{"))
    return {line["request_id"]: line for line in lines if line.get("msg") == "request"}


@pytest.mark.parametrize("stream", [False, True])
def test_the_callers_request_id_reaches_the_engine(stack, stream):
    request_id = f"trace-{'stream' if stream else 'whole'}-7f3a"
    r = httpx.post(stack.url + "/v1/chat/completions", json={**CHAT, "stream": stream},
                   headers={"X-Request-Id": request_id}, timeout=20)
    assert r.status_code == 200 and r.headers["x-request-id"] == request_id
    first = json.loads(r.text.split("data: ", 2)[1].split("\n")[0]) if stream else r.json()
    assert first["id"] == f"chatcmpl-{request_id}"  # the engine saw the same id
    line = wait_until(lambda: request_lines(stack).get(request_id), timeout=5, what="request log line")
    assert line["status"] == 200 and line["model"] == "qwen3-14b" and line["stream"] is stream


def test_a_request_without_an_id_gets_one_and_the_engine_sees_it(stack):
    r = httpx.post(stack.url + "/v1/chat/completions", json=CHAT, timeout=20)
    request_id = r.headers["x-request-id"]
    assert r.status_code == 200 and len(request_id) == 16 and r.json()["id"] == f"chatcmpl-{request_id}"
    wait_until(lambda: request_id in request_lines(stack), timeout=5, what="request log line")


def test_a_rejected_request_keeps_its_id(stack):
    r = httpx.post(stack.url + "/v1/chat/completions", json={**CHAT, "model": "nope"},
                   headers={"X-Request-Id": "trace-404"}, timeout=20)
    assert r.status_code == 404 and r.headers["x-request-id"] == "trace-404"
    line = wait_until(lambda: request_lines(stack).get("trace-404"), timeout=5, what="request log line")
    assert line["status"] == 404 and line["reason"] == "unknown_model"
