"""Routing in the gateway app (ASGI) over in-test upstreams: the engines' load read from their /metrics breaks
least-load's ties and goes stale never, and what others hold there fills the replica's slots; a session header
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


async def test_what_others_hold_at_an_engine_fills_its_slots_and_a_place_they_free_serves_those_waiting():
    a, b = Engine(others=2), Engine()  # another gateway keeps a's two slots busy
    b.held.clear()
    async with fleet(a, b, engine_metrics_interval_s=0.05, health_interval_s=600, routing={"policy": "least-load"},
                     limits={"max_concurrency": 2, "queue_size": 8}) as (client, gw, urls):
        queue = gw.registry.get("m").queue
        try:
            await until(lambda: queue.backends[urls[0]].others == 2)
            first = [asyncio.create_task(client.post("/v1/chat/completions", json=chat())) for _ in range(2)]
            await until(lambda: b.running == 2)  # both to b, whose engine holds nothing else
            third = asyncio.create_task(client.post("/v1/chat/completions", json=chat()))
            await until(lambda: queue.waiting == 1)
            await asyncio.sleep(0.3)  # six reads: this gateway's own two at b are not taken for somebody else's
            assert (queue.backends[urls[1]].others, queue.waiting, len(a.served)) == (0, 1, 0)
            a.others = 0  # the other gateway's requests end: the next read hands a's place to the one waiting
            assert (await asyncio.wait_for(third, 1)).status_code == 200
            assert (len(a.served), len(b.served)) == (1, 2)
        finally:
            b.held.set()
        assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]


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
