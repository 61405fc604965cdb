"""The gateway's upstream connection pool against a scripted HTTP/1.1 server on 127.0.0.1: keep-alive reuse,
the idle horizon, a kept-alive connection the server had closed, bodies until close, SSE events, failures."""
import asyncio

import pytest

from cxygpt_gateway import upstream
from cxygpt_gateway.upstream import UpstreamPool, UpstreamUnreachable
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


async def test_a_kept_alive_connection_the_server_closed_is_retried_once_on_a_new_one():
    async with ScriptedServer([OK, OK], close_after=True) as server:
        pool = UpstreamPool()
        assert await post(pool, server) == (200, b"{}")
        await asyncio.sleep(0.05)  # the server has closed its side by now; the pool may not know yet
        assert await post(pool, server) == (200, b"{}")
        assert server.connections == 2 and len(server.requests) == 2  # the request reached the server once
        pool.close()


async def test_a_request_lost_on_a_kept_alive_connection_is_sent_again_on_a_new_one():
    """The race the retry exists for: the server closes an idle connection just as a request is written on it."""
    connections, answered = [], []

    async def handle(reader, writer):
        connections.append(writer)
        first_connection = len(connections) == 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                if first_connection and answered:  # the second request on the first connection: drop it
                    break
                answered.append(head)
                writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    pool = UpstreamPool()
    url = f"http://127.0.0.1:{port}"
    for _ in range(2):
        async with await pool.post(url, "/v1/completions", b"{}", {}, 2.0) as r:
            assert (r.status, await r.read()) == (200, b"{}")
    assert len(connections) == 2 and len(answered) == 2
    pool.close()
    server.close()


async def test_idle_connections_past_the_horizon_are_not_reused(monkeypatch):
    monkeypatch.setattr(upstream, "IDLE_S", 0.0)  # vLLM closes idle keep-alive connections after 5 s
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
