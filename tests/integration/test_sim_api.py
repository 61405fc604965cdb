"""A real `cxygpt-sim` process (instant speed) against the official OpenAI SDK and raw HTTP."""
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import ServerProcess, console_script, free_port

MODEL = "sim-model"
MAX_MODEL_LEN = 2048
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    port = free_port()
    argv = [console_script("cxygpt-sim"), "serve", "org/sim-model", "--served-model-name", MODEL, "--host",
            "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8",
            "--ttft-ms", "0", "--itl-ms", "0", "--swap-space", "16", "--enable-chunked-prefill"]
    with ServerProcess(argv, port=port, log_path=tmp_path_factory.mktemp("sim") / "sim.log") as proc:
        yield proc


@pytest.fixture
def client(sim):
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0, timeout=10) as c:
        yield c


def count(sim, **body) -> int:
    return httpx.post(sim.url + "/tokenize", json={"model": MODEL, **body}, timeout=5).json()["count"]


MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is continuous batching?"}]


def test_chat_usage_matches_tokenize(sim, client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant" and choice.message.content
    assert r.usage.prompt_tokens == count(sim, messages=MESSAGES)
    assert r.usage.completion_tokens == count(sim, prompt=choice.message.content)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == MODEL


def test_chat_stream_with_usage(sim, client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert finishes == ["length"]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 6 == count(sim, prompt=content)
    assert usage_chunk.usage.prompt_tokens == count(sim, messages=MESSAGES)
    assert chunks[0].choices[0].delta.role == "assistant"


def test_same_request_same_text(client):
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES).choices[0].message.content
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES).choices[0].message.content == first


def test_completions_stream_and_not(sim, client):
    prompt = "Once upon a time in a cluster far away"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 5
    assert whole.usage.prompt_tokens == count(sim, prompt=prompt)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []


def test_ignore_eos_streams_exactly_max_tokens_in_instant_mode(client):
    chunks = list(client.completions.create(model=MODEL, prompt="go", max_tokens=300, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert len(chunks) == 300 and chunks[-1].choices[0].finish_reason == "length"


def test_models_report_max_model_len(sim, client):
    (card,) = httpx.get(sim.url + "/v1/models", timeout=5).json()["data"]
    assert (card["id"], card["max_model_len"], card["root"], card["owned_by"]) == \
        (MODEL, MAX_MODEL_LEN, "org/sim-model", "vllm")
    assert [m.id for m in client.models.list()] == [MODEL]


def test_tokenize_shape(sim):
    body = httpx.post(sim.url + "/tokenize", json={"model": MODEL, "prompt": "hello world"}, timeout=5).json()
    assert body["count"] == 2 == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN


CHINESE = "大型语言模型是一种基于深度学习的人工智能系统，它通过在海量文本数据上进行训练，学会理解和生成自然语言。"


def test_tokenize_detokenize_and_usage_agree_on_chinese(sim, client):
    body = httpx.post(sim.url + "/tokenize", json={"model": MODEL, "prompt": CHINESE}, timeout=5).json()
    assert body["count"] == len(body["tokens"]) and len(CHINESE) / body["count"] < 2.2  # Qwen's ~1.5 chars a token
    back = httpx.post(sim.url + "/detokenize", json={"model": MODEL, "tokens": body["tokens"]}, timeout=5).json()
    assert back == {"prompt": CHINESE}
    r = client.completions.create(model=MODEL, prompt=CHINESE, max_tokens=4)
    assert r.usage.prompt_tokens == body["count"]
    r = client.completions.create(model=MODEL, prompt=body["tokens"], max_tokens=4)
    assert r.usage.prompt_tokens == body["count"]


def test_token_ids_outside_the_vocabulary_are_a_400(sim, client):
    r = httpx.post(sim.url + "/detokenize", json={"model": MODEL, "tokens": [9707, 10**6]}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["message"] == "Token id 1000000 is out of vocabulary"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[9707, 10**6], max_tokens=4)
    assert "out of vocabulary" in e.value.message


def test_over_long_prompt_is_a_400_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word" + " word" * 999, max_tokens=1500)
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in e.value.message
    assert "1000 in the messages, 1500 in the completion" in e.value.message


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert "gpt-4" in e.value.message


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"messages": 5, "prompt": 5}', b"\xff\xfe"])
def test_garbage_is_a_400_and_the_server_stays_up(sim, path, body):
    r = httpx.post(sim.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=5)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == 400 and error["message"] and "type" in error and "param" in error
    assert httpx.get(sim.url + "/health", timeout=5).status_code == 200


def test_metrics_carry_vllm_names(sim, client):
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3)
    text = httpx.get(sim.url + "/metrics", timeout=5).text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
            "vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
            "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds", "vllm:prompt_tokens",
            "vllm:generation_tokens", "vllm:request_success"} <= names
    assert f'vllm:generation_tokens_total{{engine="0",model_name="{MODEL}"}}' in text


def test_unknown_vllm_flags_give_one_warning_line_and_the_budget_is_logged(sim):
    log = sim.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "--swap-space 16 --enable-chunked-prefill" in warnings[0]
    assert "KV budget" in log


def test_help_lists_the_sim_knobs():
    import subprocess
    out = subprocess.run([console_script("cxygpt-sim"), "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "--ttft-ms" in out and "CXYGPT_SIM_ITL_MS" in out and "--max-num-seqs" in out
