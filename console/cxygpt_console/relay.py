"""The playground's way to the gateway (the browser's own key, streamed through unchanged) and its token counter."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .auth import LoginRefused
from .sources import ready_urls

MAX_BODY_BYTES = 1 << 20        # a chat the playground sends (the gateway has its own, larger, bound)
MAX_STREAMS = 32                # chats relayed at once; past it a 503 with Retry-After
RELAY_TOTAL_S = 900             # the gateway may hold a request up to its cold start timeout (600 s) and then answer
MAX_TOKENIZE = 8                # token counts at once
TOKENIZE_TIMEOUT_S = 5.0
MAX_MESSAGES = 1000
# what the browser may ask the gateway through the console: the playground's calls, nothing else
RELAYED = {("GET", "v1/models"), ("GET", "v1/limits"), ("POST", "v1/chat/completions")}
PASSED_BACK = ("content-type", "retry-after", "x-request-id", "cache-control")


def openai_error(status: int, message: str, code: str, retry_after: float | None = None) -> JSONResponse:
    """An error in the gateway's own shape, so the playground reads every refusal alike."""
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": {"message": message, "type": "console_error", "code": code, "param": None}},
                        status_code=status, headers=headers)


class TooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise TooLarge()
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge()
    return body


@dataclass
class Tokenizable:
    model: str
    messages: list[dict]


def parse_tokenize(body: bytes) -> Tokenizable:
    """{"model": name, "messages": [{"role", "content"}...]}; ValueError with what is wrong."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not data["model"]:
        raise ValueError("model: a served model name is required")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise ValueError(f"messages: a list of 1 to {MAX_MESSAGES} messages is required")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError("messages: each needs a string role and a string content")
    return Tokenizable(data["model"][:256], [{"role": m["role"], "content": m["content"]} for m in messages])


def serving_model(mds: list[dict], served: str) -> dict | None:
    """The ModelDeployment that serves a name: the oldest that claims it (the gateway routes to that one)."""
    claimants = [md for md in mds if ((md.get("spec") or {}).get("model") or {}).get("name") == served]
    return min(claimants, key=lambda md: ((md.get("metadata") or {}).get("creationTimestamp") or "",
                                          (md.get("metadata") or {}).get("name") or ""), default=None)


def engine_urls(md: dict, slices: list[dict]) -> list[str]:
    meta = md.get("metadata") or {}
    own = [s for s in slices if (s.get("metadata") or {}).get("namespace") == meta.get("namespace") and
           ((s.get("metadata") or {}).get("labels") or {}).get("kubernetes.io/service-name") == meta.get("name")]
    return ready_urls(own)


class Relayed(StreamingResponse):
    """The gateway's answer as it comes: its status, Retry-After and request id; `done` runs however the exchange
    ends (the browser may be gone before the first byte, when a generator's own cleanup would never run)."""

    def __init__(self, upstream: aiohttp.ClientResponse, done: Callable[[], None]):
        super().__init__(self._chunks(upstream), status_code=upstream.status,
                         headers={k: upstream.headers[k] for k in PASSED_BACK if k in upstream.headers})
        self.done = done

    @staticmethod
    async def _chunks(upstream: aiohttp.ClientResponse):
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError):
            pass  # the gateway went away mid-answer: the stream ends, the playground says it ended early

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.done()


class GatewayRelay:
    def __init__(self, gateway_url: str):
        self.gateway_url = gateway_url.rstrip("/")
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # set when it starts
        self.streams = 0
        self.counting = 0

    async def check_key(self, key: str) -> str | None:
        """The gateway's id of an API key (GET /v1/limits with it), None when the gateway refuses it."""
        try:
            async with self.session.get(self.gateway_url + "/v1/limits", headers={"Authorization": f"Bearer {key}"},
                                        timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 401:
                    return None
                if r.status != 200:
                    raise LoginRefused(f"the gateway cannot check keys now ({r.status})", status=503)
                return str(((await r.json()).get("key") or {}).get("id") or "") or None
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise LoginRefused(f"the gateway cannot be reached to check the key: {e!r}"[:200], status=503) from None

    async def relay(self, request: Request, path: str) -> Response:
        """The request to the gateway with the browser's Authorization only (never its cookies), the answer
        streamed back as it comes, with its status, Retry-After and request id."""
        if (request.method, path) not in RELAYED:
            return openai_error(404, f"{request.method} /{path} is not relayed by the console", "not_relayed")
        if self.streams >= MAX_STREAMS:
            return openai_error(503, f"the console relays {MAX_STREAMS} requests at once; try again shortly",
                                "console_busy", retry_after=2)
        try:
            body = await read_body(request, MAX_BODY_BYTES)
        except TooLarge:
            return openai_error(413, f"the request is larger than the console relays ({MAX_BODY_BYTES} bytes)",
                                "request_too_large")
        headers = {"Content-Type": "application/json"}
        if request.headers.get("authorization"):
            headers["Authorization"] = request.headers["authorization"]
        url = f"{self.gateway_url}/{path}" + (f"?{request.url.query}" if request.url.query else "")
        self.streams += 1
        try:
            upstream = await self.session.request(
                request.method, url, data=body or None, headers=headers,
                timeout=aiohttp.ClientTimeout(total=RELAY_TOTAL_S, sock_connect=5))
        except (aiohttp.ClientError, TimeoutError) as e:
            self.streams -= 1
            return openai_error(502, f"the console could not reach the gateway: {e!r}"[:300], "gateway_unreachable")

        def done():
            upstream.release()
            self.streams -= 1
        return Relayed(upstream, done)

    async def count_tokens(self, request: Request, mds: list[dict], slices: list[dict],
                           limits: dict | None) -> Response:
        """The input's tokens as the model's engine counts them (its /tokenize, as the gateway's 413 does), and the
        model's input limit."""
        if self.counting >= MAX_TOKENIZE:
            return openai_error(503, f"{MAX_TOKENIZE} counts are running; try again shortly", "console_busy",
                                retry_after=1)
        try:
            wanted = parse_tokenize(await read_body(request, MAX_BODY_BYTES))
        except TooLarge:
            return openai_error(413, f"the input is larger than the console counts ({MAX_BODY_BYTES} bytes)",
                                "request_too_large")
        except ValueError as e:
            return openai_error(400, str(e), "invalid_request")
        md = serving_model(mds, wanted.model)
        if md is None:
            return openai_error(404, f"no ModelDeployment serves {wanted.model!r}", "model_not_found")
        gateway = ((limits or {}).get("models") or {}).get(wanted.model) or {}
        limit = gateway.get("max_input_tokens") or ((md.get("status") or {}).get("limits") or {}).get("maxInputTokens")
        urls = engine_urls(md, slices)
        if not urls:
            return openai_error(503, f"model {wanted.model} has no ready replica to count with", "no_ready_replica",
                                retry_after=5)
        self.counting += 1
        try:
            async with self.session.post(urls[0] + "/tokenize", data=orjson.dumps(
                    {"model": wanted.model, "messages": wanted.messages}), headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=TOKENIZE_TIMEOUT_S)) as r:
                answer = await r.read()
                if r.status != 200:
                    return openai_error(502, f"the engine could not count ({r.status})", "tokenize_failed")
                count = int(orjson.loads(answer)["count"])
        except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError) as e:
            return openai_error(502, f"the engine could not count: {e!r}"[:300], "tokenize_failed")
        finally:
            self.counting -= 1
        return JSONResponse({"model": wanted.model, "count": count, "max_input_tokens": limit,
                             "over_by": max(0, count - limit) if isinstance(limit, int) else None})

