"""The gateway's own calls to the engines (/tokenize, /health, /metrics), on the relay's connection pool: one HTTP
client talks to the engines."""
from __future__ import annotations

import asyncio

import orjson

from .pool import AnswerTooLarge, UpstreamConnectTimeout, UpstreamPool, UpstreamUnreachable

JSON_HEADERS = {"Content-Type": "application/json"}
# what failing to reach or to read an engine looks like here: the call answers "cannot say"
FAILURES = (UpstreamUnreachable, UpstreamConnectTimeout, AnswerTooLarge, ConnectionError, TimeoutError, OSError)


class EngineClient:
    """/tokenize (at most `tokenize_concurrency` calls open to one upstream at a time, whatever the number of requests
    or prompts asking), /health and a bounded read of /metrics; each answers None (or False) when it cannot say."""

    def __init__(self, pool: UpstreamPool, *, tokenize_concurrency: int = 8):
        self.pool = pool
        self.tokenize_concurrency = tokenize_concurrency
        self._tokenizing: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}  # url → gate, [requests using it]

    async def tokenize(self, base_url: str, payload: dict, timeout_s: float) -> int | None:
        """The upstream's exact count, or None when it cannot say (old server, error, timeout)."""
        try:
            async with asyncio.timeout(timeout_s):
                async with await self.pool.post(base_url, "/tokenize", orjson.dumps(payload), JSON_HEADERS,
                                                timeout_s) as r:
                    data = await r.read(1 << 20)
                    return int(orjson.loads(data)["count"]) if r.status == 200 else None
        except (*FAILURES, KeyError, TypeError, ValueError):
            return None

    async def tokenize_all(self, base_url: str, payloads: list[dict], timeout_s: float) -> list[int] | None:
        """Every payload's exact count within `timeout_s` in all (waiting for a turn included), or None when any
        cannot be had; a request's prompts take turns with everyone else's on the upstream's few connections."""
        gate, users = self._tokenizing.get(base_url) or self._tokenizing.setdefault(
            base_url, (asyncio.Semaphore(self.tokenize_concurrency), [0]))

        async def one(payload: dict) -> int | None:
            async with gate:
                return await self.tokenize(base_url, payload, timeout_s)
        users[0] += 1
        try:
            async with asyncio.timeout(timeout_s):
                counts = []
                for start in range(0, len(payloads), self.tokenize_concurrency):  # no more tasks than turns
                    counts += await asyncio.gather(*map(one, payloads[start:start + self.tokenize_concurrency]))
        except TimeoutError:
            return None
        finally:
            users[0] -= 1
            if not users[0]:  # replicas come and go: keep gates only for upstreams in use
                del self._tokenizing[base_url]
        known = [c for c in counts if c is not None]
        return known if len(known) == len(counts) else None

    async def healthy(self, base_url: str, timeout_s: float = 2.0) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                async with await self.pool.get(base_url, "/health", timeout_s) as r:
                    await r.read(1 << 16)
                    return r.status == 200
        except FAILURES:
            return False

    async def page(self, base_url: str, path: str, timeout_s: float, max_bytes: int) -> str | None:
        """A text page (the engine's /metrics), or None when it is not there in time or is over `max_bytes`."""
        try:
            async with asyncio.timeout(timeout_s):
                async with await self.pool.get(base_url, path, timeout_s) as r:
                    data = await r.read(max_bytes)
                    return data.decode(errors="replace") if r.status == 200 else None
        except FAILURES:
            return None
