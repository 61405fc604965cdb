"""The upstream client: /tokenize and /health on an aiohttp session, relayed requests on the lean pool (pool.py)."""
from __future__ import annotations

import aiohttp
import orjson

from .pool import UpstreamPool

JSON_HEADERS = {"Content-Type": "application/json"}


class Upstream:
    """`session` (aiohttp) for /tokenize and /health; `pool` for the relay itself."""

    def __init__(self, session: aiohttp.ClientSession, pool: "UpstreamPool | None" = None):
        self.session = session
        self.pool = pool or UpstreamPool()

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
