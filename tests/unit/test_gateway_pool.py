"""The gateway's upstream connection pool against a scripted HTTP/1.1 server on 127.0.0.1: keep-alive reuse,
the idle horizon, a kept-alive connection the server had closed, no replay, bodies until close, SSE events and
their line endings, failures."""
import asyncio

import pytest

from cxygpt_gateway.upstream import pool as pool_module
from cxygpt_gateway.upstream.pool import UpstreamPool, UpstreamUnreachable
from harness import free_port

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class ScriptedServer:
    """Answers each request with the next scripted reply; `close_after` closes the connection after replying."""

    def __init__(self, replies, close_after=False):
        self.replies, self.close_after = list(replies), close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                self.requests.append(head + await reader.readexactly(length))
                writer.write(self.replies.pop(0))
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def __aenter__(self):
        self.port = free_port()
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


async def post(pool, server, body=b"{}"):
    async with await pool.post(server.url, "/v1/completions", body, {"Content-Type": "application/json"}, 2.0) as r:
        return r.status, await r.read()


async def test_keep_alive_connections_are_reused():
    async with ScriptedServer([OK, OK, OK]) as server:
        pool = UpstreamPool()
        for _ in range(3):
            assert await post(pool, server) == (200, b"{}")
        assert server.connections == 1
        assert server.requests[0].startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        pool.close()


async def until(predicate, timeout=2.0):
    """Wait for the event itself (the loop runs the protocol callbacks meanwhile), within a deadline."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0)


async def test_a_kept_alive_connection_the_server_closed_is_not_reused():
    async with ScriptedServer([OK, OK], close_after=True) as server:
        pool = UpstreamPool()
        assert await post(pool, server) == (200, b"{}")
        [idle] = pool._idle_conns[("http", "127.0.0.1", server.port)]
        await until(lambda: idle.closed)  # the server's FIN has reached the pool
        assert await post(pool, server) == (200, b"{}")
        assert server.connections == 2 and len(server.requests) == 2  # the request reached the server once
        pool.close()


async def test_a_request_lost_on_a_kept_alive_connection_is_never_sent_again():
    """The server reads a request on a kept-alive connection and closes without answering: it may have started
    generating, so the pool must not send it again (RFC 9110 9.2.2); the caller gets the error."""
    connections, requests = [], []

    async def handle(reader, writer):
        connections.append(writer)
        try:
            while True:
                requests.append(await reader.readuntil(b"\r\n\r\n"))
                await reader.readexactly(2)
                if len(requests) == 2:  # read, then dropped
                    break
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    pool = UpstreamPool()
    url = f"http://127.0.0.1:{port}"
    async with await pool.post(url, "/v1/completions", b"{}", {}, 2.0) as r:
        assert (r.status, await r.read()) == (200, b"{}")
    with pytest.raises(ConnectionError):
        await pool.post(url, "/v1/completions", b"{}", {}, 2.0)
    await asyncio.sleep(0.1)  # room for a replay that must not come
    assert len(connections) == 1 and len(requests) == 2
    pool.close()
    server.close()


async def test_idle_connections_past_the_horizon_are_not_reused(monkeypatch):
    monkeypatch.setattr(pool_module, "IDLE_S", 0.0)  # vLLM closes idle keep-alive connections after 5 s
    async with ScriptedServer([OK, OK]) as server:
        pool = UpstreamPool()
        await post(pool, server)
        await post(pool, server)
        assert server.connections == 2
        pool.close()


async def test_a_body_without_length_is_read_until_the_connection_closes():
    reply = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    async with ScriptedServer([reply], close_after=True) as server:
        pool = UpstreamPool()
        assert await post(pool, server) == (200, b"all of it")
        pool.close()


async def test_sse_events_come_whole_and_an_unterminated_last_event_is_completed():
    stream = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"1a\r\ndata: {\"a\": 1}\n\ndata: {\"b\"\r\n"
              b"6\r\n: 2}\n\n\r\n"
              b"c\r\ndata: [DONE]\r\n0\r\n\r\n")
    async with ScriptedServer([stream]) as server:
        pool = UpstreamPool()
        async with await pool.post(server.url, "/v1/chat/completions", b"{}", {}, 2.0) as r:
            events = []
            while (batch := await r.events()) is not None:
                events.append(batch)
        assert b"".join(events) == b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
        assert all(e.endswith(b"\n\n") for e in events)
        pool.close()


async def serve_pieces(pieces):
    """A server that answers one request with a stream read until close, written piece by piece (paced, so the
    pieces tend to arrive as separate reads); returns its URL and the server."""
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.close()
    port = free_port()
    return f"http://127.0.0.1:{port}", await asyncio.start_server(handle, "127.0.0.1", port)


@pytest.mark.parametrize("ending", [b"\r\n", b"\r", b"\n"], ids=["crlf", "cr", "lf"])
async def test_sse_line_endings_crlf_cr_and_lf_end_events_alike(ending):
    lines = [b"data: {\"a\": 1}", b"", b"data: {\"b\": 2}", b"", b"data: [DONE]", b""]
    raw = b"".join(line + ending for line in lines)
    cut = raw.index(ending + ending) + 1  # between the CR and the LF of a CRLF, for CRLF
    url, server = await serve_pieces([raw[:cut], raw[cut:cut + 7], raw[cut + 7:]])
    pool = UpstreamPool()
    async with await pool.post(url, "/v1/chat/completions", b"{}", {}, 2.0) as r:
        events = []
        async with asyncio.timeout(2):  # the bug this guards: no event ever ended, the buffer grew until a 504
            while (batch := await r.events()) is not None:
                events.append(batch)
    assert b"".join(events) == b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    assert all(e.endswith(b"\n\n") for e in events) and len(events) >= 2
    pool.close()
    server.close()


async def test_an_unreachable_upstream_is_reported_as_such():
    pool = UpstreamPool()
    with pytest.raises(UpstreamUnreachable):
        await pool.post(f"http://127.0.0.1:{free_port()}", "/v1/completions", b"{}", {}, 2.0)


async def test_a_connection_closed_before_any_answer_on_a_new_connection_fails():
    async def slam(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
    port = free_port()
    server = await asyncio.start_server(slam, "127.0.0.1", port)
    pool = UpstreamPool()
    with pytest.raises(ConnectionError):
        await pool.post(f"http://127.0.0.1:{port}", "/v1/completions", b"{}", {}, 2.0)
    server.close()
