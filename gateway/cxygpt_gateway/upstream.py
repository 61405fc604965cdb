"""The upstream client: /tokenize and /health on an aiohttp session, relayed requests on the lean pool (pool.py)."""
from __future__ import annotations

import asyncio

import aiohttp
import orjson

from .pool import UpstreamPool

JSON_HEADERS = {"Content-Type": "application/json"}


class Upstream:
    """`session` (aiohttp) for /tokenize and /health; `pool` for the relay itself. At most `tokenize_concurrency`
    /tokenize calls are open to one upstream at a time, whatever the number of requests or prompts asking."""

    def __init__(self, session: aiohttp.ClientSession, pool: "UpstreamPool | None" = None, *,
                 tokenize_concurrency: int = 8):
        self.session = session
        self.pool = pool or UpstreamPool()
        self.tokenize_concurrency = tokenize_concurrency
        self._tokenizing: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}  # url → gate, [requests using it]

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
        return counts if all(c is not None for c in counts) else None

    async def tokenize(self, base_url: str, payload: dict, timeout_s: float) -> int | None:
        """The upstream's exact count, or None when it cannot say (old server, error, timeout)."""
        try:
            async with self.session.post(base_url + "/tokenize", data=orjson.dumps(payload), headers=JSON_HEADERS,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status != 200:
                    return None
                return int(orjson.loads(await r.read())["count"])
        except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError):
            return None

    async def healthy(self, base_url: str, timeout_s: float = 2.0) -> bool:
        try:
            async with self.session.get(base_url + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False
