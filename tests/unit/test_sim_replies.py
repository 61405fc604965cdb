"""What each choice says: stop strings, JSON that validates against its schema, tool calls, logprobs (pure)."""
import json

import jsonschema
import pytest

from cxygpt_sim import protocol, replies, text

SERVED = protocol.Served(("m",))
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city", "unit", "days"], "additionalProperties": False,
    "properties": {"city": {"type": "string", "minLength": 2}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7},
                   "hourly": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}}}}}}
NOTE = {"type": "function", "function": {"name": "take_note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}


def chat(content="hi", **body):
    return protocol.parse_chat({"messages": [{"role": "user", "content": content}], **body}, SERVED)


def plan(g, index=0, max_tokens=500):
    return replies.plan(g, index, max_tokens, text.ReplyWriter())


def error_of(**body):
    with pytest.raises(protocol.ApiError) as e:
        chat(**body)
    return e.value


def test_a_stop_string_ends_the_text_before_it():
    full = "".join(plan(chat()).pieces)
    stop = full.split()[3]
    c = plan(chat(stop=[stop, "never there"]))
    assert "".join(c.pieces) == full[:full.index(stop)] and (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.ids == text.token_ids("".join(c.pieces))
    included = plan(chat(stop=stop, include_stop_str_in_output=True))
    assert "".join(included.pieces) == full[:full.index(stop) + len(stop)]


def test_n_choices_differ_and_choice_zero_is_the_n1_answer():
    g = chat(n=3)
    texts = ["".join(plan(g, i).pieces) for i in range(3)]
    assert len(set(texts)) == 3 and texts[0] == "".join(plan(chat()).pieces)


@pytest.mark.parametrize("prompt", [f"question {k}" for k in range(12)])
def test_required_and_named_tool_calls_validate_against_the_parameters(prompt):
    for choice in ("required", {"type": "function", "function": {"name": "take_note"}}):
        c = plan(chat(prompt, tools=[WEATHER, NOTE], tool_choice=choice))
        schema = {"get_weather": WEATHER, "take_note": NOTE}[c.tool]["function"]["parameters"]
        jsonschema.validate(json.loads("".join(c.pieces)), schema)
        assert c.finish_reason == "stop" and c.call_id
    assert c.tool == "take_note"


def test_auto_answers_text_or_a_call_deterministically_and_none_answers_text():
    calls = [plan(chat(f"question {k}", tools=[WEATHER])) for k in range(12)]
    assert {c.tool for c in calls} == {None, "get_weather"}
    assert all(c.finish_reason == "tool_calls" for c in calls if c.tool)
    assert plan(chat("question 1", tools=[WEATHER])) == calls[1]
    assert all(plan(chat(f"question {k}", tools=[WEATHER], tool_choice="none")).tool is None for k in range(12))


def test_json_schema_and_json_object_outputs_parse_and_validate():
    schema = WEATHER["function"]["parameters"]
    c = plan(chat(response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}))
    jsonschema.validate(json.loads("".join(c.pieces)), schema)
    assert isinstance(json.loads("".join(plan(chat(response_format={"type": "json_object"})).pieces)), dict)


@pytest.mark.parametrize("body, message", [
    ({"tool_choice": "required"}, "When using `tool_choice`, `tools` must be set."),
    ({"tools": [WEATHER], "tool_choice": "always"}, "Invalid value for `tool_choice`: always!"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "The tool specified in `tool_choice` does not match any of the specified `tools`"),
    ({"logprobs": True, "top_logprobs": 21},
     "Requested sample logprobs of 21, which is greater than max allowed: 20 (parameter=logprobs, value=21)"),
    ({"top_logprobs": 2}, "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)"),
    ({"logprobs": True, "top_logprobs": -2}, "`top_logprobs` must be a positive value or -1."),
])
def test_vllms_refusals_in_its_words(body, message):
    e = error_of(**body)
    assert e.status == 400 and message in e.message


def test_completion_logprobs_bounded_like_vllm():
    with pytest.raises(protocol.ApiError) as e:
        protocol.parse_completion({"prompt": "x", "logprobs": 21}, SERVED)
    assert "greater than max allowed: 20" in e.value.message
    assert protocol.parse_completion({"prompt": "x", "logprobs": 20}, SERVED).logprobs == 20


def test_logprobs_are_deterministic_sorted_and_at_most_zero():
    ids = text.token_ids("The key-value cache holds the attention state.")
    entries = replies.chat_logprobs(ids, 0, 3)
    assert entries == replies.chat_logprobs(ids, 0, 3) and len(entries) == len(ids)
    for e, i in zip(entries, ids):
        lps = [t["logprob"] for t in e["top_logprobs"]]
        assert e["token"] == text.token_bytes(i).decode() and len(lps) == 3
        assert lps == sorted(lps, reverse=True) and lps[0] == e["logprob"] <= 0
    done = replies.completion_logprobs(ids, 0, 2, 0)
    assert "".join(done["tokens"]) == "The key-value cache holds the attention state."
    assert done["text_offset"][1] == len(done["tokens"][0])
