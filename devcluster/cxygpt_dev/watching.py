"""Following a watch of the dev cluster's API: each event to a handler, a broken stream opened again."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
import orjson

log = logging.getLogger("cxygpt.pods")


async def follow(session: aiohttp.ClientSession, url: str, handle: Callable[[str | None, dict], Awaitable[None]],
                 what: str, errors: tuple[type[BaseException], ...] = ()) -> None:
    """For ever: each event of the watch at `url` as handle(type, object); a broken stream (or one of `errors`
    from the handler) is logged and the watch opened again a second later, which sends every object again."""
    while True:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as resp:
                async for line in resp.content:
                    if line.strip():
                        event = orjson.loads(line)
                        await handle(event.get("type"), event.get("object") or {})
        except (aiohttp.ClientError, orjson.JSONDecodeError, *errors) as e:
            log.warning("%s watch broke (%s); watching again", what, e)
            await asyncio.sleep(1)
