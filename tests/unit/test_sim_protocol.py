"""Request validation, length limits and error bodies in vLLM 0.33's shape."""
import pytest

from cxygpt_sim import protocol, text

SERVED = protocol.Served(("qwen3-14b", "Qwen/Qwen3-14B"))


def chat(**body):
    return protocol.parse_chat({"messages": [{"role": "user", "content": "hi"}], **body}, SERVED)


def error_of(call, *args, **kwargs):
    with pytest.raises(protocol.ApiError) as e:
        call(*args, **kwargs)
    return e.value


def test_chat_counts_the_rendered_template():
    g = chat(max_tokens=7, stream=True, stream_options={"include_usage": True})
    assert g.prompt_tokens == text.count_tokens(text.render_chat([{"role": "user", "content": "hi"}]))
    assert (g.max_tokens, g.stream, g.include_usage, g.reply_source) == (7, True, True, "hi")


def test_max_completion_tokens_wins_over_max_tokens():
    g = chat(max_tokens=7, max_completion_tokens=9)
    assert (g.max_tokens, g.max_tokens_param) == (9, "max_completion_tokens")


def test_completion_prompt_forms():
    assert protocol.parse_completion({"prompt": "a b c"}, SERVED).prompt_tokens == 3
    assert protocol.parse_completion({"prompt": [1, 2, 3, 4]}, SERVED).prompt_tokens == 4
    assert protocol.parse_completion({"prompt": ["a b"]}, SERVED).prompt_tokens == 2
    e = error_of(protocol.parse_completion, {"prompt": ["a", "b"]}, SERVED)
    assert (e.status, e.param) == (400, "prompt")
    e = error_of(protocol.parse_completion, {"prompt": ""}, SERVED)
    assert (e.status, e.message) == (400, "The decoder prompt cannot be empty")


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": "5"}, "body.max_tokens"), ({"max_tokens": 0}, "body.max_tokens"),
    ({"max_tokens": True}, "body.max_tokens"), ({"stream": "yes"}, "body.stream"),
    ({"model": 3}, "body.model"), ({"messages": [{"role": 1}]}, "body.messages.0.role"),
    ({"stream_options": {"include_usage": True}}, "body"), ({"n": 0}, "n"),
    ({"stop": 5}, "body.stop"), ({"response_format": {"type": "xml"}}, "body.response_format.type")])
def test_bad_fields_get_a_400_naming_them(body, param):
    e = error_of(chat, **body)
    assert (e.status, e.param) == (400, param)
    assert e.body()["error"]["code"] == 400


def test_missing_messages_and_non_objects():
    assert error_of(protocol.parse_chat, {}, SERVED).param == "body.messages"
    assert error_of(protocol.parse_chat, [1], SERVED).param == "body"
    assert error_of(protocol.parse_completion, {}, SERVED).param == "body.prompt"


def test_unknown_model_is_404_listing_the_served_names():
    e = error_of(chat, model="gpt-4")
    assert (e.status, e.err_type, e.param) == (404, "NotFoundError", "model")
    assert e.message == "The model `gpt-4` does not exist. Valid aliases: qwen3-14b, Qwen/Qwen3-14B."


def gen(prompt_tokens, max_tokens):
    return protocol.Generation(prompt_tokens, "", max_tokens, "max_tokens", False, False, False)


def test_output_budget_defaults_to_the_rest_of_the_context():
    assert protocol.output_budget(gen(100, None), 1024) == 924
    assert protocol.output_budget(gen(100, 924), 1024) == 924


def test_prompt_over_the_context_is_vllm_033s_message():
    e = error_of(protocol.output_budget, gen(2000, None), 1024)
    assert e.body() == {"error": {
        "message": "This model's maximum context length is 1024 tokens. However, your prompt contains 2000 input "
                   "tokens, which exceeds this limit even without any output tokens. Please reduce the length of "
                   "the input prompt. (parameter=input_tokens, value=2000)",
        "type": "BadRequestError", "param": "input_tokens", "code": 400}}


def test_prompt_plus_max_tokens_over_the_context_is_a_400_naming_the_limit():
    e = error_of(protocol.output_budget, gen(100, 1000), 1024)
    assert e.status == 400
    assert e.message.startswith("This model's maximum context length is 1024 tokens. However, you requested "
                                "1100 tokens (100 in the messages, 1000 in the completion).")


def test_max_tokens_over_the_context():
    e = error_of(protocol.output_budget, gen(1, 5000), 1024)
    assert e.param == "max_tokens"
    assert e.message.startswith("max_tokens=5000 cannot be greater than max_model_len=1024.")


def test_tokenize_requests():
    assert protocol.parse_tokenize({"prompt": "a b"}, SERVED).prompt_text == "a b"
    msgs = [{"role": "user", "content": "hi"}]
    assert protocol.parse_tokenize({"messages": msgs}, SERVED).prompt_text == text.render_chat(msgs)
    assert protocol.parse_tokenize({"messages": msgs, "add_generation_prompt": False}, SERVED).prompt_text == \
        text.render_chat(msgs, add_generation_prompt=False)
    assert error_of(protocol.parse_tokenize, {"model": "nope", "prompt": "x"}, SERVED).status == 404
    assert error_of(protocol.parse_tokenize, {}, SERVED).param == "body.prompt"


def test_invalid_json_is_a_validation_error():
    e = protocol.invalid_json(ValueError("Expecting value"))
    assert (e.status, e.err_type, e.param) == (400, "Bad Request", "body")
    assert "json_invalid" in e.message
