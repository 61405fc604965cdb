"""/docs and /redoc load with no internet: every asset the pages reference is served by the gateway itself."""
from __future__ import annotations

import re

import httpx

from cxygpt_gateway.app import create_app
from cxygpt_gateway.settings import GatewaySettings


async def test_docs_pages_reference_only_the_gateways_own_assets():
    app = create_app(GatewaySettings())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        for page in ("/docs", "/redoc"):
            r = await http.get(page)
            assert r.status_code == 200 and "text/html" in r.headers["content-type"]
            assert not re.search(r"(src|href)=['\"]https?://", r.text), f"{page} loads from another host"
            assets = re.findall(r"(?:src|href|url)[=:]\s*['\"](/[^'\"]+)['\"]", r.text)
            assert any(a.endswith(".js") for a in assets), assets
            for asset in assets:
                served = await http.get(asset)
                assert served.status_code == 200 and len(served.content) > 1000, (page, asset, served.status_code)
        spec = (await http.get("/openapi.json")).json()
        assert "/v1/chat/completions" in spec["paths"]
