"""The OpenAI features vLLM serves, through the official SDK against a real `cxygpt-sim` (stream and not)."""
import json

import httpx
import jsonschema
import openai
import pytest

from harness import ServerProcess, console_script, free_port

MODEL = "sim-model"
pytestmark = pytest.mark.timeout(60)
MESSAGES = [{"role": "user", "content": "What is continuous batching?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city", "days"], "additionalProperties": False,
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    port = free_port()
    argv = [console_script("cxygpt-sim"), "serve", "org/sim-model", "--served-model-name", MODEL, "--host",
            "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--ttft-ms", "0", "--itl-ms", "1"]
    with ServerProcess(argv, port=port, log_path=tmp_path_factory.mktemp("sim") / "sim.log") as proc:
        yield proc


@pytest.fixture
def client(sim):
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0, timeout=10) as c:
        yield c


def collect(stream):
    """Per choice index: the text, the tool call arguments and name, the finish reason; and the usage."""
    out, usage = {}, None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            got = out.setdefault(c.index, {"text": "", "args": "", "name": None, "finish": None, "logprobs": []})
            delta = getattr(c, "delta", None)
            got["text"] += (delta.content or "") if delta else (c.text or "")
            for call in (delta.tool_calls or []) if delta else []:
                got["name"] = got["name"] or call.function.name
                got["args"] += call.function.arguments or ""
            if c.logprobs:
                got["logprobs"] += c.logprobs.content if delta else c.logprobs.tokens
            got["finish"] = c.finish_reason or got["finish"]
    return out, usage


def test_n_choices_stream_and_not(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=40)
    assert [c.index for c in r.choices] == [0, 1, 2] and len({c.message.content for c in r.choices}) == 3
    assert r.usage.completion_tokens == sum(_count(client, c.message.content) for c in r.choices)
    got, usage = collect(client.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=40,
                                                        stream=True, stream_options={"include_usage": True}))
    assert [got[i]["text"] for i in range(3)] == [c.message.content for c in r.choices]
    assert usage.completion_tokens == r.usage.completion_tokens


def _count(client, content: str) -> int:
    return httpx.post(str(client.base_url).replace("/v1/", "/tokenize"), json={"prompt": content}).json()["count"]


def test_stop_strings(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES).choices[0].message.content
    stop = full.split()[2]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    got, _ = collect(client.completions.create(model=MODEL, prompt="What is continuous batching?", stop=stop,
                                               stream=True))
    assert stop not in got[0]["text"] and got[0]["finish"] == "stop"


def test_logprobs_chat_and_completions(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=5, max_tokens=8)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 5 and t.logprob <= 0 for t in content)
    got, _ = collect(client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2,
                                                    max_tokens=8, stream=True))
    assert [t.token for t in got[0]["logprobs"]] == [t.token for t in content]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=21)
    assert "Requested sample logprobs of 21, which is greater than max allowed: 20" in e.value.message
    c = client.completions.create(model=MODEL, prompt="Say", logprobs=3, max_tokens=6, echo=True)
    assert c.choices[0].text.startswith("Say") and len(c.choices[0].logprobs.tokens) == 6
    got, _ = collect(client.completions.create(model=MODEL, prompt="Say", logprobs=3, max_tokens=6, echo=True,
                                               stream=True))
    assert got[0]["text"] == c.choices[0].text and got[0]["logprobs"] == c.choices[0].logprobs.tokens


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_calls_validate_stream_and_not(client, tool_choice):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice=tool_choice,
                                       max_completion_tokens=200)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id and r.choices[0].message.content is None
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    got, _ = collect(client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER],
                                                    tool_choice=tool_choice, stream=True))
    assert (got[0]["name"], got[0]["args"], got[0]["text"]) == ("get_weather", call.function.arguments, "")


def test_tool_choice_auto_and_none(client):
    answers = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{k}"}],
                                              tools=[WEATHER]).choices[0] for k in range(9)]
    assert {a.finish_reason for a in answers} == {"stop", "tool_calls"}
    assert all(bool(a.message.tool_calls) == (a.finish_reason == "tool_calls") for a in answers)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice="none")
    assert not r.choices[0].message.tool_calls and r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, tool_choice="required")
    assert "When using `tool_choice`, `tools` must be set." in e.value.message


def test_response_formats(client):
    schema = WEATHER["function"]["parameters"]
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=fmt)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    got, _ = collect(client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=fmt,
                                                    stream=True))
    assert got[0]["text"] == r.choices[0].message.content
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_model_by_id(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert "The model `gpt-4` does not exist." in e.value.message
