"""The Responses API, embeddings, one model's metadata and unknown paths through the gateway (ASGI, in-process)
over a small in-test upstream: the same admission (counted input, output cap, limits) as completions."""
from __future__ import annotations

import json

import pytest
from aiohttp import web
from asgi_support import gateway_client, upstream_serving

from cxygpt_gateway.settings import GatewaySettings


def _words(text) -> int:
    return len(str(text or "").split())


class Upstream:
    """Answers like vLLM's Responses and embeddings endpoints; counts one token per word."""

    def __init__(self):
        self.bodies: list[tuple[str, dict]] = []

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(("responses", body))
        usage = {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}
        done = {"id": "resp_1", "object": "response", "status": "completed", "usage": usage,
                "output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": "hi there"}]}]}
        if not body.get("stream"):
            return web.json_response(done)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for kind, data in (("response.created", {"response": {**done, "status": "in_progress", "usage": None}}),
                           ("response.output_text.delta", {"delta": "hi"}),
                           ("response.output_text.delta", {"delta": " there"}),
                           ("response.completed", {"response": done})):
            await resp.write(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode())
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(("embeddings", body))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return web.json_response({"object": "list", "model": body["model"],
                                  "data": [{"object": "embedding", "index": i, "embedding": [0.6, 0.8]}
                                           for i, _ in enumerate(inputs)],
                                  "usage": {"prompt_tokens": sum(_words(t) for t in inputs),
                                            "total_tokens": sum(_words(t) for t in inputs)}})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await request.json()
        count = (sum(_words(m.get("content")) for m in body["messages"]) if "messages" in body
                 else _words(body.get("prompt")))
        return web.json_response({"count": count, "max_model_len": 4096, "tokens": []})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")


@pytest.fixture
async def gateway():
    upstream = Upstream()
    routes = {("POST", "/v1/responses"): upstream.responses, ("POST", "/v1/embeddings"): upstream.embeddings,
              ("POST", "/tokenize"): upstream.tokenize, ("GET", "/health"): upstream.health}
    async with upstream_serving(routes) as url:
        settings = GatewaySettings(tokenize_skip_margin=0, models=[
            {"name": "m", "url": url, "profile": "DEV_32G", "limits": {"max_input_tokens": 20}},
            {"name": "embedder", "url": url, "profile": "DEV_32G", "task": "embed",
             "limits": {"max_input_tokens": 20}}])
        async with gateway_client(settings) as (client, gw):
            yield client, upstream, gw


def metric(gw, name: str, model: str, **labels) -> float:
    return gw.metrics.registry.get_sample_value(name, {"model": model, **labels}) or 0.0


async def test_a_response_gets_the_output_cap_and_its_usage_is_counted(gateway):
    client, upstream, gw = gateway
    r = await client.post("/v1/responses", json={"model": "m", "input": "say hi", "max_output_tokens": 5000})
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text
    kind, sent = upstream.bodies[-1]
    assert kind == "responses" and sent["max_output_tokens"] == 256 and "max_tokens" not in sent
    assert "stream_options" not in sent
    assert r.headers["x-cxygpt-max-tokens"] == "256"
    assert metric(gw, "cxygpt_gateway_prompt_tokens_total", "m") == 3
    assert metric(gw, "cxygpt_gateway_completion_tokens_total", "m") == 2


async def test_a_streamed_response_is_relayed_whole_and_ends_with_response_completed(gateway):
    client, upstream, gw = gateway
    async with client.stream("POST", "/v1/responses", json={"model": "m", "input": "say hi", "stream": True}) as r:
        text = (await r.aread()).decode()
    assert r.status_code == 200
    kinds = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert kinds == ["response.created", "response.output_text.delta", "response.output_text.delta",
                     "response.completed"]
    assert "[DONE]" not in text and "error" not in text  # its own end, not an 'ended early' error
    assert metric(gw, "cxygpt_gateway_completion_tokens_total", "m") == 2
    assert metric(gw, "cxygpt_gateway_requests_total", "m", code="200") == 1


async def test_a_response_input_over_the_limit_is_413_counting_instructions_and_items(gateway):
    client, _, _ = gateway
    body = {"model": "m", "instructions": "be brief " * 5,  # 10 tokens, as the system message
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "word " * 11}]}]}
    r = await client.post("/v1/responses", json=body)
    assert r.status_code == 413 and r.json()["error"]["param"] == "input"
    assert r.json()["error"]["message"] == "input is 21 tokens, over the limit of 20 tokens for model m"
    assert (await client.post("/v1/responses", json={**body, "instructions": "brief"})).status_code == 200
    r = await client.post("/v1/responses", json={"model": "m", "input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


async def test_embeddings_go_to_embedding_models_only_with_their_input_counted(gateway):
    client, upstream, gw = gateway
    r = await client.post("/v1/embeddings", json={"model": "embedder", "input": ["one two", "three"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 2
    kind, sent = upstream.bodies[-1]
    assert kind == "embeddings" and sent == {"model": "embedder", "input": ["one two", "three"]}  # nothing added
    assert metric(gw, "cxygpt_gateway_prompt_tokens_total", "embedder") == 3
    r = await client.post("/v1/embeddings", json={"model": "embedder", "input": "word " * 25})
    assert r.status_code == 413 and r.json()["error"]["param"] == "input"
    r = await client.post("/v1/embeddings", json={"model": "m", "input": "hi"})
    assert r.status_code == 400 and "does not serve embeddings" in r.json()["error"]["message"]
    r = await client.post("/v1/chat/completions", json={"model": "embedder", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert r.status_code == 400 and "embeddings only" in r.json()["error"]["message"]
    r = await client.post("/v1/embeddings", json={"model": "embedder", "input": {"not": "text"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


async def test_one_model_is_listed_as_in_the_list_and_an_unknown_one_is_404(gateway):
    client, _, _ = gateway
    listed = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
    r = await client.get("/v1/models/m")
    assert r.status_code == 200 and r.json() == listed["m"]
    r = await client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_an_unknown_path_is_an_openai_404_naming_what_is_served(gateway):
    client, _, _ = gateway
    r = await client.post("/v1/nope", json={})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["message"].startswith("Invalid URL (POST /v1/nope)") and error["type"] == "not_found_error"
    for served in ("POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings", "GET /v1/models"):
        assert served in error["message"]
