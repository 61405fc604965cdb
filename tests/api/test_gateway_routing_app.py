"""Routing in the gateway app (ASGI) over in-test upstreams: the engines' load read from their /metrics breaks
least-load's ties and goes stale never, and what others hold there fills the replica's slots beyond this gateway's share; a session header
keeps a session on one replica; what /v1/limits and /metrics say."""
from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from asgi_support import gateway_client, upstream_serving

from cxygpt_gateway.settings import GatewaySettings

PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} {running}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {usage}
"""


class Engine:
    """An upstream that says how loaded it is (its requests running: those it is answering, and `others` more)
    and records what it served; while `held` is clear its answers wait."""

    def __init__(self, waiting: int = 0, usage: float = 0.0, others: int = 0):
        self.waiting, self.usage, self.others, self.answering, self.served = waiting, usage, others, True, []
        self.running, self.held = 0, asyncio.Event()
        self.held.set()

    async def metrics(self, request: web.Request) -> web.Response:
        if not self.answering:
            return web.Response(status=500)
        return web.Response(text=PAGE.format(running=self.running + self.others, waiting=self.waiting,
                                             usage=self.usage))

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.served.append(body)
        self.running += 1
        try:
            await self.held.wait()
        finally:
            self.running -= 1
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
async def fleet(*engines: Engine, limits: dict | None = None, **settings):
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(upstream_serving(e.routes())) for e in engines]
        config = GatewaySettings(models=[{"name": "m", "urls": urls, "profile": "DEV_32G",
                                          "limits": {"rate_qps": 1000, **(limits or {})}}], **settings)
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


async def test_a_gateway_uses_its_share_of_an_engine_others_fill_and_a_place_they_free_serves_those_waiting():
    engine = Engine(others=4)  # another gateway fills all 4 of the engine's slots
    engine.held.clear()
    async with fleet(engine, engine_metrics_interval_s=0.05, health_interval_s=600, gateway_replicas=2,
                     limits={"max_concurrency": 4, "queue_size": 8}) as (client, gw, urls):
        queue, backend = gw.registry.get("m").queue, gw.registry.get("m").queue.backends[urls[0]]
        try:
            await until(lambda: backend.others == 4)
            sent = [asyncio.create_task(client.post("/v1/chat/completions", json=chat())) for _ in range(3)]
            await until(lambda: engine.running == 2 and queue.waiting == 1)  # its share, ⌈4 / 2⌉; one waits
            await asyncio.sleep(0.3)  # six reads: this gateway's own two are not taken for somebody else's
            assert (backend.others, engine.running, queue.waiting) == (4, 2, 1)
            engine.others = 1  # three of the other gateway's requests end: the next read hands a place on
            await until(lambda: engine.running == 3, timeout=1)
            assert queue.waiting == 0
        finally:
            engine.held.set()
        assert [r.status_code for r in await asyncio.gather(*sent)] == [200] * 3


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
