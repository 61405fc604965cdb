"""The dev cluster's add-ons in one process: the local-directory provisioner (its own identity) and the Services'
proxy and DNS (kube-proxy's identity, system:kube-proxy)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from pathlib import Path

import aiohttp
import orjson

from . import services
from .processes import run_until_signalled
from .provisioner import Provisioner


def session_for(ca: Path, cert: Path, key: Path) -> aiohttp.ClientSession:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=0))


def caller(session: aiohttp.ClientSession, server: str):
    """An API call as (method, path, body=None, content_type) -> the answer's JSON; 404 is LookupError."""
    async def request(method: str, path: str, body=None, content_type: str = "application/json"):
        data = None if body is None else orjson.dumps(body)
        async with session.request(method, server + path, data=data,
                                   headers={"Content-Type": content_type} if data else {}) as resp:
            payload = await resp.read()
            if resp.status == 404:
                raise LookupError(f"{method} {path}")
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {payload[:300]!r}")
            return orjson.loads(payload) if payload else None
    return request


async def run(a) -> None:
    async with session_for(a.ca, *a.provisioner) as storage, session_for(a.ca, *a.proxy) as proxy:
        provisioner = Provisioner(caller(storage, a.server), a.volumes)
        await asyncio.gather(provisioner.run(storage, a.server), services.run(proxy, a.server, a.dns))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cxygpt_dev.addons", description=__doc__)
    ap.add_argument("--server", required=True)
    ap.add_argument("--ca", required=True, type=Path)
    ap.add_argument("--provisioner", nargs=2, required=True, type=Path, metavar=("CERT", "KEY"))
    ap.add_argument("--proxy", nargs=2, required=True, type=Path, metavar=("CERT", "KEY"))
    ap.add_argument("--volumes", required=True, type=Path, help="where the claims' directories are made")
    ap.add_argument("--dns", required=True, help="the cluster DNS's address (kube-dns's cluster IP)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)

    run_until_signalled(run(a))


if __name__ == "__main__":
    main()
