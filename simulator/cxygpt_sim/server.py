"""The aiohttp shell: vLLM's HTTP routes over the scheduler core, and the loop that runs engine steps."""
from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import protocol, text
from .config import SimConfig
from .engine import Scheduler, Sequence
from .metrics import EngineMetrics

log = logging.getLogger("cxygpt_sim")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"
MAX_CATCH_UP_S = 0.05  # how far the engine timeline may run ahead of a late event loop


class Flight:
    """A request between its handler and the engine loop; the handler waits, the loop notifies."""
    __slots__ = ("seq", "response_id", "pieces", "finish_reason", "stream", "_event")

    def __init__(self, seq: Sequence, response_id: str, pieces: list[str], finish_reason: str, stream: bool):
        self.seq, self.response_id, self.pieces = seq, response_id, pieces
        self.finish_reason, self.stream = finish_reason, stream
        self._event = asyncio.Event()

    def notify(self, done: bool) -> None:
        if self.stream or done:
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()


class Engine:
    """Owns the scheduler and runs steps in real time: begin, sleep for the step's duration, deliver tokens."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.scheduler = Scheduler(config.capacity, config.speed, seed=config.seed)
        self.metrics = EngineMetrics(self.scheduler, config.served_name)
        self.writer = text.ReplyWriter(config.text, seed=config.seed or 0)
        self.flights: dict[str, Flight] = {}
        # ids unique across restarts too, cheaper than a uuid per request
        self._ids = (f"{secrets.token_hex(6)}{n:x}" for n in itertools.count())
        self.healthy = True
        self._wake = asyncio.Event()
        self._clock = time.monotonic

    def submit(self, g: protocol.Generation, max_tokens: int, request_id: str | None) -> Flight:
        """request_id: the caller's X-Request-Id, which vLLM puts into the response id."""
        pieces, reason = self.writer.reply(g.reply_source, max_tokens, g.ignore_eos)
        seq = Sequence(id=next(self._ids), prompt_tokens=g.prompt_tokens, output_tokens=len(pieces),
                       arrived=self._clock())
        flight = self.flights[seq.id] = Flight(seq, request_id or seq.id, pieces, reason, g.stream)
        self.scheduler.submit(seq)
        self._wake.set()
        return flight

    def release(self, flight: Flight) -> None:
        """Called when the handler ends: a request that did not finish is aborted and frees its slot now."""
        self.flights.pop(flight.seq.id, None)
        if flight.seq.state != "finished":
            self.scheduler.cancel(flight.seq)
            self.metrics.record_abort(flight.seq, self._clock())

    async def run(self) -> None:
        try:
            await self._steps()
        except Exception:
            # a bug here would hang every request: fail /health so the pod is restarted
            self.healthy = False
            log.exception("engine loop failed")
            raise

    async def _steps(self) -> None:
        deadline = None
        while True:
            if not self.scheduler.has_work:
                self._wake.clear()
                await self._wake.wait()
                deadline = None
            now = self._clock()
            step = self.scheduler.begin_step(now)
            if not self.scheduler.running:
                continue  # everything was cancelled meanwhile
            # Decode steps follow each other on the engine's own timeline, so the time this process spends
            # between steps (CPU contention, scrapes) does not stretch the configured ITL; a step that admits
            # requests starts now, so their TTFT is never shortened.
            start = now if deadline is None or step.admitted else max(deadline, now - MAX_CATCH_UP_S)
            deadline = start + step.duration_s
            await asyncio.sleep(max(deadline - self._clock(), 0))
            now = self._clock()
            progress = self.scheduler.end_step(now)
            self.metrics.record_step(progress, now)
            for p in progress:
                flight = self.flights.get(p.seq.id)
                if flight:
                    if p.done:
                        self.metrics.record_finish(flight.finish_reason)
                    flight.notify(p.done)


def _json(data, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(e: protocol.ApiError) -> web.Response:
    return _json(e.body(), e.status)


async def _body(request: web.Request):
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise protocol.invalid_json(e) from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None}


class Api:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.config = engine.config

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.engine.healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.engine.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        c = self.config
        cards = [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": c.model,
                  "parent": None, "max_model_len": c.max_model_len, "permission": []}
                 for name in c.served_model_names]
        return _json({"object": "list", "data": cards})

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            t = protocol.parse_tokenize(await _body(request), self.config.served_model_names)
        except protocol.ApiError as e:
            return _error(e)
        ids = text.token_ids(t.prompt_text)
        return _json({"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids,
                      "token_strs": text.token_pieces(ids) if t.return_token_strs else None})

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            ids = protocol.parse_detokenize(await _body(request), self.config.served_model_names)
        except protocol.ApiError as e:
            return _error(e)
        return _json({"prompt": text.detokenize(ids)})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await _body(request)
            parse = protocol.parse_chat if chat else protocol.parse_completion
            g = parse(body, self.config.served_model_names)
            max_tokens = protocol.output_budget(g, self.config.max_model_len)
        except protocol.ApiError as e:
            return _error(e)
        flight = self.engine.submit(g, max_tokens, request.headers.get("X-Request-Id"))
        try:
            if g.stream:
                return await self._stream(request, flight, g, chat)
            while flight.seq.state != "finished":
                await flight.wait()
            return _json(self._whole(flight, g, chat))
        finally:
            self.engine.release(flight)

    def _whole(self, flight: Flight, g: protocol.Generation, chat: bool) -> dict:
        content = "".join(flight.pieces)
        usage = _usage(g.prompt_tokens, len(flight.pieces))
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content, "refusal": None,
                                              "tool_calls": [], "reasoning_content": None},
                      "logprobs": None, "finish_reason": flight.finish_reason, "stop_reason": None}
            return {"id": f"chatcmpl-{flight.response_id}", "object": "chat.completion", "created": int(time.time()),
                    "model": self.config.served_name, "choices": [choice], "usage": usage, "prompt_logprobs": None}
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": flight.finish_reason,
                  "stop_reason": None, "prompt_logprobs": None}
        return {"id": f"cmpl-{flight.response_id}", "object": "text_completion", "created": int(time.time()),
                "model": self.config.served_name, "choices": [choice], "usage": usage}

    async def _stream(self, request: web.Request, flight: Flight, g: protocol.Generation,
                      chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        # Every chunk is the same JSON around one piece of text: build the bytes once, splice per token.
        if chat:
            head = orjson.dumps({"id": f"chatcmpl-{flight.response_id}", "object": "chat.completion.chunk",
                                 "created": int(time.time()), "model": self.config.served_name})[:-1]
            opening = b"data: " + head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},' \
                                         b'"logprobs":null,"finish_reason":null}]}\n\n'
            before, after = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":', b'},"logprobs":null,'
        else:
            head = orjson.dumps({"id": f"cmpl-{flight.response_id}", "object": "text_completion",
                                 "created": int(time.time()), "model": self.config.served_name})[:-1]
            opening = b""
            before, after = b"data: " + head + b',"choices":[{"index":0,"text":', b',"logprobs":null,'
        unfinished = b'"finish_reason":null,"stop_reason":null}]}\n\n'
        finished = b'"finish_reason":"' + flight.finish_reason.encode() + b'","stop_reason":null}]}\n\n'
        seq, pieces, sent = flight.seq, flight.pieces, 0
        last = len(pieces) - 1
        try:
            while sent < len(pieces):
                await flight.wait()
                ready = seq.generated
                if ready <= sent:
                    continue
                out = [opening] if sent == 0 else []
                out.extend(before + orjson.dumps(pieces[i]) + after + (finished if i == last else unfinished)
                           for i in range(sent, ready))
                sent = ready
                # all tokens of a step go out in one write (with instant decode that is the whole reply)
                await response.write(b"".join(out))
            tail = []
            if g.include_usage:
                tail.append(b"data: " + head + b',"choices":[],"usage":' +
                            orjson.dumps(_usage(g.prompt_tokens, len(pieces))) + b"}\n\n")
            tail.append(DONE)
            await response.write(b"".join(tail))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left; release() aborts the request
        return response


def _require_api_key(key: str):
    expected = f"Bearer {key}"

    @web.middleware
    async def authenticate(request: web.Request, handler):
        if request.path.startswith("/v1") and request.headers.get("Authorization") != expected:
            return _json({"error": "Unauthorized"}, 401)
        return await handler(request)
    return authenticate


@web.middleware
async def bad_requests_stay_small(request: web.Request, handler):
    """Unknown routes and wrong methods answer in vLLM's error shape instead of aiohttp's HTML."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _json(protocol.ApiError(e.status, e.reason, e.reason.replace(" ", "") + "Error").body(), e.status)


ENGINE = web.AppKey("engine", Engine)


def create_app(config: SimConfig) -> web.Application:
    middlewares = [bad_requests_stay_small] + ([_require_api_key(config.api_key)] if config.api_key else [])
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    engine = app[ENGINE] = Engine(config)
    api = Api(engine)
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/v1/models", api.models)
    app.router.add_post("/tokenize", api.tokenize)
    app.router.add_post("/detokenize", api.detokenize)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)

    async def engine_loop(app: web.Application):
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    app.cleanup_ctx.append(engine_loop)
    return app
