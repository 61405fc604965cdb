"""vLLM's OpenAI wire format (pure): request validation, length limits and error bodies as vLLM 0.33 sends them."""
from __future__ import annotations

from dataclasses import dataclass

from . import text


class ApiError(Exception):
    """An error answer: HTTP status plus vLLM's {"error": {message, type, param, code}} body."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.status}}


def validation_error(loc: str, kind: str, msg: str, value=None) -> ApiError:
    """vLLM's answer to a request its pydantic models reject: 400, type "Bad Request", param = the field."""
    detail = {"type": kind, "loc": loc, "msg": msg}
    if value is not None:
        shown = repr(value)
        detail["input"] = shown if len(shown) <= 200 else shown[:200] + "...[truncated]"
    return ApiError(400, f"1 validation error:\n  {detail}", "Bad Request", loc)


def invalid_json(error: Exception) -> ApiError:
    return validation_error("body", "json_invalid", f"JSON decode error: {error}")


def unknown_model(requested: str, served: tuple[str, ...]) -> ApiError:
    return ApiError(404, f"The model `{requested}` does not exist. Valid aliases: {', '.join(served)}.",
                    "NotFoundError", "model")


@dataclass(frozen=True)
class Generation:
    """A validated /v1/chat/completions or /v1/completions request."""
    prompt_tokens: int          # of the rendered chat template or the raw prompt
    reply_source: str           # what the reply is derived from: the last user message, or the prompt
    max_tokens: int | None
    max_tokens_param: str
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _field(body: dict, name: str, kind, kind_name: str, check=None, hint: str = ""):
    value = body.get(name)
    if value is None:
        return None
    # bool is an int in Python but not in JSON schema terms
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise validation_error(f"body.{name}", f"{kind_name}_type", f"Input should be a valid {kind_name}", value)
    if check and not check(value):
        raise validation_error(f"body.{name}", "value_error", f"Value error, {name} {hint}", value)
    return value


def _common(body: dict, served: tuple[str, ...]) -> tuple[bool, bool, bool]:
    model = _field(body, "model", str, "string")
    if model is not None and model not in served:
        raise unknown_model(model, served)
    n = _field(body, "n", int, "integer")
    if n is not None and n != 1:
        raise ApiError(400, f"n={n} is not supported by the engine simulator; use n=1", param="n")
    stream = bool(_field(body, "stream", bool, "boolean"))
    options = _field(body, "stream_options", dict, "dictionary") or {}
    include_usage = bool(_field(options, "include_usage", bool, "boolean"))
    if options and not stream:
        raise validation_error("body", "value_error", "Value error, Stream options can only be defined when "
                               "`stream=True`.", None)
    ignore_eos = bool(_field(body, "ignore_eos", bool, "boolean"))
    return stream, include_usage, ignore_eos


def _max_tokens(body: dict, *names: str) -> tuple[int | None, str]:
    for name in names:
        value = _field(body, name, int, "integer", lambda v: v >= 1, "must be at least 1")
        if value is not None:
            return value, name
    return None, names[-1]


def parse_chat(body, served: tuple[str, ...]) -> Generation:
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type", "Input should be a valid dictionary or object", body)
    if "messages" not in body:
        raise validation_error("body.messages", "missing", "Field required")
    try:
        rendered = text.render_chat(body["messages"])
    except text.ChatFormatError as e:
        raise validation_error(e.loc, "value_error", f"Value error, {e}") from None
    stream, include_usage, ignore_eos = _common(body, served)
    max_tokens, param = _max_tokens(body, "max_completion_tokens", "max_tokens")
    return Generation(prompt_tokens=text.count_tokens(rendered),
                      reply_source=text.last_user_text(body["messages"]) or rendered, max_tokens=max_tokens,
                      max_tokens_param=param, stream=stream, include_usage=include_usage, ignore_eos=ignore_eos)


def _is_token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def parse_completion(body, served: tuple[str, ...]) -> Generation:
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type", "Input should be a valid dictionary or object", body)
    prompt = body.get("prompt")
    if prompt is None:
        raise validation_error("body.prompt", "missing", "Field required")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_ids(prompt[0])):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        source, prompt_tokens = prompt, text.count_tokens(prompt)
    elif _is_token_ids(prompt) and prompt:
        _check_vocabulary(prompt)
        source, prompt_tokens = " ".join(map(str, prompt)), len(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "the engine simulator takes one prompt per request; send a batch as separate requests",
                       param="prompt")
    else:
        raise validation_error("body.prompt", "value_error",
                               "Value error, prompt must be a string, a list of token ids, or a list of one of those",
                               prompt)
    stream, include_usage, ignore_eos = _common(body, served)
    max_tokens, param = _max_tokens(body, "max_tokens")
    return Generation(prompt_tokens=prompt_tokens, reply_source=source,
                      max_tokens=max_tokens, max_tokens_param=param, stream=stream, include_usage=include_usage,
                      ignore_eos=ignore_eos)


def output_budget(g: Generation, max_model_len: int) -> int:
    """max_tokens after vLLM's length checks; ApiError(400) naming the limit when the request cannot fit."""
    if g.prompt_tokens > max_model_len:
        # vLLM 0.33's renderer message, including the suffix its VLLMValidationError adds
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                            f"contains {g.prompt_tokens} input tokens, which exceeds this limit even without any "
                            f"output tokens. Please reduce the length of the input prompt. "
                            f"(parameter=input_tokens, value={g.prompt_tokens})", param="input_tokens")
    if g.max_tokens is not None and g.max_tokens > max_model_len:
        raise ApiError(400, f"{g.max_tokens_param}={g.max_tokens} cannot be greater than "
                            f"max_model_len={max_model_len}. Please request fewer output tokens. "
                            f"(parameter={g.max_tokens_param}, value={g.max_tokens})", param=g.max_tokens_param)
    requested = g.max_tokens if g.max_tokens is not None else 1
    if g.prompt_tokens + requested > max_model_len:
        # vLLM 0.33 silently shortens max_tokens here; the simulator keeps the 400 that earlier vLLM
        # releases sent (and that the gateway's admission mirrors), in their words
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                            f"{g.prompt_tokens + requested} tokens ({g.prompt_tokens} in the messages, {requested} "
                            f"in the completion). Please reduce the length of the messages or completion.")
    return g.max_tokens if g.max_tokens is not None else max_model_len - g.prompt_tokens


@dataclass(frozen=True)
class TokenizeRequest:
    prompt_text: str
    return_token_strs: bool


def parse_tokenize(body, served: tuple[str, ...]) -> TokenizeRequest:
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type", "Input should be a valid dictionary or object", body)
    model = _field(body, "model", str, "string")
    if model is not None and model not in served:
        raise unknown_model(model, served)
    strs = bool(_field(body, "return_token_strs", bool, "boolean"))
    if "messages" in body:
        add_prompt = _field(body, "add_generation_prompt", bool, "boolean")
        try:
            rendered = text.render_chat(body["messages"], add_generation_prompt=add_prompt is not False)
        except text.ChatFormatError as e:
            raise validation_error(e.loc, "value_error", f"Value error, {e}") from None
        return TokenizeRequest(rendered, strs)
    prompt = _field(body, "prompt", str, "string")
    if prompt is None:
        raise validation_error("body.prompt", "missing", "Field required")
    return TokenizeRequest(prompt, strs)


def parse_detokenize(body, served: tuple[str, ...]) -> list[int]:
    """/detokenize's token ids; an id outside the vocabulary is vLLM's 400."""
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type", "Input should be a valid dictionary or object", body)
    model = _field(body, "model", str, "string")
    if model is not None and model not in served:
        raise unknown_model(model, served)
    if "tokens" not in body:
        raise validation_error("body.tokens", "missing", "Field required")
    ids = body["tokens"]
    if not _is_token_ids(ids):
        raise validation_error("body.tokens", "list_type", "Input should be a valid list of token ids", ids)
    _check_vocabulary(ids)
    return ids


def _check_vocabulary(ids: list[int]) -> None:
    if ids and max(ids) >= text.VOCAB_SIZE:
        raise ApiError(400, f"Token id {max(ids)} is out of vocabulary", param="tokens")
