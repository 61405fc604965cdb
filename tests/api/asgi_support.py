"""Helpers for the gateway's ASGI tests: an in-test upstream on a free port, and the gateway app in-process."""
from __future__ import annotations

import contextlib

import httpx
from aiohttp import web

from cxygpt_gateway.app import create_app
from cxygpt_gateway.settings import GatewaySettings
from harness import free_port


@contextlib.asynccontextmanager
async def upstream_serving(routes: dict[tuple[str, str], object]):
    """(method, path) → handler, served on 127.0.0.1 for the block; yields the base URL."""
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def gateway_client(settings: GatewaySettings):
    """The gateway app with its lifespan running, and an httpx client on it; yields (client, gateway)."""
    gw_app = create_app(settings)
    async with gw_app.router.lifespan_context(gw_app):
        transport = httpx.ASGITransport(app=gw_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, gw_app.state.gateway
