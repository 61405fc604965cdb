"""The aiohttp shell: vLLM's HTTP routes over the scheduler core, and the loop that runs engine steps."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Sequence as Seq
from contextlib import asynccontextmanager

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import embeddings, protocol, replies, responses_api, text
from .adapters import AdapterError
from .config import MAX_ADAPTERS, SimConfig
from .engine import Scheduler, Sequence
from .lora import Lora
from .metrics import EngineMetrics
from .models import Adapter, Models, load_error, read_adapter

log = logging.getLogger("cxygpt_sim")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"
MAX_CATCH_UP_S = 0.05  # how far the engine timeline may run ahead of a late event loop


class Flight:
    """A request between its handler and the engine loop; the handler waits, the loop notifies."""
    __slots__ = ("seq", "response_id", "finish_reason", "stream", "_event")

    def __init__(self, seq: Sequence, response_id: str, finish_reason: str, stream: bool):
        self.seq, self.response_id = seq, response_id
        self.finish_reason, self.stream = finish_reason, stream
        self._event = asyncio.Event()

    def notify(self, done: bool) -> None:
        if self.stream or done:
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()


class Engine:
    """Owns the scheduler and runs steps in real time: begin, sleep for the step's duration, deliver tokens. Between
    steps it runs the calls vLLM's engine core runs there (an adapter's load), which the steps wait for."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.scheduler = Scheduler(config.capacity, config.speed, seed=config.seed, lora=config.lora)
        self.metrics = EngineMetrics(self.scheduler, config.served_name,
                                     max_loras=config.lora.max_loras if config.lora else None)
        self.flights: dict[str, Flight] = {}
        # ids unique across restarts too, cheaper than a uuid per request
        self._ids = (f"{secrets.token_hex(6)}{n:x}" for n in itertools.count())
        self.healthy = True
        self._wake = asyncio.Event()
        self._clock = time.monotonic
        self._calls: deque[tuple[int, str, str, bool, asyncio.Future]] = deque()

    async def add_lora(self, lora_id: int, name: str, path: str, inplace: bool) -> Lora:
        """vLLM's add_lora, run by the engine loop between steps: the adapter is read (downloaded first if need be)
        and checked, and its weights read at the configured rate, while no step runs. AdapterError if refused."""
        done = asyncio.get_running_loop().create_future()
        self._calls.append((lora_id, name, path, inplace, done))
        self._wake.set()
        return await done

    async def _load_lora(self, lora_id: int, name: str, path: str, inplace: bool, done: asyncio.Future) -> None:
        try:
            lora = await asyncio.to_thread(read_adapter, self.config, lora_id, name, path, os.environ)
            await asyncio.sleep(self.scheduler.load_lora(lora, inplace))
        except Exception as e:  # as vLLM's engine core: any failure is the call's answer, the steps go on
            if not isinstance(e, AdapterError):
                log.exception("loading LoRA adapter %s failed", name)
            if not done.done():  # the caller may have left: the engine's work is done all the same
                done.set_exception(e if isinstance(e, AdapterError) else AdapterError(str(e)))
            return
        if not done.done():
            done.set_result(lora)

    def submit(self, prompt_ids: list[int], output_tokens: int, request_id: str | None, *,
               finish_reason: str, stream: bool, lora: Lora | None = None) -> Flight:
        """prompt_ids: the rendered prompt's token ids (the prefix cache hashes them); output_tokens: the reply's
        length; request_id: the caller's X-Request-Id, which vLLM puts into the response id; finish_reason: what
        the reply ends with, counted in vllm:request_success_total; lora: the adapter it runs with."""
        seq = Sequence(id=next(self._ids), prompt_ids=prompt_ids, output_tokens=output_tokens, arrived=self._clock(),
                       lora=lora)
        flight = self.flights[seq.id] = Flight(seq, request_id or seq.id, finish_reason, stream)
        if self.config.speed.dispatch_s:
            asyncio.get_running_loop().call_later(self.config.speed.dispatch_s, self._schedule, seq)
        else:
            self._schedule(seq)
        return flight

    def _schedule(self, seq: Sequence) -> None:
        """The request reaches the scheduler (after its dispatch), unless it was aborted meanwhile."""
        if seq.state == "new":
            self.scheduler.submit(seq)
            self._wake.set()

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
            if self._calls:
                await self._load_lora(*self._calls.popleft())
                deadline = None  # the steps waited: the next one starts now
                continue
            if not self.scheduler.has_work:
                self._wake.clear()
                await self._wake.wait()
                deadline = None
                continue
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
            self.metrics.record_step(step, progress, now)
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


def _lora_error(e: protocol.ApiError) -> web.Response:
    """The LoRA endpoints' errors, with vLLM 0.33's sanitizing (paths become <path>) and no param (its handlers
    build them from messages only, but for pydantic's validation errors)."""
    param = e.param if e.err_type == "Bad Request" else None
    return _json(protocol.ApiError(e.status, protocol.sanitize_message(e.message), e.err_type, param).body(), e.status)


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
    def __init__(self, engine: Engine, models: Models):
        self.engine, self.models = engine, models
        self.config = engine.config
        self.writer = text.ReplyWriter(engine.config.text, seed=engine.config.seed or 0)
        self._loading: dict[str, list] = {}  # name -> [lock, users]: one load or unload of a name at a time

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.engine.healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.engine.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": self.models.cards()})

    async def model(self, request: web.Request) -> web.Response:
        card = self.models.card(request.match_info["model"])
        if card is None:
            return _error(protocol.unknown_model(request.match_info["model"], self.models.served))
        return _json(card)

    @asynccontextmanager
    async def _one_at_a_time(self, name: str):
        """vLLM's lock per adapter name around a load or an unload (kept only while someone holds or waits)."""
        entry = self._loading.setdefault(name, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._loading[name]

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        """POST /v1/load_lora_adapter: checked as vLLM's API server does, then loaded by the engine between steps."""
        try:
            protocol.check_json_media_type(request.headers.get("Content-Type", ""))
            body = await _body(request)
            name = protocol.parse_load_lora(body, self.models.served).name
            async with self._one_at_a_time(name):
                load = protocol.parse_load_lora(body, self.models.served)  # again: another may have loaded it
                if name not in self.models.adapters and len(self.models.adapters) >= MAX_ADAPTERS:
                    raise protocol.ApiError(400, f"{MAX_ADAPTERS} adapters are loaded, the simulator's bound; "
                                                 "unload one first", "InvalidUserInput")
                try:
                    lora = await self.engine.add_lora(self.models.next_id(name), name, load.path, load.load_inplace)
                except AdapterError as e:
                    raise load_error(e) from None
                # a runtime load names no base model: the first served name is the parent (an in-place reload too)
                self.models.adapters[name] = Adapter(name, load.path, self.models.parent_of(None), lora)
        except protocol.ApiError as e:
            return _lora_error(e)
        log.info("Loaded new LoRA adapter: name '%s', path '%s'", name, load.path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        """POST /v1/unload_lora_adapter: new requests may no longer name it; those running finish with it (vLLM
        0.33 forgets the name only, the engine keeps the adapter until its cache evicts it)."""
        try:
            protocol.check_json_media_type(request.headers.get("Content-Type", ""))
            body = await _body(request)
            name = protocol.parse_unload_lora(body, self.models.served)
            async with self._one_at_a_time(name):
                protocol.parse_unload_lora(body, self.models.served)
                del self.models.adapters[name]
        except protocol.ApiError as e:
            return _lora_error(e)
        log.info("Removed LoRA adapter: name '%s'", name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            t = protocol.parse_tokenize(await _body(request), self.models.served)
        except protocol.ApiError as e:
            return _error(e)
        ids = text.token_ids(t.prompt_text)
        return _json({"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids,
                      "token_strs": text.token_pieces(ids) if t.return_token_strs else None})

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            ids = protocol.parse_detokenize(await _body(request), self.models.served)
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
            g = parse(body, self.models.served)
            max_tokens = protocol.output_budget(g, self.config.max_model_len)
        except protocol.ApiError as e:
            return _error(e)
        choices = [replies.plan(g, i, max_tokens, self.writer) for i in range(g.n)]
        request_id = request.headers.get("X-Request-Id")
        # the adapter and the name the answer carries, as they are now (an unload meanwhile changes neither)
        lora, model = self.models.lora_of(g.model), self.models.response_name(g.model)
        # n sequences of the same prompt, as vLLM fans a request out (the prefix cache shares their blocks)
        flights = [self._submit(g.prompt_ids, c, g.stream, request_id, lora) for c in choices]
        try:
            if g.stream:
                return await self._stream(request, flights, choices, g, chat, model)
            for flight in flights:
                while flight.seq.state != "finished":
                    await flight.wait()
            return _json(self._whole(flights[0].response_id, choices, g, chat, model))
        finally:
            for flight in flights:
                self.engine.release(flight)

    def _whole(self, response_id: str, choices: list[replies.Choice], g: protocol.Generation, chat: bool,
               model: str) -> dict:
        usage = _usage(g.prompt_tokens, sum(len(c.ids) for c in choices))
        created = int(time.time())
        if chat:
            return {"id": f"chatcmpl-{response_id}", "object": "chat.completion", "created": created, "model": model,
                    "choices": [_chat_choice(i, c, g) for i, c in enumerate(choices)], "usage": usage,
                    "prompt_logprobs": None}
        out = []
        for i, c in enumerate(choices):
            head = g.prompt_text if g.echo else ""
            logprobs = None if g.logprobs is None else replies.completion_logprobs(c.ids, 0, g.logprobs, len(head))
            out.append({"index": i, "text": head + "".join(c.pieces), "logprobs": logprobs,
                        "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "prompt_logprobs": None})
        return {"id": f"cmpl-{response_id}", "object": "text_completion", "created": created, "model": model,
                "choices": out, "usage": usage}

    async def _stream(self, request: web.Request, flights: list[Flight], choices: list[replies.Choice],
                      g: protocol.Generation, chat: bool, model: str) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        response_id = flights[0].response_id
        # every chunk is the same JSON around one choice: build the head once, splice each choice in
        head = b"data: " + orjson.dumps(
            {"id": f"{'chatcmpl' if chat else 'cmpl'}-{response_id}",
             "object": "chat.completion.chunk" if chat else "text_completion",
             "created": int(time.time()), "model": model})[:-1]
        sent = [0] * len(flights)
        try:
            while any(s < len(c.pieces) for s, c in zip(sent, choices)):
                await _any_progress(flights)
                out: list[bytes] = []
                for i, (flight, c) in enumerate(zip(flights, choices)):
                    ready = flight.seq.generated
                    for pos in range(sent[i], ready):
                        delta = _chat_delta(i, c, pos, g) if chat else _completion_delta(i, c, pos, g)
                        out.extend(head + b',"choices":[' + orjson.dumps(d) + b"]}\n\n" for d in delta)
                    sent[i] = max(sent[i], ready)
                if out:
                    # all tokens of a step go out in one write (with instant decode that is the whole reply)
                    await response.write(b"".join(out))
            tail = []
            if g.include_usage:
                tail.append(head + b',"choices":[],"usage":' +
                            orjson.dumps(_usage(g.prompt_tokens, sum(len(c.ids) for c in choices))) + b"}\n\n")
            tail.append(DONE)
            await response.write(b"".join(tail))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left; release() aborts the request
        return response


    def _submit(self, prompt_ids: list[int], c: replies.Choice, stream: bool, request_id: str | None,
                lora: Lora | None) -> Flight:
        # the engine knows only stop and length (a tool call is the parser's reading of a stopped sequence)
        return self.engine.submit(prompt_ids, len(c.pieces), request_id, lora=lora,
                                  finish_reason="length" if c.finish_reason == "length" else "stop", stream=stream)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        try:
            r = protocol.parse_responses(await _body(request), self.models.served)
            max_tokens = protocol.output_budget(r.generation, self.config.max_model_len)
        except protocol.ApiError as e:
            return _error(e)
        g = r.generation
        choice = replies.plan(g, 0, max_tokens, self.writer)
        flight = self._submit(g.prompt_ids, choice, g.stream, request.headers.get("X-Request-Id"),
                              self.models.lora_of(g.model))
        base = responses_api.base(f"resp_{flight.response_id}", int(time.time()), self.models.response_name(g.model),
                                  r.echoed, max_tokens)
        item_id = f"msg_{flight.seq.id}"
        # the reply is planned, so its final form is known before the engine has generated it
        done = responses_api.finished(base, item_id, "".join(choice.pieces), choice.finish_reason == "length",
                                      g.prompt_tokens, len(choice.ids))
        try:
            if g.stream:
                return await self._response_events(request, flight, choice, base, done, item_id)
            while flight.seq.state != "finished":
                await flight.wait()
            return _json(done)
        finally:
            self.engine.release(flight)

    async def _response_events(self, request: web.Request, flight: Flight, choice: replies.Choice, base: dict,
                               done: dict, item_id: str) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        events = responses_api.EventStream(item_id)
        try:
            await response.write(events.start(responses_api.response(base, status="in_progress", output=[],
                                                                     usage=None)))
            sent = 0
            while sent < len(choice.pieces):
                await flight.wait()
                ready = flight.seq.generated
                # a piece is empty while a character's bytes are still incomplete: no delta for it
                out = b"".join(events.delta(p) for p in choice.pieces[sent:ready] if p)
                sent = max(sent, ready)
                if out:
                    await response.write(out)
            await response.write(events.finish(done))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client left; release() aborts the request
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            e = protocol.parse_embeddings(await _body(request), self.models.served, self.config.max_model_len)
        except protocol.ApiError as error:
            return _error(error)
        # each input is a prefill-only request, as vLLM fans a batch out; the engine has no sequence without an
        # output token, so each is one step longer than its prefill (and counts one generation token)
        nothing = replies.Choice([""], [], "stop", None)
        lora, model = self.models.lora_of(e.model), self.models.response_name(e.model)
        flights = [self._submit(ids, nothing, False, request.headers.get("X-Request-Id"), lora) for ids in e.inputs]
        try:
            for flight in flights:
                while flight.seq.state != "finished":
                    await flight.wait()
        finally:
            for flight in flights:
                self.engine.release(flight)
        vectors = [embeddings.encode(embeddings.vector(ids, e.dimensions), e.encoding_format) for ids in e.inputs]
        return _json(embeddings.answer(flights[0].response_id, int(time.time()), model, vectors,
                                       sum(len(ids) for ids in e.inputs)))


async def _any_progress(flights: list[Flight]) -> None:
    if len(flights) == 1:
        await flights[0].wait()
        return
    waits = [asyncio.ensure_future(f.wait()) for f in flights if f.seq.state != "finished"]
    if not waits:
        return
    _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in pending:
        w.cancel()


def _tool_call(c: replies.Choice) -> dict:
    return {"id": c.call_id, "type": "function", "function": {"name": c.tool, "arguments": "".join(c.pieces)}}


def _chat_choice(i: int, c: replies.Choice, g: protocol.Generation) -> dict:
    logprobs = None if g.logprobs is None else {"content": replies.chat_logprobs(c.ids, 0, g.logprobs),
                                                "refusal": None}
    message = {"role": "assistant", "content": None if c.tool else "".join(c.pieces), "refusal": None,
               "tool_calls": [_tool_call(c)] if c.tool else [], "reasoning_content": None}
    return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason}


def _chat_delta(i: int, c: replies.Choice, pos: int, g: protocol.Generation) -> list[dict]:
    """The chunk choices for output token pos of choice i: an opening one first, as vLLM streams."""
    out = []
    if pos == 0:
        opening: dict[str, object] = {"role": "assistant", "content": ""}
        if c.tool:
            # vLLM's streamed tool call: id, type and name first, then the arguments piece by piece
            opening = {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": c.call_id, "type": "function", "function": {"name": c.tool, "arguments": ""}}]}
        out.append({"index": i, "delta": opening, "logprobs": None, "finish_reason": None})
    piece = c.pieces[pos]
    delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} if c.tool else {"content": piece}
    last = pos == len(c.pieces) - 1
    logprobs = None if g.logprobs is None else {"content": replies.chat_logprobs(c.ids[:pos + 1], pos, g.logprobs)}
    out.append({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": c.finish_reason if last else None,
                "stop_reason": c.stop_reason if last else None})
    return out


def _completion_delta(i: int, c: replies.Choice, pos: int, g: protocol.Generation) -> list[dict]:
    head = g.prompt_text if g.echo and pos == 0 else ""  # echo: the prompt comes with the first token
    offset = len(g.prompt_text if g.echo else "") + len("".join(c.pieces[:pos]))
    logprobs = None if g.logprobs is None else replies.completion_logprobs(c.ids[:pos + 1], pos, g.logprobs, offset)
    last = pos == len(c.pieces) - 1
    return [{"index": i, "text": head + c.pieces[pos], "logprobs": logprobs,
             "finish_reason": c.finish_reason if last else None, "stop_reason": c.stop_reason if last else None}]


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
MODELS = web.AppKey("models", Models)


def create_app(config: SimConfig, adapters: Seq[Adapter] = ()) -> web.Application:
    """The server; `adapters`: those --lora-modules loaded at start (read already), in order."""
    middlewares = [bad_requests_stay_small] + ([_require_api_key(config.api_key)] if config.api_key else [])
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    engine = app[ENGINE] = Engine(config)
    models = app[MODELS] = Models(config, adapters)
    for adapter in adapters:
        engine.scheduler.load_lora(adapter.lora)
    api = Api(engine, models)
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/v1/models", api.list_models)
    app.router.add_get("/v1/models/{model}", api.model)
    if config.runtime_lora_updating:
        log.warning("LoRA dynamic loading & unloading is enabled in the API server. "
                    "This should ONLY be used for local development!")
        app.router.add_post("/v1/load_lora_adapter", api.load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", api.unload_lora_adapter)
    app.router.add_post("/tokenize", api.tokenize)
    app.router.add_post("/detokenize", api.detokenize)
    # vLLM registers the routes of the model's tasks only: the other runner's routes are a 404
    if config.runner == "pooling":
        app.router.add_post("/v1/embeddings", api.embeddings)
    else:
        app.router.add_post("/v1/chat/completions", api.chat)
        app.router.add_post("/v1/completions", api.completions)
        app.router.add_post("/v1/responses", api.responses)

    async def engine_loop(app: web.Application):
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()

    app.cleanup_ctx.append(engine_loop)
    return app
