"""Routing in the gateway app (ASGI) over in-test upstreams: the engines' load read from their /metrics breaks
least-load's ties and goes stale never; a session header keeps a session on one replica; what /v1/limits and
/metrics say."""
from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from asgi_support import gateway_client, upstream_serving

from cxygpt_gateway.settings import GatewaySettings

PAGE = """# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {usage}
"""


class Engine:
    """An upstream that says how loaded it is and records what it served."""

    def __init__(self, waiting: int, usage: float):
        self.waiting, self.usage, self.answering, self.served = waiting, usage, True, []

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.answering:
            return web.Response(status=500)
        return web.Response(text=PAGE.format(waiting=self.waiting, usage=self.usage))

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
        return {("GET", "/metrics"): self.metrics, ("POST", "/v1/chat/completions"): self.chat,
                ("GET", "/health"): self.health}


@contextlib.asynccontextmanager
async def fleet(*engines: Engine, **settings):
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(upstream_serving(e.routes())) for e in engines]
        config = GatewaySettings(models=[{"name": "m", "urls": urls, "profile": "DEV_32G",
                                          "limits": {"rate_qps": 1000}}], **settings)
        client, gw = await stack.enter_async_context(gateway_client(config))
        yield client, gw, urls


async def until(predicate, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def chat(content="hello"):
    return {"model": "m", "messages": [{"role": "user", "content": content}]}


async def test_the_engines_load_breaks_least_loads_ties_and_a_silent_engine_reads_as_unknown():
    busy, idle = Engine(waiting=7, usage=0.9), Engine(waiting=0, usage=0.1)
    async with fleet(busy, idle, engine_metrics_interval_s=0.05, routing={"policy": "least-load"}) as (client, gw, urls):
        backends = gw.registry.get("m").queue.backends
        await until(lambda: (backends[urls[0]].waiting, backends[urls[1]].kv_usage) == (7, 0.1))
        assert backends[urls[0]].kv_usage == 0.9
        for _ in range(3):  # nothing in flight anywhere: the engine with nobody waiting wins every time
            assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200
        assert (len(busy.served), len(idle.served)) == (0, 3)
        busy.answering = False  # its last value must not stay
        await until(lambda: (backends[urls[0]].waiting, backends[urls[0]].kv_usage) == (0, 0.0))


async def test_a_session_header_keeps_a_session_on_one_replica_and_limits_and_metrics_say_so():
    engines = [Engine(0, 0.0) for _ in range(3)]
    async with fleet(*engines, engine_metrics_interval_s=0) as (client, gw, _):
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
