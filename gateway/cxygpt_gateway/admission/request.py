"""The request body, parsed once: the fields admission needs, checked precisely (pure)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import orjson

from ..errors import GatewayError

Kind = Literal["chat", "completions", "responses", "embeddings"]
# the routes relayed to an engine: the one table every server and the relay read (request path → kind → path)
RELAYED: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                            "/v1/responses": "responses", "/v1/embeddings": "embeddings"}
PATHS: dict[Kind, str] = {kind: path for path, kind in RELAYED.items()}
# each kind's input field (a 413 names it) and the fields that cap its output (the smallest wins)
INPUT_PARAM = {"chat": "messages", "completions": "prompt", "responses": "input", "embeddings": "input"}
OUTPUT_PARAMS = {"chat": ("max_completion_tokens", "max_tokens"), "completions": ("max_tokens",),
                 "responses": ("max_output_tokens",), "embeddings": ()}
# the documented estimate when the upstream cannot count: ~4 bytes of text per token plus role markers
ESTIMATE_BYTES_PER_TOKEN = 4
ESTIMATE_TOKENS_PER_MESSAGE = 4
# how much of a client's string an answer or a log line quotes
ECHO_CHARS = 64


def _bad(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code="invalid_request", param=param, reason="invalid_request")


def decode(raw: bytes) -> dict:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _bad(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    return body


def model_name(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a non-empty string", "model")
    return model


def echo(text: str, limit: int = ECHO_CHARS) -> str:
    """A client's string as an answer or a log line may quote it: whole when short, else its start and length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def cut(text: str, limit: int = ECHO_CHARS) -> str:
    """The same, unquoted (a path, say)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class OpenAIRequest:
    kind: Kind
    body: dict
    raw_size: int
    model: str
    stream: bool
    client_wants_usage: bool
    requested_max_tokens: int | None
    prompts: int = 1      # of a completions or embeddings batch
    n: int = 1            # choices per prompt (chat, completions)

    @property
    def generates(self) -> bool:
        """Whether the answer is generated text (an output cap, a stream) rather than embeddings."""
        return self.kind != "embeddings"


def validate(body: dict, kind: Kind, raw_size: int, *, max_n: int, max_batch: int) -> OpenAIRequest:
    """Only what admission relies on is checked, and what one request may make the engine do (`max_n` choices,
    `max_batch` prompts); the upstream validates the rest and its 400 is relayed."""
    prompts = 1
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty array", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
    elif kind == "responses":
        given = body.get("input")
        if not (isinstance(given, str) and given) and not (
                isinstance(given, list) and given and all(isinstance(i, dict) for i in given)):
            raise _bad("'input' must be a non-empty string or a non-empty array of input items", "input")
        if not isinstance(body.get("instructions") or "", str):
            raise _bad("'instructions' must be a string", "instructions")
    else:
        param = INPUT_PARAM[kind]
        prompt = body.get(param)
        if not _valid_prompt(prompt):
            raise _bad(f"'{param}' must be a string, an array of strings, or token ids", param)
        prompts = batch = _batch_size(prompt)
        if batch > max_batch:
            raise GatewayError(400, f"'{param}' holds {batch} prompts, over this model's limit of {max_batch} in one "
                                    "request: send them in several requests", code="batch_too_large", param=param,
                               reason="batch_too_large")
    n = body.get("n")
    if n is None or kind not in ("chat", "completions"):
        n = 1
    elif not _is_int(n) or n < 1:
        raise _bad("'n' must be a positive integer", "n")
    elif n > max_n:
        raise GatewayError(400, f"'n' is {n}, over this model's limit of {max_n} choices per request",
                           code="n_too_large", param="n", reason="n_too_large")
    stream = body.get("stream", False) if kind != "embeddings" else False
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict)
                                or not isinstance(options.get("include_usage", False), bool)):
        raise _bad("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    requested = None
    for param in OUTPUT_PARAMS[kind]:
        value = body.get(param)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _bad(f"'{param}' must be a positive integer", param)
            requested = value if requested is None else min(requested, value)
    for param in ("temperature", "top_p"):
        value = body.get(param)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise _bad(f"'{param}' must be a number", param)
    return OpenAIRequest(kind=kind, body=body, raw_size=raw_size, model=body["model"], stream=stream,
                         client_wants_usage=bool(options and options.get("include_usage")),
                         requested_max_tokens=requested, prompts=prompts, n=n)


def _batch_size(prompt) -> int:
    """Prompts in a completions or embeddings input: one string or one list of token ids is one."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def prompt_bytes(payload: dict) -> int:
    """UTF-8 bytes of one /tokenize payload's prompt (a real tokenizer never makes more tokens than that)."""
    prompt = payload.get("prompt")
    return len(prompt.encode()) if isinstance(prompt, str) else 1 << 62


def _valid_prompt(prompt) -> bool:
    if isinstance(prompt, str):
        return True
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(isinstance(p, str) for p in prompt) or all(_is_int(p) for p in prompt):
        return True
    return all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt)


def token_id_count(req: OpenAIRequest) -> int | None:
    """Prompts given as token ids count themselves (the longest of a batch)."""
    prompt = req.body.get(INPUT_PARAM[req.kind]) if req.kind in ("completions", "embeddings") else None
    if isinstance(prompt, list) and prompt and _is_int(prompt[0]):
        return len(prompt)
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        return max(len(p) for p in prompt)
    return None


def cannot_exceed(req: OpenAIRequest, limit: int, template_margin: int) -> bool:
    """True when the input is certainly within `limit` tokens without counting: real tokenizers never
    make more tokens than UTF-8 bytes, the raw body is at least as long as its texts, and a chat template
    adds at most `template_margin` tokens."""
    return req.raw_size + template_margin <= limit


def _text_bytes(content) -> int:
    if isinstance(content, str):
        return len(content.encode())
    if isinstance(content, list):  # content parts: count their texts
        return sum(_text_bytes(p.get("text")) for p in content if isinstance(p, dict))
    return 0


def responses_messages(body: dict) -> list[dict]:
    """A Responses API input as chat messages (what /tokenize counts): instructions as the system message, a
    string as the user's, message items with their text parts joined."""
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    given = body["input"]
    if isinstance(given, str):
        return messages + [{"role": "user", "content": given}]
    for item in given:
        content = item.get("content", item.get("output", ""))
        if isinstance(content, list):
            content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        messages.append({"role": item.get("role") if isinstance(item.get("role"), str) else "user",
                         "content": content if isinstance(content, str) else ""})
    return messages


def _messages(req: OpenAIRequest) -> list[dict] | None:
    if req.kind == "chat":
        return req.body["messages"]
    return responses_messages(req.body) if req.kind == "responses" else None


def estimate_tokens(req: OpenAIRequest) -> int:
    """Used only when the upstream has no /tokenize (external providers) or it failed."""
    messages = _messages(req)
    if messages is not None:
        texts = sum(_text_bytes(m.get("content")) for m in messages)
        return math.ceil(texts / ESTIMATE_BYTES_PER_TOKEN) + ESTIMATE_TOKENS_PER_MESSAGE * len(messages)
    prompt = req.body[INPUT_PARAM[req.kind]]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    return max(math.ceil(_text_bytes(p) / ESTIMATE_BYTES_PER_TOKEN) for p in prompts)


def tokenize_payloads(req: OpenAIRequest, upstream_model: str) -> list[dict]:
    """Bodies for the upstream's /tokenize: one for a chat (or a Responses input), one per prompt of a batch."""
    messages = _messages(req)
    if messages is not None:
        payload = {"model": upstream_model, "messages": messages}
        if req.kind == "chat" and req.body.get("tools"):
            payload["tools"] = req.body["tools"]
        return [payload]
    prompt = req.body[INPUT_PARAM[req.kind]]
    return [{"model": upstream_model, "prompt": p} for p in ([prompt] if isinstance(prompt, str) else prompt)]
