"""The Responses API and embeddings of `cxygpt-sim` through the official SDK, direct and through a real gateway."""
import base64
import math
import struct

import httpx
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_gateway_support import API_KEY, start_gateway, start_sim, write_keys

from cxygpt_sim.config import parse_config
from cxygpt_sim.server import create_app

pytestmark = pytest.mark.timeout(90)
QUESTION = "What does the key-value cache hold?"
INSTRUCTIONS = "Answer in one sentence."


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("responses-embeddings")
    sim = start_sim(tmp, ttft_ms=0, itl_ms=1)
    embed = start_sim(tmp, "embed", ttft_ms=0, itl_ms=0, max_model_len=512, extra_args=("--runner", "pooling"))
    limits = {"rate_qps": 1000, "rate_tpm": 10_000_000}
    config = {"keys_file": str(write_keys(tmp)), "models": [
        {"name": "qwen3-14b", "url": sim.url, "profile": "DEV_32G", "limits": limits},
        {"name": "embed", "url": embed.url, "profile": "DEV_32G", "task": "embed", "limits": limits}]}
    gateway = start_gateway(tmp, config)
    yield {"sim": sim, "embed": embed, "gateway": gateway}
    for proc in (gateway, embed, sim):
        proc.stop()


def sdk(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture(params=["direct", "gateway"])
def client(request, stack):
    with sdk(stack["sim"].url) if request.param == "direct" else sdk(stack["gateway"].url, API_KEY) as c:
        yield c


def count(stack, **body) -> int:
    return httpx.post(stack["sim"].url + "/tokenize", json=body, timeout=5).json()["count"]


def test_response_whole_counts_instructions_and_input(client, stack):
    r = client.responses.create(model="qwen3-14b", input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=200)
    assert (r.status, r.incomplete_details, r.instructions) == ("completed", None, INSTRUCTIONS)
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text" and r.output_text
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    assert r.usage.input_tokens == count(stack, messages=messages)
    assert r.usage.output_tokens == count(stack, prompt=r.output_text)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_response_cut_by_max_output_tokens_is_incomplete(client):
    items = [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
    r = client.responses.create(model="qwen3-14b", input=items, max_output_tokens=3)
    assert (r.status, r.incomplete_details.reason, r.usage.output_tokens) == ("incomplete", "max_output_tokens", 3)


def test_response_stream_events_in_order(client):
    events = list(client.responses.create(model="qwen3-14b", input=QUESTION, max_output_tokens=200, stream=True))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                    "response.content_part.added", *["response.output_text.delta"] * deltas,
                                    "response.output_text.done", "response.content_part.done",
                                    "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.status == "completed" and final.output_text == text == events[-4].text
    whole = client.responses.create(model="qwen3-14b", input=QUESTION, max_output_tokens=200)
    assert (whole.output_text, whole.usage.output_tokens) == (text, final.usage.output_tokens)


async def test_instant_decode_streams_every_token_of_a_step():
    """With --itl-ms 0 the whole reply is one engine step: every piece still gets its delta."""
    config, _ = parse_config(["org/m", "--ttft-ms", "0", "--itl-ms", "0"], env={})
    async with TestClient(TestServer(create_app(config))) as client:
        raw = await (await client.post("/v1/responses", json={"input": QUESTION, "stream": True})).read()
    events = [orjson.loads(block.split(b"\ndata: ", 1)[1]) for block in raw.strip().split(b"\n\n")]
    final = events[-1]["response"]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final["output"][0]["content"][0]["text"]
    assert final["usage"]["output_tokens"] >= len(deltas)


def test_each_runner_serves_its_own_routes_only(stack):
    """vLLM registers the routes of the model's tasks: the other runner's are a 404."""
    messages = [{"role": "user", "content": "hi"}]
    with sdk(stack["embed"].url) as c:
        for call in (lambda: c.responses.create(model="embed", input="hi"),
                     lambda: c.chat.completions.create(model="embed", messages=messages),
                     lambda: c.completions.create(model="embed", prompt="hi")):
            with pytest.raises(openai.NotFoundError) as e:
                call()
            assert e.value.response.json()["error"]["message"] == "Not Found"
    with sdk(stack["sim"].url) as c, pytest.raises(openai.NotFoundError) as e:
        c.embeddings.create(model="qwen3-14b", input="hi")
    assert e.value.response.json()["error"]["message"] == "Not Found"


@pytest.fixture(params=["direct", "gateway"])
def embed_client(request, stack):
    with sdk(stack["embed"].url) if request.param == "direct" else sdk(stack["gateway"].url, API_KEY) as c:
        yield c


def norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_embeddings_unit_vectors_deterministic_and_close_for_close_texts(embed_client, stack):
    texts = ["the cat sat on the mat", "yesterday the cat sat on the mat", "quantum chromodynamics on a lattice"]
    r = embed_client.embeddings.create(model="embed", input=texts)  # the SDK asks for base64 and decodes it
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 1024 for v in vectors)
    assert all(abs(norm(v) - 1) < 1e-5 for v in vectors)
    dot = [sum(a * b for a, b in zip(vectors[0], v)) for v in vectors[1:]]
    assert dot[0] > 0.5 > dot[1]
    tokens = sum(count(stack, prompt=t) for t in texts)
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (tokens, tokens)
    again = embed_client.embeddings.create(model="embed", input=texts[0], encoding_format="float")
    assert again.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)


def test_embeddings_of_token_ids_and_matryoshka_dimensions(embed_client, stack):
    ids = httpx.post(stack["embed"].url + "/tokenize", json={"prompt": "the cat sat"}, timeout=5).json()["tokens"]
    by_text = embed_client.embeddings.create(model="embed", input="the cat sat", encoding_format="float")
    by_ids = embed_client.embeddings.create(model="embed", input=[ids, ids[:1]], encoding_format="float")
    assert by_ids.data[0].embedding == by_text.data[0].embedding and by_ids.usage.prompt_tokens == len(ids) + 1
    short = embed_client.embeddings.create(model="embed", input="the cat sat", dimensions=64).data[0].embedding
    assert len(short) == 64 and abs(norm(short) - 1) < 1e-5


def test_embeddings_base64_is_little_endian_float32(stack):
    body = {"model": "embed", "input": "the cat sat", "encoding_format": "base64"}
    packed = httpx.post(stack["embed"].url + "/v1/embeddings", json=body, timeout=5).json()["data"][0]["embedding"]
    floats = httpx.post(stack["embed"].url + "/v1/embeddings", json={**body, "encoding_format": "float"},
                        timeout=5).json()["data"][0]["embedding"]
    assert list(struct.unpack("<1024f", base64.b64decode(packed))) == pytest.approx(floats, abs=1e-7)


def test_embeddings_refusals(stack):
    with sdk(stack["embed"].url) as c:
        with pytest.raises(openai.BadRequestError) as e:
            c.embeddings.create(model="embed", input=[1] * 513)
        assert "maximum context length is 512 tokens" in e.value.response.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError) as e:
            c.embeddings.create(model="embed", input="hi", dimensions=0)
        assert e.value.response.json()["error"]["message"] == "Dimensions must be greater than 0"
