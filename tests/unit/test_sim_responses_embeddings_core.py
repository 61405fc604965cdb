"""The Responses API's and embeddings' validation, objects and vectors (pure), and the runner flags."""
import json

import pytest

from cxygpt_sim import embeddings, protocol, responses_api, text
from cxygpt_sim.config import parse_config

SERVED = protocol.Served(("qwen3-14b",))


def error_of(call, *args):
    with pytest.raises(protocol.ApiError) as e:
        call(*args)
    return e.value


def test_input_items_become_the_chat_vllm_renders():
    body = {"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "reasoning", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]}]}
    assert protocol.responses_messages(body) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": ""}, {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is sunny."}]}]
    r = protocol.parse_responses(body, SERVED)
    assert r.generation.prompt_tokens == text.count_tokens(text.render_chat(protocol.responses_messages(body)))
    assert r.generation.reply_source == "Weather?"


def test_response_echoes_the_request_and_vllms_defaults():
    r = protocol.parse_responses({"input": "hi", "max_output_tokens": 9, "temperature": 0.2, "user": "u1"}, SERVED)
    assert (r.generation.max_tokens, r.generation.max_tokens_param) == (9, "max_output_tokens")
    assert r.echoed == {"instructions": None, "metadata": None, "parallel_tool_calls": True, "temperature": 0.2,
                        "tool_choice": "auto", "tools": [], "top_p": 1.0, "background": False, "max_tool_calls": None,
                        "previous_response_id": None, "prompt": None, "reasoning": None, "service_tier": "auto",
                        "text": None, "truncation": "disabled", "user": "u1"}


def test_text_format_json_schema_is_a_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"format": {"type": "json_schema", "name": "x", "schema": schema}}
    assert protocol.parse_responses({"input": "hi", "text": fmt}, SERVED).generation.response_format == \
        {"schema": schema}
    assert protocol.parse_responses({"input": "hi", "text": {"format": {"type": "json_object"}}},
                                    SERVED).generation.response_format == {}


@pytest.mark.parametrize("body, status, param", [
    ({}, 400, "body.input"), ({"input": []}, 400, "body.input"), ({"input": [{"type": "web_search_call"}]}, 400,
                                                                  "body.input.0"),
    ({"input": "hi", "model": "gpt-4"}, 404, "model"), ({"input": "hi", "instructions": 3}, 400, "body.instructions"),
    ({"input": "hi", "max_output_tokens": 0}, 400, "body.max_output_tokens"),
    ({"input": "hi", "previous_response_id": "resp_1"}, 404, "response_id"),
    ({"input": "hi", "background": True}, 400, "background")])
def test_responses_refusals_name_the_field(body, status, param):
    e = error_of(protocol.parse_responses, body, SERVED)
    assert (e.status, e.param) == (status, param)


def test_response_object_incomplete_and_its_stream():
    fields = responses_api.base("resp_1", 5, "m", protocol.RESPONSE_DEFAULTS, 2)
    final = responses_api.finished(fields, "msg_1", "Hi there", True, 7, 2)
    assert final["incomplete_details"] == {"reason": "max_output_tokens"} and final["usage"]["total_tokens"] == 9
    assert final["output"][0]["content"][0]["text"] == "Hi there" and final["max_output_tokens"] == 2
    assert responses_api.finished(fields, "msg_1", "Hi", False, 7, 1)["status"] == "completed"
    events = responses_api.EventStream("msg_1")
    raw = events.start({"status": "in_progress"}) + events.delta("Hi") + events.delta(" there") + events.finish(final)
    parsed = [(block.split("\n")[0], json.loads(block.split("\n")[1][len("data: "):]))
              for block in raw.decode().strip().split("\n\n")]
    assert all(head == f"event: {data['type']}" for head, data in parsed)
    assert [d["sequence_number"] for _, d in parsed] == list(range(10))
    assert parsed[6][1]["text"] == "Hi there" and parsed[-1][1]["response"] == final


def test_embeddings_inputs_are_token_ids_each_within_the_context():
    e = protocol.parse_embeddings({"input": ["a b", "c"], "dimensions": 8}, SERVED, 100)
    assert e.inputs == (text.token_ids("a b"), text.token_ids("c"))
    assert (e.dimensions, e.encoding_format) == (8, "float")
    assert protocol.parse_embeddings({"input": [[1, 2], [3]]}, SERVED, 100).inputs == ([1, 2], [3])
    assert protocol.parse_embeddings({"input": [1, 2]}, SERVED, 100).inputs == ([1, 2],)
    e = error_of(protocol.parse_embeddings, {"input": [[1, 2], [1] * 101]}, SERVED, 100)
    assert (e.status, e.param) == (400, "input_tokens") and "contains 101 input tokens" in e.message
    e = error_of(protocol.parse_embeddings, {"input": ["a", ""]}, SERVED, 100)
    assert (e.status, e.message) == (400, "The decoder prompt cannot be empty")


@pytest.mark.parametrize("body, param", [
    ({}, "body.input"), ({"input": []}, "body.input"), ({"input": [["a"]]}, "body.input"),
    ({"input": "a", "encoding_format": "bytes"}, "body.encoding_format"), ({"input": [text.VOCAB_SIZE]}, "tokens"),
    ({"input": "a", "dimensions": "8"}, "body.dimensions"), ({"input": "a", "model": "x"}, "model")])
def test_embeddings_refusals_name_the_field(body, param):
    assert error_of(protocol.parse_embeddings, body, SERVED, 100).param == param


def test_vectors_cut_then_normalised_and_base64_round_trips():
    ids = text.token_ids("the key-value cache")
    full, short = embeddings.vector(ids), embeddings.vector(ids, 16)
    assert len(full) == embeddings.SIZE and len(short) == 16
    assert sum(x * x for x in short) == pytest.approx(1)
    scale = sum(x * x for x in full[:16]) ** 0.5
    assert short == pytest.approx([x / scale for x in full[:16]])
    assert embeddings.vector([], 4) == [1.0, 0.0, 0.0, 0.0]
    assert embeddings.encode([0.5, -1.0], "base64") == "AAAAPwAAgL8=" and embeddings.encode([0.5], "float") == [0.5]


@pytest.mark.parametrize("flags, runner", [((), "generate"), (("--runner", "generate"), "generate"),
                                           (("--runner", "pooling"), "pooling"), (("--convert", "embed"), "pooling")])
def test_runner_flags(flags, runner):
    config, ignored = parse_config(["serve", "org/m", *flags, "--hf-overrides", "{}"], env={})
    assert config.runner == runner and ignored == ["--hf-overrides", "{}"]
