"""A fast fake OpenAI upstream for relay benchmarks: raw asyncio protocol + httptools on uvloop, answers
prebuilt per (kind, stream, usage): N chunks in one write, or one chunk every --itl-ms after --ttft-ms.
Serves /health, /v1/models and /tokenize so gateways and routers accept it as a vLLM engine."""
from __future__ import annotations

import argparse
import asyncio
import re

import httptools
import orjson

MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')


def _http(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type + b"\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def chunk(model: str, kind: str, i: int) -> bytes:
    if kind == "chat":
        data = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "logprobs": None, "finish_reason": None}]}
    else:
        data = {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": model,
                "choices": [{"index": 0, "text": f" tok{i}", "logprobs": None, "finish_reason": None}]}
    return b"data: " + orjson.dumps(data) + b"\n\n"


def usage(n: int) -> dict:
    return {"prompt_tokens": 16, "completion_tokens": n, "total_tokens": 16 + n}


class Answers:
    def __init__(self, model: str, tokens: int):
        self.model, self.tokens = model, tokens
        self.whole = {k: _http(b"200 OK", orjson.dumps(self._whole(k, tokens))) for k in ("chat", "completions")}
        self.events = {k: [chunk(model, k, i) for i in range(tokens)] for k in ("chat", "completions")}
        self.usage_event = b"data: " + orjson.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                                     "created": 1, "model": model, "choices": [],
                                                     "usage": usage(tokens)}) + b"\n\n"
        self.head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        self.health = _http(b"200 OK", b"")
        self.models = _http(b"200 OK", orjson.dumps({"object": "list", "data": [
            {"id": model, "object": "model", "created": 1, "owned_by": "fake", "max_model_len": 32768}]}))
        self.tokenize = _http(b"200 OK", b'{"count":16,"max_model_len":32768,"tokens":[]}')
        self.not_found = _http(b"404 Not Found",
                               b'{"error":{"message":"not found","type":"NotFoundError","param":null,"code":404}}')

    def _whole(self, kind: str, n: int) -> dict:
        text = "".join(f" tok{i}" for i in range(n))
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                  if kind == "chat" else {"index": 0, "text": text, "finish_reason": "length"})
        return {"id": "fake", "object": "chat.completion" if kind == "chat" else "text_completion", "created": 1,
                "model": self.model, "choices": [choice], "usage": usage(n)}


def framed(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n" % len(data) + data + b"\r\n"


class FakeProtocol(asyncio.Protocol):
    def __init__(self, answers: Answers, ttft_s: float, itl_s: float):
        self.answers, self.ttft_s, self.itl_s = answers, ttft_s, itl_s
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self):
        self.url, self.body = b"", []

    def on_url(self, url):
        self.url += url

    def on_body(self, body):
        self.body.append(body)

    def on_message_complete(self):
        a, url = self.answers, self.url
        if url.endswith(b"/completions"):
            kind = "chat" if url.endswith(b"/chat/completions") else "completions"
            body = b"".join(self.body)
            stream = b'"stream":true' in body or b'"stream": true' in body
            if not stream:
                self.transport.write(a.whole[kind])
                return
            with_usage = b'"include_usage":true' in body or b'"include_usage": true' in body
            events = a.events[kind]
            m = MAX_TOKENS.search(body)
            if m:
                events = events[:max(1, min(int(m.group(1)), len(events)))]
            tail = (a.usage_event if with_usage else b"") + b"data: [DONE]\n\n"
            if self.itl_s <= 0 and self.ttft_s <= 0:
                self.transport.write(a.head + framed(b"".join(events) + tail) + b"0\r\n\r\n")
            else:
                self.transport.write(a.head)
                asyncio.ensure_future(self._paced(events, tail))
        elif url.startswith(b"/health"):
            self.transport.write(a.health)
        elif url.startswith(b"/v1/models"):
            self.transport.write(a.models)
        elif url.startswith(b"/tokenize"):
            self.transport.write(a.tokenize)
        else:
            self.transport.write(a.not_found)

    async def _paced(self, events: list[bytes], tail: bytes):
        """Token i is due at ttft + i × itl from the request, like an engine's step clock: a late wake-up (this
        process shares its cores with the front and the load generator) delays one token, not all that follow."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.ttft_s
        for i, event in enumerate(events):
            await asyncio.sleep(max(0.0, due - loop.time()))
            if self.transport.is_closing():
                return
            self.transport.write(framed(event + (tail if i == len(events) - 1 else b"")))
            due += self.itl_s
        self.transport.write(b"0\r\n\r\n")


async def serve(host: str, port: int, model: str, tokens: int, ttft_ms: float, itl_ms: float):
    answers = Answers(model, tokens)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeProtocol(answers, ttft_ms / 1000, itl_ms / 1000), host, port,
                                      backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cxygpt_bench.fakeup", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model", default="qwen3-14b")
    ap.add_argument("--tokens", type=int, default=64, help="chunks per stream and tokens per answer (max_tokens cuts)")
    ap.add_argument("--ttft-ms", type=float, default=0.0)
    ap.add_argument("--itl-ms", type=float, default=0.0)
    a = ap.parse_args(argv)
    import uvloop
    uvloop.run(serve(a.host, a.port, a.model, a.tokens, a.ttft_ms, a.itl_ms))


if __name__ == "__main__":
    main()
