"""Scale from zero in the gateway app (ASGI): requests for an autoscaled model at zero wait in its queue, wake it
once, and are served by its first replica; the others are refused as before."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import httpx
import pytest
from aiohttp import web
from asgi_support import upstream_serving

from cxygpt_gateway.app import create_app
from cxygpt_gateway.discovery.base import ModelSpec, ScaleTarget, Unavailable
from cxygpt_gateway.settings import GatewaySettings
from cxygpt_profiles import default_table

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ASLEEP = Unavailable("model m is scaled to zero for want of requests; a request starts it", retry_after_s=30)


class ZeroDiscovery:
    """One autoscaled model at zero replicas (or, with scale=False, one that is not autoscaled); `wake` is
    recorded, and `ready(url)` is the first replica's endpoint turning ready."""

    def __init__(self, scale: bool = True):
        limits = default_table().get("DEV_32G").limits.model_copy(update={"queue_size": 3})
        self.spec = ModelSpec(name="m", urls=(), limits=limits, mode="multi", profile="DEV_32G",
                              unavailable=ASLEEP, scale_from_zero=ScaleTarget("llm", "m", 0) if scale else None)
        self.wakes: list[ScaleTarget] = []
        self.sink = None

    async def start(self, sink):
        self.sink = sink
        sink.upsert(self.spec)

    async def stop(self):
        pass

    async def wake(self, target):
        self.wakes.append(target)
        self.spec = dataclasses.replace(self.spec, scale_from_zero=dataclasses.replace(target, replicas=1))
        self.sink.upsert(self.spec)
        return "woken"

    def ready(self, url):
        self.spec = dataclasses.replace(self.spec, urls=(url,), unavailable=None)
        self.sink.upsert(self.spec)

    def fail(self, why):
        self.spec = dataclasses.replace(self.spec, scale_from_zero=None, unavailable=Unavailable(why, 60))
        self.sink.upsert(self.spec)


async def _chat(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                           "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})


@contextlib.asynccontextmanager
async def gateway(discovery, **settings):
    app = create_app(GatewaySettings(kubernetes=False, demand_window_s=1, **settings), discovery=discovery)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=10) as client:
            yield client, app.state.gateway


async def until(predicate, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.fixture
async def engine():
    async with upstream_serving({("POST", "/v1/chat/completions"): _chat}) as url:
        yield url


async def test_requests_at_zero_wait_wake_the_model_once_and_are_served_by_its_first_replica(engine):
    discovery = ZeroDiscovery()
    async with gateway(discovery) as (client, gw):
        listed = (await client.get("/v1/models")).json()["data"]
        assert [(m["id"], m["state"]) for m in listed] == [("m", "scaled_to_zero")]
        assert (await client.get("/v1/models/m")).json()["state"] == "scaled_to_zero"
        limits = (await client.get("/v1/limits")).json()["models"]["m"]
        assert limits["state"] == "scaled_to_zero" and limits["scale_from_zero"] and not limits["routable"]

        calls = [asyncio.create_task(client.post("/v1/chat/completions", json=CHAT)) for _ in range(2)]
        await until(lambda: gw.registry.get("m").queue.waiting == 2)
        assert [w.name for w in discovery.wakes] == ["m"]              # one wake for both
        assert (await client.get("/v1/models")).json()["data"][0]["state"] == "starting"
        await until(lambda: gw.registry.get("m").demand.value() >= 1)   # waiting is demand
        metrics = (await client.get("/metrics")).text
        assert 'cxygpt_gateway_scale_from_zero_wakes_total{model="m",result="woken"} 1.0' in metrics
        assert 'cxygpt_gateway_demand{model="m"}' in metrics
        discovery.ready(engine)
        answers = await asyncio.wait_for(asyncio.gather(*calls), 5)
        assert [a.status_code for a in answers] == [200, 200]
        assert (await client.get("/v1/models")).json()["data"][0]["state"] == "ready"


async def test_a_client_that_leaves_leaves_the_queue_and_the_cold_start_timeout_answers_503(engine):
    async with gateway(ZeroDiscovery(), cold_start_timeout_s=0.5) as (client, gw):
        leaving = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await until(lambda: gw.registry.get("m").queue.waiting == 1)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        await until(lambda: gw.registry.get("m").queue.waiting == 0)
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "cold_start_timeout"
        assert "0.5 s" in r.json()["error"]["message"] and r.headers["retry-after"] == "30"


async def test_a_held_request_hears_at_once_when_the_model_fails_to_start():
    discovery = ZeroDiscovery()
    async with gateway(discovery) as (client, gw):
        call = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await until(lambda: gw.registry.get("m").queue.waiting == 1)
        discovery.fail("model m cannot serve: pod m-1: engine exited with code 1")
        r = await asyncio.wait_for(call, 2)
        assert r.status_code == 503 and "engine exited" in r.json()["error"]["message"]


async def test_a_model_at_zero_without_autoscaling_is_refused_at_once_as_before():
    discovery = ZeroDiscovery(scale=False)
    async with gateway(discovery) as (client, gw):
        assert (await client.get("/v1/models")).json()["data"] == []
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.headers["retry-after"] == "30" and "scaled to zero" in r.json()["error"]["message"]
        assert discovery.wakes == [] and gw.registry.get("m").queue.waiting == 0


class Fleet:
    """Several models, each as given; `wake` recorded."""

    def __init__(self, *specs: ModelSpec):
        self.specs = {s.name: s for s in specs}
        self.wakes: list[ScaleTarget] = []
        self.sink = None

    async def start(self, sink):
        self.sink = sink
        for spec in self.specs.values():
            sink.upsert(spec)

    async def stop(self):
        pass

    async def wake(self, target):
        self.wakes.append(target)
        return "woken"

    def update(self, name, **changes):
        self.specs[name] = dataclasses.replace(self.specs[name], **changes)
        self.sink.upsert(self.specs[name])


def asleep(name: str, **limits) -> ModelSpec:
    base = default_table().get("DEV_32G").limits
    return ModelSpec(name=name, urls=(), limits=base.model_copy(update={"queue_size": 3, **limits}), mode="multi",
                     profile="DEV_32G", unavailable=ASLEEP, scale_from_zero=ScaleTarget("llm", name, 0))


async def test_requests_refused_by_rate_limits_or_length_wake_no_gpu_and_are_no_demand(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text("allow_anonymous: true\ntiers: {slow: {rate_qps: 0.1}}\nkeys: [{id: slow-key, tier: slow, key_sha256: "
                    "'" + __import__("hashlib").sha256(b"sk-slow").hexdigest() + "'}]\n")
    fleet = Fleet(asleep("m"), asleep("n"), asleep("o"))
    auth = {"Authorization": "Bearer sk-slow"}
    async with gateway(fleet, keys_file=str(keys)) as (client, gw):
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=auth))
        await until(lambda: gw.registry.get("m").queue.waiting == 1)
        assert [w.name for w in fleet.wakes] == ["m"]
        for name in ("n", "o"):  # the key's one request per 10 s is spent: refused, and nothing woken for it
            r = await client.post("/v1/chat/completions", json={**CHAT, "model": name}, headers=auth)
            assert r.status_code == 429
        # too long for the model (counted by the estimate: no replica to ask): refused, nothing woken
        long = {**CHAT, "model": "o", "messages": [{"role": "user", "content": "word " * 20_000}]}
        for _ in range(4):
            r = await client.post("/v1/chat/completions", json=long)
            assert r.status_code == 413
        assert [w.name for w in fleet.wakes] == ["m"]
        await asyncio.sleep(1.1)  # a demand sample or more (demand_window_s=1)
        assert gw.registry.get("n").demand.value() == 0 and gw.registry.get("o").demand.value() == 0
        metrics = (await client.get("/metrics")).text
        assert 'cxygpt_gateway_scale_from_zero_wakes_total{model="o"' not in metrics
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest.fixture
async def healthy_engine():
    async with upstream_serving({("POST", "/v1/chat/completions"): _chat, ("GET", "/health"): _health}) as url:
        yield url


async def test_a_fallback_to_another_namespace_only_when_its_owner_accepts_it(healthy_engine):
    engine = healthy_engine
    down = ModelSpec(name="a", urls=(), limits=default_table().get("DEV_32G").limits, mode="multi",
                     profile="DEV_32G", unavailable=Unavailable("model a is restarting", 5), fallback="b",
                     namespace="team-a")
    other = ModelSpec(name="b", urls=(engine,), limits=default_table().get("DEV_32G").limits, mode="multi",
                      profile="DEV_32G", namespace="team-b")
    fleet = Fleet(down, other)
    async with gateway(fleet) as (client, gw):
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "a"})
        assert r.status_code == 503 and "restarting" in r.json()["error"]["message"]
        fleet.update("b", accept_fallback_from=("team-a",))
        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "a"})
        assert r.status_code == 200 and r.headers["x-cxygpt-fallback-from"] == "a"
        fleet.update("b", accept_fallback_from=("*",))
        assert (await client.post("/v1/chat/completions", json={**CHAT, "model": "a"})).status_code == 200


async def test_unknown_model_names_are_charged_to_the_callers_own_request_rate(tmp_path):
    """A flood of names nobody serves is a flood still: each 404 counts against the key's rate, then 429s."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("allow_anonymous: true\ntiers: {slow: {rate_qps: 0.1}}\nkeys: [{id: slow-key, tier: slow, "
                    "key_sha256: '" + __import__("hashlib").sha256(b"sk-slow").hexdigest() + "'}]\n")
    async with gateway(Fleet(asleep("m")), keys_file=str(keys)) as (client, gw):
        auth = {"Authorization": "Bearer sk-slow"}
        first = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope" * 1000}, headers=auth)
        assert first.status_code == 404 and "4000 characters" in first.json()["error"]["message"]
        second = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth)
        assert second.status_code == 429 and "key slow-key" in second.json()["error"]["message"]
