"""vLLM's OpenAI wire format (pure): request validation, length limits and error bodies as vLLM 0.33 sends them."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import text


class ApiError(Exception):
    """An error answer: HTTP status plus vLLM's {"error": {message, type, param, code}} body."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.status}}


def _error_input(value):
    """vLLM 0.33's size-bounded stand-in for a rejected value: containers described, the rest cut at 200."""
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    shown = value if isinstance(value, str) else str(value)
    return shown if len(shown) <= 200 else shown[:200] + "...[truncated]"


def validation_error(loc: str, kind: str, msg: str, value=None) -> ApiError:
    """vLLM's answer to a request its pydantic models reject: 400, type "Bad Request", param = the field."""
    detail = {"type": kind, "loc": loc, "msg": msg}
    if value is not None:
        detail["input"] = _error_input(value)
    return ApiError(400, f"1 validation error:\n  {detail}", "Bad Request", loc)


def invalid_json(error: Exception) -> ApiError:
    return validation_error("body", "json_invalid", f"JSON decode error: {error}")


@dataclass(frozen=True)
class Served:
    """The names a request's `model` may take: the base model's served names, and the LoRA adapters loaded now."""
    base: tuple[str, ...]
    adapters: frozenset[str] = frozenset()

    def check(self, model) -> None:
        if model is not None and model not in self.base and model not in self.adapters:
            raise unknown_model(model, self)


def unknown_model(requested: str, served: Served) -> ApiError:
    # vLLM names the base model's aliases only, never the adapters
    return ApiError(404, f"The model `{requested}` does not exist. Valid aliases: {', '.join(served.base)}.",
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
    prompt_ids: list[int] = field(default_factory=list)  # the same prompt's token ids, for the prefix cache
    n: int = 1
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    logprobs: int | None = None     # top alternatives per token; None: no logprobs
    echo: bool = False
    prompt_text: str = ""           # what echo repeats
    tools: tuple = ()               # the functions offered ({"name", "parameters", ...})
    tool_choice: object = None      # None, "none", "auto", "required" or {"type": "function", "function": {...}}
    response_format: dict | None = field(default=None)  # {"schema": ...} or {} for json_object
    model: str | None = None        # as the request names it (an adapter's name runs that adapter)


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


def _common(body: dict, served: Served) -> tuple[bool, bool, bool]:
    served.check(_field(body, "model", str, "string"))
    stream = bool(_field(body, "stream", bool, "boolean"))
    options = _field(body, "stream_options", dict, "dictionary") or {}
    include_usage = bool(_field(options, "include_usage", bool, "boolean"))
    if options and not stream:
        raise validation_error("body", "value_error", "Value error, Stream options can only be defined when "
                               "`stream=True`.", None)
    ignore_eos = bool(_field(body, "ignore_eos", bool, "boolean"))
    return stream, include_usage, ignore_eos


MAX_LOGPROBS = 20  # vLLM's --max-logprobs default


def vllm_error(message: str, param: str, value=None) -> ApiError:
    """A VLLMValidationError: its message with the parameter (and value) appended, as vLLM renders it."""
    suffix = f"parameter={param}" + (f", value={value}" if value is not None else "")
    return ApiError(400, f"{message} ({suffix})", param=param)


def _sampling(body: dict) -> dict:
    """n and stop strings, shared by chat and completions."""
    n = _field(body, "n", int, "integer")
    if n is not None and n < 1:
        raise vllm_error(f"n must be at least 1, got {n}.", "n", n)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise validation_error("body.stop", "string_type", "Input should be a valid string or list of strings", stop)
    include = bool(_field(body, "include_stop_str_in_output", bool, "boolean"))
    return {"n": n or 1, "stop": tuple(stop or ()), "include_stop_str_in_output": include}


def _bounded_logprobs(count: int) -> int:
    if count > MAX_LOGPROBS:
        raise vllm_error(f"Requested sample logprobs of {count}, which is greater than max allowed: {MAX_LOGPROBS}",
                         "logprobs", count)
    return count


def _chat_logprobs(body: dict) -> int | None:
    wanted = _field(body, "logprobs", bool, "boolean")
    top = _field(body, "top_logprobs", int, "integer")
    if top is not None:
        if top < 0 and top != -1:
            raise vllm_error("`top_logprobs` must be a positive value or -1.", "top_logprobs", top)
        if top != 0 and not wanted:
            raise vllm_error("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    if not wanted:
        return None
    # -1 asks for the whole vocabulary, which is over the bound as on vLLM
    return _bounded_logprobs(text.VOCAB_SIZE if top == -1 else top or 0)


def _value_error(message: str) -> ApiError:
    return validation_error("body", "value_error", f"Value error, {message}")


def _tools(body: dict) -> tuple[tuple, object]:
    """vLLM's check_tool_usage, in its words."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice is None and tools:
        choice = "auto"
    if choice is None or choice == "none":
        return (), choice
    if tools is None:
        raise _value_error("When using `tool_choice`, `tools` must be set.")
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("function"), dict)
                                              and isinstance(t["function"].get("name"), str) for t in tools):
        raise validation_error("body.tools", "list_type", "Input should be a valid list of function tools", tools)
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise _value_error(f"Invalid value for `tool_choice`: {choice}! Only named tools, \"none\", \"auto\" or "
                           f"\"required\" are supported.")
    if choice == "required" and not tools:
        return (), "none"
    functions = tuple(t["function"] for t in tools)
    if isinstance(choice, dict):
        usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
        function = choice.get("function")
        if not isinstance(function, dict):
            raise _value_error(f"Invalid value for `function`: `{function}` in `tool_choice`! {usage}")
        if "name" not in function:
            raise _value_error(f"Expected field `name` in `function` in `tool_choice`! {usage}")
        if not isinstance(function["name"], str) or not function["name"]:
            raise _value_error(f"Invalid `name` in `function`: `{function['name']}` in `tool_choice`! {usage}")
        if all(f["name"] != function["name"] for f in functions):
            raise _value_error("The tool specified in `tool_choice` does not match any of the specified `tools`")
    return functions, choice


def _response_format(body: dict) -> dict | None:
    fmt = _field(body, "response_format", dict, "dictionary")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise validation_error("body.response_format.json_schema", "missing", "Field required", spec)
        return {"schema": spec["schema"]}
    raise validation_error("body.response_format.type", "literal_error",
                           "Input should be 'text', 'json_object', 'json_schema' or 'structural_tag'", fmt.get("type"))


def _max_tokens(body: dict, *names: str) -> tuple[int | None, str]:
    for name in names:
        value = _field(body, name, int, "integer", lambda v: v >= 1, "must be at least 1")
        if value is not None:
            return value, name
    return None, names[-1]


def parse_chat(body, served: Served) -> Generation:
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
    tools, tool_choice = _tools(body)
    prompt_ids = text.token_ids(rendered)
    return Generation(prompt_tokens=len(prompt_ids), prompt_ids=prompt_ids,
                      reply_source=text.last_user_text(body["messages"]) or rendered, max_tokens=max_tokens,
                      **_sampling(body), logprobs=_chat_logprobs(body), tools=tools, tool_choice=tool_choice,
                      response_format=_response_format(body), model=body.get("model"),
                      max_tokens_param=param, stream=stream, include_usage=include_usage, ignore_eos=ignore_eos)


def _is_token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def parse_completion(body, served: Served) -> Generation:
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type", "Input should be a valid dictionary or object", body)
    prompt = body.get("prompt")
    if prompt is None:
        raise validation_error("body.prompt", "missing", "Field required")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_token_ids(prompt[0])):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        source, prompt_ids = prompt, text.token_ids(prompt)
    elif _is_token_ids(prompt) and prompt:
        _check_vocabulary(prompt)
        source, prompt_ids = " ".join(map(str, prompt)), prompt
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "the engine simulator takes one prompt per request; send a batch as separate requests",
                       param="prompt")
    else:
        raise validation_error("body.prompt", "value_error",
                               "Value error, prompt must be a string, a list of token ids, or a list of one of those",
                               prompt)
    _check_not_empty(prompt_ids)
    stream, include_usage, ignore_eos = _common(body, served)
    max_tokens, param = _max_tokens(body, "max_tokens")
    logprobs = _field(body, "logprobs", int, "integer")
    if logprobs is not None and logprobs < 0:
        raise vllm_error("`logprobs` must be a positive value.", "logprobs", logprobs)
    echo = bool(_field(body, "echo", bool, "boolean"))
    return Generation(prompt_tokens=len(prompt_ids), prompt_ids=prompt_ids, reply_source=source, **_sampling(body),
                      logprobs=None if logprobs is None else _bounded_logprobs(logprobs), echo=echo,
                      prompt_text=prompt if isinstance(prompt, str) else text.detokenize(prompt),
                      response_format=_response_format(body), model=body.get("model"),
                      max_tokens=max_tokens, max_tokens_param=param, stream=stream, include_usage=include_usage,
                      ignore_eos=ignore_eos)


def check_input_length(prompt_tokens: int, max_model_len: int) -> None:
    if prompt_tokens > max_model_len:
        # vLLM 0.33's renderer message, including the suffix its VLLMValidationError adds
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                            f"contains {prompt_tokens} input tokens, which exceeds this limit even without any "
                            f"output tokens. Please reduce the length of the input prompt. "
                            f"(parameter=input_tokens, value={prompt_tokens})", param="input_tokens")


def output_budget(g: Generation, max_model_len: int) -> int:
    """max_tokens after vLLM's length checks; ApiError(400) naming the limit when the request cannot fit."""
    check_input_length(g.prompt_tokens, max_model_len)
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


def parse_tokenize(body, served: Served) -> TokenizeRequest:
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type", "Input should be a valid dictionary or object", body)
    served.check(_field(body, "model", str, "string"))
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


def parse_detokenize(body, served: Served) -> list[int]:
    """/detokenize's token ids; an id outside the vocabulary is vLLM's 400."""
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type", "Input should be a valid dictionary or object", body)
    served.check(_field(body, "model", str, "string"))
    if "tokens" not in body:
        raise validation_error("body.tokens", "missing", "Field required")
    ids = body["tokens"]
    if not _is_token_ids(ids):
        raise validation_error("body.tokens", "list_type", "Input should be a valid list of token ids", ids)
    _check_vocabulary(ids)
    return ids


def _check_not_empty(ids: list[int]) -> None:
    if not ids:
        # Qwen's tokenizer adds no special tokens, so an empty text is an empty prompt, which vLLM refuses
        raise ApiError(400, "The decoder prompt cannot be empty")


def _check_vocabulary(ids: list[int]) -> None:
    if ids and max(ids) >= text.VOCAB_SIZE:
        raise ApiError(400, f"Token id {max(ids)} is out of vocabulary", param="tokens")


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise validation_error("body", "model_attributes_type", "Input should be a valid dictionary or object", body)
    return body




@dataclass(frozen=True)
class ResponsesRequest:
    """A validated /v1/responses request: the generation it asks for, and the fields its response repeats."""
    generation: Generation
    echoed: dict


# what a response repeats of its request when the request leaves it out (vLLM's ResponsesRequest defaults)
RESPONSE_DEFAULTS: dict[str, object] = {
    "instructions": None, "metadata": None, "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto",
    "tools": [], "top_p": 1.0, "background": False, "max_tool_calls": None, "previous_response_id": None,
    "prompt": None, "reasoning": None, "service_tier": "auto", "text": None, "truncation": "disabled", "user": None}


def _input_text(content, loc: str):
    """An input item's content as chat content: a string, or its input_text/output_text parts as text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise validation_error(loc, "value_error", "Value error, content must be a string or a list of parts", content)
    return [{"type": "text", "text": p.get("text")} if p.get("type") in ("input_text", "output_text") else p
            for p in content if isinstance(p, dict)]


def responses_messages(body: dict) -> list[dict]:
    """The chat messages vLLM renders for a Responses input: instructions as the system message, a string input as
    the user's, message items as they are, a function call's output as a tool message; reasoning items are
    dropped and a function call is an assistant turn with no text (the template here renders no tool calls)."""
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    given = body["input"]
    if isinstance(given, str):
        return messages + [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise validation_error("body.input", "value_error", "Value error, input must be a string or a non-empty "
                               "list of input items", given)
    for i, item in enumerate(given):
        loc = f"body.input.{i}"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and isinstance(item.get("role"), str):
            messages.append({"role": item["role"], "content": _input_text(item.get("content"), f"{loc}.content")})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "content": _input_text(item.get("output"), f"{loc}.output")})
        elif kind == "function_call":
            messages.append({"role": "assistant", "content": ""})
        elif kind != "reasoning":
            raise validation_error(loc, "union_tag_invalid", "Input should be a message, function_call, "
                                   "function_call_output or reasoning item", item)
    return messages


def _text_format(body: dict) -> dict | None:
    """text.format, the Responses API's response_format (json_schema carries its schema inline)."""
    fmt = (_field(body, "text", dict, "dictionary") or {}).get("format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        return _response_format({"response_format": {"type": "json_schema", "json_schema": fmt}})
    return _response_format({"response_format": fmt})


def parse_responses(body, served: Served) -> ResponsesRequest:
    body = _object(body)
    if "input" not in body:
        raise validation_error("body.input", "missing", "Field required")
    served.check(_field(body, "model", str, "string"))
    _field(body, "instructions", str, "string")
    if body.get("previous_response_id") is not None:
        # vLLM stores no responses unless VLLM_ENABLE_RESPONSES_API_STORE is set, so none is ever found
        raise ApiError(404, f"Response with id '{body['previous_response_id']}' not found.", "invalid_request_error",
                       "response_id")
    if _field(body, "background", bool, "boolean") and body.get("store", True) is not False:
        raise ApiError(400, "This vLLM engine does not support `store=True` and therefore does not support the "
                            "background mode. To enable these features, set the environment variable "
                            "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM server.",
                       "invalid_request_error", "background")
    try:
        messages = responses_messages(body)
        rendered = text.render_chat(messages)
    except text.ChatFormatError as e:
        raise validation_error(e.loc, "value_error", f"Value error, {e}") from None
    stream = bool(_field(body, "stream", bool, "boolean"))
    max_tokens, param = _max_tokens(body, "max_output_tokens")
    sampling = _sampling({k: v for k, v in body.items() if k != "n"})  # the Responses API has no n
    ids = text.token_ids(rendered)
    g = Generation(prompt_tokens=len(ids), prompt_ids=ids, reply_source=text.last_user_text(messages) or rendered,
                   max_tokens=max_tokens, max_tokens_param=param, stream=stream, include_usage=False,
                   ignore_eos=bool(_field(body, "ignore_eos", bool, "boolean")), **sampling,
                   response_format=_text_format(body), model=body.get("model"))
    echoed = {k: default if body.get(k) is None else body[k] for k, default in RESPONSE_DEFAULTS.items()}
    return ResponsesRequest(g, echoed)


EMBEDDING_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: tuple[list[int], ...]   # each input's token ids
    encoding_format: str
    dimensions: int | None
    model: str | None = None


def parse_embeddings(body, served: Served, max_model_len: int) -> EmbeddingRequest:
    """A string, a list of strings, a list of token ids or a list of those; each input within max_model_len."""
    body = _object(body)
    if "input" not in body:
        raise validation_error("body.input", "missing", "Field required")
    served.check(_field(body, "model", str, "string"))
    given = body["input"]
    if isinstance(given, str) or (_is_token_ids(given) and given):
        given = [given]
    if not (isinstance(given, list) and given and all(isinstance(i, str) or (_is_token_ids(i) and i)
                                                      for i in given)):
        raise validation_error("body.input", "value_error", "Value error, input must be a string, a list of "
                               "strings, a list of token ids or a list of lists of token ids", body["input"])
    inputs = tuple(text.token_ids(i) if isinstance(i, str) else i for i in given)
    for ids in inputs:
        _check_not_empty(ids)
        _check_vocabulary(ids)
        check_input_length(len(ids), max_model_len)
    fmt = body.get("encoding_format") or "float"
    if fmt not in EMBEDDING_FORMATS:
        raise validation_error("body.encoding_format", "literal_error", "Input should be 'float' or 'base64'", fmt)
    dimensions = _field(body, "dimensions", int, "integer")
    if dimensions is not None and dimensions < 1:
        # the simulated embedding model is matryoshka (as Qwen3-Embedding), so vLLM only checks the size
        raise ApiError(400, "Dimensions must be greater than 0")
    return EmbeddingRequest(inputs, fmt, dimensions, body.get("model"))


# --- the runtime LoRA endpoints (enabled by VLLM_ALLOW_RUNTIME_LORA_UPDATING) ----------------------------------

MAX_LORA_NAME = 256     # the simulator's bounds (vLLM has none): a name is echoed in /v1/models and a metric label
MAX_LORA_PATH = 4096
_TRUE, _FALSE = ("1", "on", "t", "true", "y", "yes"), ("0", "off", "f", "false", "n", "no")


@dataclass(frozen=True)
class LoadLora:
    """POST /v1/load_lora_adapter's body (vLLM's LoadLoRAAdapterRequest; is_3d_lora_weight is for MoE layers)."""
    name: str
    path: str
    load_inplace: bool = False


def check_json_media_type(content_type: str) -> None:
    """vLLM's validate_json_request on these routes."""
    if content_type.lower().split(";", maxsplit=1)[0] != "application/json":
        raise ApiError(400, "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                       "Bad Request")


def validation_errors(errors: list[dict]) -> ApiError:
    """pydantic's errors as vLLM 0.33 reports them: counted, one per line, param = the first one's field."""
    label = "error" if len(errors) == 1 else "errors"
    lines = "".join(f"  {e}\n" for e in errors)
    return ApiError(400, f"{len(errors)} validation {label}:\n{lines}".rstrip(), "Bad Request", errors[0]["loc"])


def _lax_bool(value) -> bool | dict:
    """pydantic's lax bool: the value, or its error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, (str, int, float)):
        return {"type": "bool_parsing", "msg": "Input should be a valid boolean, unable to interpret input"}
    return {"type": "bool_type", "msg": "Input should be a valid boolean"}


def _lora_fields(body, strings: tuple[str, ...], flags: tuple[str, ...], integers: tuple[str, ...] = ()) -> dict:
    """The body's fields, checked as vLLM's pydantic request models check them (every error at once)."""
    if not isinstance(body, dict):
        raise validation_errors([{"type": "model_attributes_type", "loc": "body", "msg": "Input should be a valid "
                                  "dictionary or object to extract fields from", "input": _error_input(body)}])
    values, errors = {}, []
    for name in strings:
        if name not in body:
            errors.append({"type": "missing", "loc": f"body.{name}", "msg": "Field required",
                           "input": _error_input(body)})
        elif not isinstance(body[name], str):
            errors.append({"type": "string_type", "loc": f"body.{name}", "msg": "Input should be a valid string",
                           "input": _error_input(body[name])})
        else:
            values[name] = body[name]
    for name in flags:
        checked = _lax_bool(body.get(name, False))
        if isinstance(checked, dict):
            errors.append({"type": checked["type"], "loc": f"body.{name}", "msg": checked["msg"],
                           "input": _error_input(body[name])})
        values[name] = checked
    for name in integers:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            errors.append({"type": "int_parsing" if isinstance(value, str) else "int_type", "loc": f"body.{name}",
                           "msg": "Input should be a valid integer" + (", unable to parse string as an integer"
                                                                       if isinstance(value, str) else ""),
                           "input": _error_input(value)})
    if errors:
        raise validation_errors(errors)
    return values


def _bounded_name(name: str) -> str:
    if len(name) > MAX_LORA_NAME:
        raise ApiError(400, f"lora_name is {len(name)} characters long, over the simulator's bound of "
                            f"{MAX_LORA_NAME}", "InvalidUserInput")
    return name


def parse_load_lora(body, served: Served) -> LoadLora:
    """The body, then OpenAIServingModels' checks that need no engine (400 InvalidUserInput in vLLM's words)."""
    v = _lora_fields(body, ("lora_name", "lora_path"), ("load_inplace", "is_3d_lora_weight"))
    name, path = v["lora_name"], v["lora_path"]
    if not name or not path:
        raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
    _bounded_name(name)
    if len(path) > MAX_LORA_PATH:
        raise ApiError(400, f"lora_path is {len(path)} characters long, over the simulator's bound of "
                            f"{MAX_LORA_PATH}", "InvalidUserInput")
    if name in served.base:
        raise ApiError(400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput")
    if not v["load_inplace"] and name in served.adapters:
        raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in "
                            "place, set 'load_inplace' to True.", "InvalidUserInput")
    return LoadLora(name, path, v["load_inplace"])


def parse_unload_lora(body, served: Served) -> str:
    """The adapter's name; 400 without one, vLLM's 404 when it is not loaded."""
    name = _lora_fields(body, ("lora_name",), (), ("lora_int_id",))["lora_name"]
    if not name:
        raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
    if name not in served.adapters:
        raise ApiError(404, f"The lora adapter '{_bounded_name(name)}' cannot be found.", "NotFoundError")
    return name


def sanitize_message(message: str) -> str:
    """vLLM's sanitize_message on the errors it answers: no memory addresses, tracebacks or file paths."""
    message = re.sub(r" at 0x[0-9a-fA-F]+>", ">", message)
    message = re.sub(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?', "", message)
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    message = re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message)
    return message.strip()
