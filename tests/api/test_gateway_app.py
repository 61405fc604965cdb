"""The gateway app in-process (ASGI) over a tiny in-test upstream: what admission sends and refuses."""
from __future__ import annotations

import asyncio
import hashlib

import pytest
import yaml
from aiohttp import web
from asgi_support import gateway_client, upstream_serving

from cxygpt_gateway.settings import GatewaySettings

KEY = "sk-small-tier"


class FakeUpstream:
    """Records what the gateway sends; counts one token per word; can be told to hold requests."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.arrived.set()
        await self.release.wait()
        return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        return web.json_response({"count": words, "max_model_len": 4096, "tokens": []})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")


@pytest.fixture
async def gateway(tmp_path):
    upstream = FakeUpstream()
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({
        "allow_anonymous": True, "tiers": {"small": {"max_output_tokens": 50}},
        "keys": [{"id": "small-one", "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(), "tier": "small"}]}))
    routes = {("POST", "/v1/chat/completions"): upstream.chat, ("POST", "/tokenize"): upstream.tokenize,
              ("GET", "/health"): upstream.health}
    async with upstream_serving(routes) as url:
        settings = GatewaySettings(
            keys_file=str(keys), auto_degrade=True, degraded_temperature_max=0.5, tokenize_skip_margin=0,
            models=[{"name": "m", "url": url, "profile": "DEV_32G",
                     "limits": {"max_input_tokens": 100, "max_concurrency": 1, "queue_size": 1,
                                "timeouts": {"queue_s": 0.2},
                                "degrade": {"p95_ttft_ms": 100, "hold_s": 0, "recover_s": 60}}},
                    {"name": "with-fallback", "url": url, "profile": "DEV_32G", "fallback": "big",
                     "limits": {"max_input_tokens": 100}},
                    {"name": "big", "url": url, "profile": "SRV_80G"}])
        async with gateway_client(settings) as (client, gw):
            yield client, upstream, gw


def chat(content="hello there", **extra) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


async def test_the_tier_output_cap_and_the_model_name_reach_the_upstream(gateway):
    client, upstream, _ = gateway
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=200), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["x-cxygpt-max-tokens"] == "50"
    assert upstream.bodies[-1]["max_tokens"] == 50 and upstream.bodies[-1]["model"] == "m"
    r = await client.post("/v1/chat/completions", json=chat())  # anonymous allowed: the model's cap
    assert upstream.bodies[-1]["max_tokens"] == 256


async def test_degraded_caps_output_and_temperature_and_refuses_long_inputs(gateway):
    client, upstream, gw = gateway
    route = gw.registry.get("m")
    route.degrade.observe_ttft(5.0)  # p95 TTFT 5 s against a 100 ms threshold, hold 0 s
    r = await client.post("/v1/chat/completions", json=chat(temperature=0.9, max_tokens=1000))
    assert r.headers["x-cxygpt-degraded"] == "1"
    assert (upstream.bodies[-1]["max_tokens"], upstream.bodies[-1]["temperature"]) == (128, 0.5)
    r = await client.post("/v1/chat/completions", json=chat(temperature=0))
    assert upstream.bodies[-1]["temperature"] == 0  # caps never raise a value
    r = await client.post("/v1/chat/completions", json=chat("word " * 60))  # over half of 100, no fallback
    assert r.status_code == 503 and r.json()["error"]["code"] == "degraded_input_too_long"
    assert "inputs over 50 tokens" in r.json()["error"]["message"] and "Retry-After" in r.headers
    limits = (await client.get("/v1/limits")).json()
    assert limits["degraded"] is True and limits["models"]["m"]["output_cap_now"] == 128


async def test_waiting_past_the_queue_timeout_is_a_503(gateway):
    client, upstream, gw = gateway
    upstream.release.clear()
    first = asyncio.create_task(client.post("/v1/chat/completions", json=chat()))
    async with asyncio.timeout(5):
        await upstream.arrived.wait()  # the upstream holds the one slot now
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout" and "Retry-After" in r.headers
    upstream.release.set()
    assert (await first).status_code == 200
    assert gw.registry.get("m").queue.in_flight == 0


async def test_over_long_input_is_413_naming_both_numbers_or_goes_to_the_fallback(gateway):
    client, upstream, _ = gateway
    r = await client.post("/v1/chat/completions", json=chat("word " * 150))
    assert r.status_code == 413
    assert r.json()["error"]["message"] == "input is 150 tokens, over the limit of 100 tokens for model m"
    r = await client.post("/v1/chat/completions", json={**chat("word " * 150), "model": "with-fallback"})
    assert r.status_code == 200
    assert (r.headers["x-cxygpt-model"], r.headers["x-cxygpt-fallback-from"]) == ("big", "with-fallback")
    assert upstream.bodies[-1]["model"] == "big"
