"""The official openai SDK against cxygpt-gateway in front of real cxygpt-sim processes."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from test_gateway_support import (
    API_KEY,
    OTHER_KEY,
    metric,
    promtool_check,
    start_gateway,
    start_sim,
    wait_until,
    write_keys,
)

MESSAGES = [{"role": "user", "content": "Say hello"}]
LONG = [{"role": "user", "content": "tell me a long story about a lighthouse keeper " * 20}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    fast = start_sim(tmp, ttft_ms=20, itl_ms=2)
    slow = start_sim(tmp, "slow", ttft_ms=20, itl_ms=50)
    sluggish = start_sim(tmp, "sluggish", ttft_ms=5000, itl_ms=5)
    config = {
        "keys_file": str(write_keys(tmp)),
        "models": [
            {"name": "qwen3-14b", "url": fast.url, "profile": "DEV_32G",
             "limits": {"max_input_tokens": 64, "rate_qps": 1000, "rate_tpm": 10_000_000}},
            {"name": "rate-limited", "url": fast.url, "upstream_model": "qwen3-14b", "profile": "DEV_32G",
             "limits": {"rate_qps": 0.2}},
            {"name": "slow", "url": slow.url, "profile": "DEV_32G",
             "limits": {"max_concurrency": 1, "queue_size": 0, "rate_qps": 1000}},
            {"name": "queued", "url": slow.url, "upstream_model": "slow", "profile": "DEV_32G",
             "limits": {"max_concurrency": 1, "queue_size": 1, "rate_qps": 1000}},
            {"name": "sluggish", "url": sluggish.url, "profile": "DEV_32G",
             "limits": {"rate_qps": 1000, "timeouts": {"ttft_s": 0.3}}},
            {"name": "deadline", "url": slow.url, "upstream_model": "slow", "profile": "DEV_32G",
             "limits": {"rate_qps": 1000, "timeouts": {"total_s": 0.6}}},
        ],
    }
    gateway = start_gateway(tmp, config)
    yield {"gateway": gateway, "fast": fast, "slow": slow, "sluggish": sluggish}
    for proc in (gateway, fast, slow, sluggish):
        proc.stop()


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack["gateway"].url + "/v1", api_key=API_KEY, max_retries=0, timeout=20)


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "code", "param"}
    return body["error"]


def test_chat_non_stream_counts_usage_and_clamps_max_tokens(client, stack):
    raw = client.chat.completions.with_raw_response.create(model="qwen3-14b", messages=MESSAGES, max_tokens=100_000)
    completion = raw.parse()
    assert raw.headers["x-cxygpt-max-tokens"] == "256"  # DEV_32G's output cap, never silently above
    assert completion.choices[0].message.content
    assert 0 < completion.usage.completion_tokens <= 256
    assert raw.headers["x-request-id"]
    assert metric(stack["gateway"].url, "cxygpt_gateway_completion_tokens_total", model="qwen3-14b") >= \
        completion.usage.completion_tokens


def test_chat_stream_relays_chunks_and_strips_the_usage_chunk_nobody_asked_for(client, stack):
    before = metric(stack["gateway"].url, "cxygpt_gateway_completion_tokens_total", model="qwen3-14b")
    chunks = list(client.chat.completions.create(model="qwen3-14b", messages=MESSAGES, max_tokens=8, stream=True))
    assert all(c.choices for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    # usage was still asked for upstream, so the tokens were counted exactly
    assert metric(stack["gateway"].url, "cxygpt_gateway_completion_tokens_total", model="qwen3-14b") == before + 8

    chunks = list(client.chat.completions.create(model="qwen3-14b", messages=MESSAGES, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_completions_stream_and_non_stream(client):
    done = client.completions.create(model="qwen3-14b", prompt="Once upon a time", max_tokens=5)
    assert done.choices[0].text and done.usage.completion_tokens == 5
    chunks = list(client.completions.create(model="qwen3-14b", prompt="Once upon a time", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_401_without_or_with_a_wrong_key(stack):
    for key in ("sk-wrong", ""):
        bad = openai.OpenAI(base_url=stack["gateway"].url + "/v1", api_key=key or "x", max_retries=0)
        if not key:
            bad = bad.with_options(default_headers={"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="qwen3-14b", messages=MESSAGES)
        assert e.value.status_code == 401 and error_of(e.value)["code"] == "invalid_api_key"


def test_404_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nope", messages=MESSAGES)
    err = error_of(e.value)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_400_bad_body(stack):
    r = httpx.post(stack["gateway"].url + "/v1/chat/completions", content=b'{"model": "qwen3-14b"',
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(stack["gateway"].url + "/v1/chat/completions", content=b"x" * (1 << 21),
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "body_too_large"


def test_413_names_counted_and_allowed_tokens(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="qwen3-14b", messages=LONG)
    assert e.value.status_code == 413
    err = error_of(e.value)
    assert err["code"] == "context_length_exceeded"
    counted = int(err["message"].split("input is ")[1].split(" tokens")[0])
    assert counted > 64 and "limit of 64 tokens" in err["message"]


def test_429_with_retry_after_from_the_limiter(client):
    for _ in range(2):  # 0.2/s = 2 per 10 s
        client.chat.completions.create(model="rate-limited", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="rate-limited", messages=MESSAGES, max_tokens=2)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 10 and e.value.response.headers["x-request-id"]
    assert error_of(e.value)["code"] == "rate_limit_exceeded"


def test_503_queue_full_at_once_and_cancel_frees_the_upstream_slot(client, stack):
    gateway, slow = stack["gateway"].url, stack["slow"].url
    stream = client.chat.completions.create(model="slow", messages=MESSAGES, max_tokens=256, stream=True)
    it = iter(stream)
    next(it), next(it)  # the one slot is busy now (256 tokens × 50 ms would take 13 s)
    assert metric(slow, "vllm:num_requests_running") == 1
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="slow", messages=MESSAGES, max_tokens=2)
    assert e.value.status_code == 503 and time.monotonic() - started < 1
    assert int(e.value.response.headers["retry-after"]) >= 1 and error_of(e.value)["code"] == "queue_full"
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: metric(slow, "vllm:num_requests_running") == 0, timeout=3, what="upstream request aborted")
    wait_until(lambda: metric(gateway, "cxygpt_gateway_in_flight", model="slow") == 0, timeout=3,
               what="gateway slot freed")
    assert metric(gateway, "cxygpt_gateway_client_disconnects_total", model="slow") >= 1
    client.chat.completions.create(model="slow", messages=MESSAGES, max_tokens=2)  # the slot is usable again


def test_a_client_that_leaves_the_queue_frees_its_place_at_once(client, stack):
    gateway = stack["gateway"].url
    # ignore_eos: a natural reply may end within a second, and free the slot the next request must wait for
    stream = client.chat.completions.create(model="queued", messages=MESSAGES, max_tokens=256, stream=True,
                                            extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)  # the one slot is busy for ~13 s
    with pytest.raises(httpx.ReadTimeout):  # waits in line, then gives up
        httpx.post(gateway + "/v1/chat/completions", timeout=0.5, headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": "queued", "messages": MESSAGES, "max_tokens": 2})
    wait_until(lambda: metric(gateway, "cxygpt_gateway_queue_depth", model="queued") == 0, timeout=3,
               what="the queue place given up")
    # counted when the request's answer is settled, a moment after its place was given up
    wait_until(lambda: metric(gateway, "cxygpt_gateway_rejections_total", model="queued",
                              reason="client_gone_while_queued") == 1, timeout=3, what="the rejection counted")
    stream.close()


def test_504_before_the_stream_starts_and_an_error_event_after(client, stack):
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:  # no first token within ttft_s 0.3
        client.chat.completions.create(model="sluggish", messages=MESSAGES, max_tokens=5, stream=True)
    assert e.value.status_code == 504 and time.monotonic() - started < 3
    assert error_of(e.value)["code"] == "upstream_timeout"
    # whole answer not within total_s 0.6 (100 × 50 ms: ignore_eos, or the natural reply may be short enough)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="deadline", messages=MESSAGES, max_tokens=100,
                                       extra_body={"ignore_eos": True})
    assert e.value.status_code == 504
    stream = client.chat.completions.create(model="deadline", messages=MESSAGES, max_tokens=100, stream=True,
                                            extra_body={"ignore_eos": True})
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk)
    assert got and "did not finish within 0.6 s" in e.value.message
    wait_until(lambda: metric(stack["sluggish"].url, "vllm:num_requests_running") +
               metric(stack["sluggish"].url, "vllm:num_requests_waiting") == 0, timeout=3,
               what="timed-out request aborted upstream")


def test_models_limits_health_docs_and_metrics(stack):
    url = stack["gateway"].url
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    models = httpx.get(url + "/v1/models", headers=headers).json()
    assert sorted(m["id"] for m in models["data"]) == ["deadline", "queued", "qwen3-14b", "rate-limited", "slow",
                                                          "sluggish"]
    limits = httpx.get(url + "/v1/limits", headers=headers).json()
    assert {"max_input_tokens", "max_output_tokens", "rate_qps", "rate_tpm", "queue_size", "single_user",
            "profile", "degraded", "key", "models"} <= set(limits)
    assert (limits["max_input_tokens"], limits["profile"], limits["single_user"]) == (64, "DEV_32G", False)
    assert limits["key"] == {"id": "team-bronze", "tier": "bronze", "rate_qps": 100.0, "rate_tpm": None,
                             "priority": 10, "max_output_tokens": None}
    assert limits["models"]["slow"]["max_concurrency"] == 1
    assert httpx.get(url + "/v1/limits").status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/readyz").json()["ready"] is True
    assert httpx.get(url + "/docs").status_code == 200
    text = httpx.get(url + "/metrics").text
    for name in ("cxygpt_gateway_requests_total", "cxygpt_gateway_ttft_seconds_bucket",
                 "cxygpt_gateway_request_duration_seconds_bucket", "cxygpt_gateway_queue_depth",
                 "cxygpt_gateway_in_flight", "cxygpt_gateway_prompt_tokens_total",
                 "cxygpt_gateway_rejections_total", "cxygpt_gateway_degraded"):
        assert name in text, name
    promtool_check(text)


def test_one_json_log_line_per_request_without_the_key(client, stack):
    raw = client.chat.completions.with_raw_response.create(model="qwen3-14b", messages=MESSAGES, max_tokens=2)
    request_id = raw.headers["x-request-id"]

    def line_of_this_request():  # request lines are written in batches, within ~50 ms
        log = stack["gateway"].log_path.read_text()
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        served = [line for line in lines if line.get("msg") == "request" and line.get("request_id") == request_id]
        return (log, served) if served else None

    log, served = wait_until(line_of_this_request, timeout=5, what="the request's log line")
    assert API_KEY not in log and OTHER_KEY not in log
    assert len(served) == 1 and {"request_id", "key_id", "model", "status", "queue_time", "upstream_time", "ttft",
                                 "prompt_tokens", "completion_tokens", "degraded"} <= set(served[0])
    assert served[0]["key_id"] == "team-gold" and served[0]["status"] == 200


def test_upstream_killed_mid_stream_gives_an_error_event_and_the_gateway_keeps_serving(tmp_path, stack):
    victim = start_sim(tmp_path, "victim", ttft_ms=20, itl_ms=50)
    gateway = start_gateway(tmp_path, {"models": [
        {"name": "victim", "url": victim.url, "profile": "DEV_32G"},
        {"name": "qwen3-14b", "url": stack["fast"].url, "profile": "DEV_32G"}]})
    try:
        c = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=20)
        stream = c.chat.completions.create(model="victim", messages=MESSAGES, max_tokens=200, stream=True)
        it = iter(stream)
        next(it), next(it)
        victim.kill()
        with pytest.raises(openai.APIError) as e:
            for _ in it:
                pass
        assert "victim" in str(e.value.message)
        assert c.chat.completions.create(model="qwen3-14b", messages=MESSAGES, max_tokens=2).choices
        assert httpx.get(gateway.url + "/healthz").status_code == 200
        # the dead replica leaves rotation: an honest 503 (or 502 before the health check sees it)
        with pytest.raises(openai.APIStatusError) as e:
            c.chat.completions.create(model="victim", messages=MESSAGES, max_tokens=2)
        assert e.value.status_code in (502, 503)
        assert metric(gateway.url, "cxygpt_gateway_upstream_errors_total", model="victim") >= 1
    finally:
        gateway.stop()
        victim.stop()
