"""The simulator's aiohttp app in-process: API key, route errors, and /health when the engine loop dies."""
import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cxygpt_sim.config import parse_config
from cxygpt_sim.server import ENGINE, create_app

pytestmark = pytest.mark.timeout(30)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def client_for(*args: str) -> TestClient:
    config, _ = parse_config(["org/m", "--max-model-len", "1024", "--ttft-ms", "0", "--itl-ms", "0", *args], env={})
    client = TestClient(TestServer(create_app(config)))
    await client.start_server()
    return client


async def test_api_key_guards_v1_routes_like_vllm():
    client = await client_for("--api-key", "sekret")
    try:
        denied = await client.post("/v1/chat/completions", json=CHAT)
        assert (denied.status, await denied.json()) == (401, {"error": "Unauthorized"})
        allowed = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sekret"})
        assert allowed.status == 200 and (await allowed.json())["usage"]["completion_tokens"] == 3
        assert (await client.get("/health")).status == 200
    finally:
        await client.close()


async def test_unknown_routes_and_methods_answer_in_the_error_shape():
    client = await client_for()
    try:
        missing = await client.get("/v1/nothing")
        assert missing.status == 404 and (await missing.json())["error"]["code"] == 404
        wrong = await client.get("/v1/chat/completions")
        assert wrong.status == 405 and (await wrong.json())["error"]["code"] == 405
    finally:
        await client.close()


async def test_health_fails_when_the_engine_loop_dies():
    client = await client_for()
    engine = client.server.app[ENGINE]

    def broken(now):
        raise RuntimeError("simulated bug")
    engine.scheduler.end_step = broken
    stuck = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}))
    try:
        deadline = time.monotonic() + 5
        while (await client.get("/health")).status == 200:
            assert time.monotonic() < deadline, "/health still 200 after the engine loop died"
            await asyncio.sleep(0.01)
    finally:
        stuck.cancel()
        await client.close()


async def test_x_request_id_becomes_the_response_id_like_vllm():
    client = await client_for()
    try:
        r = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "abc123"})
        assert (await r.json())["id"] == "chatcmpl-abc123"
        r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True},
                              headers={"X-Request-Id": "s1"})
        assert b'"id":"cmpl-s1"' in await r.read()
    finally:
        await client.close()
