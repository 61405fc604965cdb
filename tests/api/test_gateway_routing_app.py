"""Routing in the gateway app (ASGI) over in-test upstreams: a session header keeps a session on one replica; what
/v1/limits and /metrics say."""
from __future__ import annotations

import contextlib

from aiohttp import web
from asgi_support import gateway_client, upstream_serving

from cxygpt_gateway.settings import GatewaySettings


class Engine:
    """An upstream that records what it served."""

    def __init__(self):
        self.served = []

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.served.append(body)
        return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    def routes(self):
        return {("POST", "/v1/chat/completions"): self.chat, ("GET", "/health"): self.health}


@contextlib.asynccontextmanager
async def fleet(*engines: Engine, **settings):
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(upstream_serving(e.routes())) for e in engines]
        config = GatewaySettings(models=[{"name": "m", "urls": urls, "profile": "DEV_32G",
                                          "limits": {"rate_qps": 1000}}], **settings)
        client, gw = await stack.enter_async_context(gateway_client(config))
        yield client, gw, urls


def chat(content="hello"):
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


async def test_a_session_header_keeps_a_session_on_one_replica_and_limits_and_metrics_say_so():
    engines = [Engine() for _ in range(3)]
    async with fleet(*engines) as (client, gw, _):
        limits = (await client.get("/v1/limits")).json()
        assert limits["models"]["m"]["routing"] == {"policy": "prefix", "epsilon": 0.25}
        for session in ("alice", "bob", "carol", "dave"):
            for n in range(4):  # different messages each time: the header is the key
                r = await client.post("/v1/chat/completions", json=chat(f"{session} asks {n}"),
                                      headers={"x-session-id": session})
                assert r.status_code == 200
            assert sorted(len([b for b in e.served if b["messages"][0]["content"].startswith(session)])
                          for e in engines) == [0, 0, 4], session
        text = (await client.get("/metrics")).text
        assert 'cxygpt_gateway_routed_total{choice="affinity",model="m",policy="prefix"} 16.0' in text
