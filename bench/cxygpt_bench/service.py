"""A Kubernetes Service as the fleet benchmark's `service` front: each TCP connection goes to a backend picked
uniformly at random (kube-proxy's choice, per connection) and its bytes are relayed both ways unread."""
from __future__ import annotations

import argparse
import asyncio
import random
import sys

CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class Service:
    """Backends as (host, port); the picks seeded, so a run can be repeated."""

    def __init__(self, backends: list[tuple[str, int]], seed: int):
        if not backends:
            raise ValueError("no backend")
        self.backends, self.rng = backends, random.Random(seed)
        self.picked = [0] * len(backends)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        at = self.rng.randrange(len(self.backends))
        self.picked[at] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.backends[at])
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


def parse_backend(url: str) -> tuple[str, int]:
    """http://host:port (no path) as (host, port)."""
    rest = url.removeprefix("http://").rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or "/" in rest:
        raise ValueError(f"not http://host:port: {url}")
    return host, int(port)


async def serve(host: str, port: int, service: Service) -> None:
    server = await asyncio.start_server(service.handle, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("backends", nargs="+", help="http://host:port of each replica")
    a = ap.parse_args(argv)
    service = Service([parse_backend(u) for u in a.backends], a.seed)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(a.host, a.port, service))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
