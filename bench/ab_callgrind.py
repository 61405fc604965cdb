"""Before/after in instructions: the gateway of several git revisions under callgrind, the same requests to each
(non-streamed at 1 and 16 connections, streamed at 16), instructions per request. A count of instructions does not
move with what else the machine runs, where the seconds of bench/ab.py do."""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ab import checkout, gateway_of
from run import MODEL, fake_upstream, log

POINTS = {"c1": dict(stream=False, connections=1), "c16": dict(stream=False, connections=16),
          "stream c16": dict(stream=True, connections=16)}


def _request(stream: bool) -> bytes:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello " * 16}], "max_tokens": 64,
                       "stream": stream}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body))


def _read_answer(f) -> int:
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        while (size := int(f.readline().strip(), 16)) > 0:
            f.read(size)
            f.readline()
        f.readline()
    else:
        f.read(int(headers["content-length"]))
    return status


def send(port: int, count: int, stream: bool) -> None:
    """`count` requests one after the other on one kept-alive connection; each must be a 200."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        f = sock.makefile("rb")
        request = _request(stream)
        for _ in range(count):
            sock.sendall(request)
            if (status := _read_answer(f)) != 200:
                raise SystemExit(f"a request got HTTP {status}")


def load(port: int, requests: int, connections: int, stream: bool) -> None:
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        for done in [pool.submit(send, port, requests // connections, stream) for _ in range(connections)]:
            done.result()


def instructions(out: Path) -> int:
    text = out.read_text(errors="replace")
    found = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    if not found:
        raise SystemExit(f"no totals in {out}")
    return int(found.group(1))


def measure(rev: str, env: dict, tmp: Path, upstream: str, requests: int) -> dict[str, float]:
    """Instructions per request at each point, for one revision's gateway under callgrind."""
    results = {}
    for point, kw in POINTS.items():
        out = tmp / f"callgrind-{rev}-{point.replace(' ', '-')}.out"
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        gw = gateway_of(env, tmp, upstream, wrap=wrap, ready_timeout=300)
        try:
            load(gw.port, 64, kw["connections"], kw["stream"])  # warm: imports, caches, first connections
            subprocess.run(["callgrind_control", "--zero", str(gw.proc.pid)], check=True, capture_output=True)
            started = time.monotonic()
            load(gw.port, requests, kw["connections"], kw["stream"])
            subprocess.run(["callgrind_control", "--dump", str(gw.proc.pid)], check=True, capture_output=True)
            took = time.monotonic() - started
        finally:
            gw.stop()
        dumps = sorted(out.parent.glob(out.name + ".*"))  # what --dump wrote: the counts since --zero
        results[point] = instructions(dumps[-1]) / requests
        log(f"{rev} {point}: {results[point]:,.0f} instructions per request ({took:.0f} s under callgrind)")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("revs", nargs="+", help="git revisions, oldest first")
    ap.add_argument("--requests", type=int, default=800, help="requests per point (a multiple of 16)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxygpt-abcg-") as tmp:
        tmp = Path(tmp)
        envs = {rev: checkout(rev, tmp / f"rev{i}") for i, rev in enumerate(a.revs)}
        up = fake_upstream(tmp, tokens=64)
        try:
            results = {rev: measure(rev, envs[rev], tmp, up.url, a.requests) for rev in a.revs}
        finally:
            up.stop()
    print("\n| revision | " + " | ".join(f"{p} instructions/request" for p in POINTS) + " |")
    print("|---|" + "---|" * len(POINTS))
    base = results[a.revs[0]]
    for rev in a.revs:
        cells = [f"{results[rev][p]:,.0f}" + ("" if rev == a.revs[0] else f" ({results[rev][p] / base[p] - 1:+.1%})")
                 for p in POINTS]
        print(f"| {rev} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
