"""Static backends' health: a replica found down is checked again within a fraction of a second (doubling up to the
interval), so one that comes up a moment after the gateway serves at once, not at the next round."""
from __future__ import annotations

import asyncio
import time

from aiohttp import web
from asgi_support import gateway_client

from cxygpt_gateway.settings import GatewaySettings
from harness import free_port


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def test_a_replica_down_at_start_serves_within_a_second_of_coming_up():
    port = free_port()
    settings = GatewaySettings(health_interval_s=30, engine_metrics_interval_s=0,
                               models=[{"name": "m", "url": f"http://127.0.0.1:{port}", "profile": "DEV_32G"}])
    async with gateway_client(settings) as (client, gw):
        route = gw.registry.get("m")
        assert not route.routable()  # the engine is not up yet
        await asyncio.sleep(1.0)     # the checker backs off meanwhile (0.25, 0.5, 1, ... s)
        app = web.Application()
        app.router.add_get("/health", healthy)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        up = time.monotonic()
        try:
            async with asyncio.timeout(5):
                while not route.routable():
                    await asyncio.sleep(0.02)
            assert time.monotonic() - up < 2.5  # the next retry, not the 30 s round
        finally:
            await runner.cleanup()
