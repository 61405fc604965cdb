"""The gateway's own HTTP/1.1 server for the relayed routes, on raw sockets: keep-alive, pipelining, 100-continue,
chunked request bodies, body limits, Connection: close, HTTP/1.0, and requests it cannot read."""
from __future__ import annotations

import json
import socket

import pytest
from test_gateway_support import start_gateway, start_sim

BODY_LIMIT = 4096
CHAT = json.dumps({"model": "qwen3-14b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).encode()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    sim = start_sim(tmp, itl_ms=0)
    gw = start_gateway(tmp, {"max_body_bytes": BODY_LIMIT,
                             "models": [{"name": "qwen3-14b", "url": sim.url, "profile": "DEV_32G",
                                         "limits": {"rate_qps": 1000}}]})
    yield gw
    gw.stop()
    sim.stop()


def connect(gateway) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    return sock, sock.makefile("rb")


def post(path: str = "/v1/chat/completions", body: bytes = CHAT, *, headers: dict | None = None,
         version: str = "1.1") -> bytes:
    head = {"Host": "gw", "Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    lines = [f"POST {path} HTTP/{version}"] + [f"{k}: {v}" for k, v in head.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(f) -> tuple[int, dict[str, str], bytes]:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while (size := int(f.readline().strip(), 16)) > 0:
            body += f.read(size)
            f.readline()
        f.readline()
    else:
        body = f.read(int(headers.get("content-length", 0)))
    return status, headers, body


def closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_keep_alive_and_pipelined_requests_are_answered_in_order(gateway):
    sock, f = connect(gateway)
    with sock:
        sock.sendall(post(headers={"X-Request-Id": "first"}))
        status, headers, _ = read_response(f)
        assert (status, headers["x-request-id"]) == (200, "first")
        sock.sendall(post(headers={"X-Request-Id": "second"}) + post(headers={"X-Request-Id": "third"})
                     + post("/v1/completions", json.dumps({"model": "qwen3-14b", "prompt": "hi", "max_tokens": 2,
                                                           "stream": True}).encode(),
                            headers={"X-Request-Id": "fourth"}))
        answers = [read_response(f) for _ in range(3)]
        assert [(s, h["x-request-id"]) for s, h, _ in answers] == [(200, "second"), (200, "third"), (200, "fourth")]
        assert json.loads(answers[0][2])["object"] == "chat.completion"
        assert answers[2][1]["content-type"].startswith("text/event-stream")
        assert answers[2][2].endswith(b"data: [DONE]\n\n")


def test_expect_100_continue_and_a_chunked_request_body(gateway):
    sock, f = connect(gateway)
    with sock:
        sock.sendall(post(body=b"", headers={"Content-Length": str(len(CHAT)), "Expect": "100-continue"}))
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        sock.sendall(CHAT)
        assert read_response(f)[0] == 200
        chunked = b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in (CHAT[:10], CHAT[10:])) + b"0\r\n\r\n"
        sock.sendall(post(body=chunked, headers={"Content-Length": None, "Transfer-Encoding": "chunked"}))
        assert read_response(f)[0] == 200


def test_a_body_over_the_limit_is_a_400_and_the_connection_is_not_reused(gateway):
    sock, f = connect(gateway)
    with sock:  # declared: answered before a byte of the body is sent, no 100 Continue
        sock.sendall(post(body=b"", headers={"Content-Length": str(BODY_LIMIT + 1), "Expect": "100-continue"}))
        status, headers, body = read_response(f)
        assert status == 400 and json.loads(body)["error"]["code"] == "body_too_large"
        assert headers["connection"] == "close" and closed(sock)
    sock, f = connect(gateway)
    with sock:  # undeclared (chunked): refused once it is over
        big = b"x" * (BODY_LIMIT + 10)
        sock.sendall(post(body=b"%x\r\n%b\r\n" % (len(big), big),
                          headers={"Content-Length": None, "Transfer-Encoding": "chunked"}))
        status, headers, body = read_response(f)
        assert status == 400 and f"limit of {BODY_LIMIT} bytes" in json.loads(body)["error"]["message"]
        assert headers["connection"] == "close" and closed(sock)


def test_connection_close_and_http_1_0_end_the_connection_after_the_answer(gateway):
    for kw in ({"headers": {"Connection": "close"}}, {"version": "1.0"}):
        sock, f = connect(gateway)
        with sock:
            sock.sendall(post(**kw))
            status, headers, body = read_response(f)
            assert status == 200 and headers["connection"] == "close" and json.loads(body)["choices"]
            assert closed(sock)


def test_errors_and_odd_requests_get_precise_answers(gateway):
    sock, f = connect(gateway)
    with sock:
        sock.sendall(post(body=b"{not json"))
        status, _, body = read_response(f)
        assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
        sock.sendall(post("/v1/chat/completions?trace=1"))  # not the exact target: the ASGI route, same answer
        assert read_response(f)[0] == 200
        sock.sendall(post(headers={"X-Request-Id": "caf\xe9 id"}))  # not printable ASCII: replaced
        status, headers, _ = read_response(f)
        assert status == 200 and len(headers["x-request-id"]) == 16
        sock.sendall(b"GET /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_response(f)[0] == 405
    sock, f = connect(gateway)
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
        assert read_response(f)[0] == 400 and closed(sock)


def test_a_client_gone_mid_body_leaves_the_server_serving(gateway):
    sock, _ = connect(gateway)
    sock.sendall(post(body=CHAT[:20], headers={"Content-Length": str(len(CHAT))}))
    sock.close()
    sock, f = connect(gateway)
    with sock:
        sock.sendall(post())
        assert read_response(f)[0] == 200
