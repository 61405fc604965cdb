"""The gateway's input limit counts Chinese text through the simulator's real tokenizer (a 413 vLLM would give)."""
import httpx
import openai
import pytest
from test_gateway_support import API_KEY, start_gateway, start_sim, write_keys

LIMIT = 40
# 84 characters: 53 tokens with the chat template in Qwen's vocabulary, about 30 for a words-of-8-characters one
CHINESE = "大型语言模型是一种基于深度学习的人工智能系统，它通过在海量文本数据上进行训练，学会理解和生成自然语言。" \
          "这些模型可以回答问题、翻译文本、撰写文章，甚至编写计算机程序。"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-tokens")
    sim = start_sim(tmp, ttft_ms=0, itl_ms=0)
    config = {"keys_file": str(write_keys(tmp)), "models": [
        {"name": "qwen3-14b", "url": sim.url, "profile": "DEV_32G",
         "limits": {"max_input_tokens": LIMIT, "rate_qps": 1000, "rate_tpm": 10_000_000}}]}
    gateway = start_gateway(tmp, config)
    yield {"gateway": gateway, "sim": sim}
    for proc in (gateway, sim):
        proc.stop()


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack["gateway"].url + "/v1", api_key=API_KEY, max_retries=0, timeout=20)


def engine_count(stack, messages) -> int:
    return httpx.post(stack["sim"].url + "/tokenize", json={"messages": messages}, timeout=5).json()["count"]


def test_chinese_over_the_limit_is_a_413_with_the_engines_count(client, stack):
    messages = [{"role": "user", "content": CHINESE}]
    assert engine_count(stack, messages) > LIMIT
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="qwen3-14b", messages=messages, stream=True)
    assert e.value.status_code == 413
    message = e.value.response.json()["error"]["message"]
    assert f"input is {engine_count(stack, messages)} tokens, over the limit of {LIMIT} tokens" in message


def test_chinese_under_the_limit_passes_and_usage_agrees(client, stack):
    messages = [{"role": "user", "content": CHINESE[:20]}]
    r = client.chat.completions.create(model="qwen3-14b", messages=messages, max_tokens=5)
    assert r.usage.prompt_tokens == engine_count(stack, messages) <= LIMIT
