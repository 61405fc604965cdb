"""`cxygpt-gateway`: serve the OpenAI-compatible gateway (static backend file or Kubernetes discovery)."""
from __future__ import annotations

import argparse
import asyncio
import sys

import prometheus_client
import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import logs
from .app import create_app
from .settings import load_settings


class _HeadWithBody:
    """A transport whose response head is held until the next write (the body, in the same tick), so each answer
    leaves in one send: on loopback every send costs ~10 % of a relayed request's CPU (measured)."""
    __slots__ = ("_transport", "_head", "_flush_scheduled")

    def __init__(self, transport: asyncio.Transport):
        self._transport, self._head, self._flush_scheduled = transport, None, False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif data.startswith(b"HTTP/1.1 ") and data.endswith(b"\r\n\r\n"):
            self._head = data
            if not self._flush_scheduled:  # never hold a head past this tick, body or not
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
            return
        self._transport.write(data)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each response head together with its first body bytes."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.transport = _HeadWithBody(transport)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxygpt-gateway", description=__doc__)
    ap.add_argument("--config", help="YAML settings file (models, keys_file, ...); environment variables override it")
    ap.add_argument("--host", help="listen address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="listen port (default 8080)")
    ap.add_argument("--kubernetes", action="store_true", default=None,
                    help="route to Ready ModelDeployments instead of the config's models")
    ap.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG, else in-cluster)")
    ap.add_argument("--namespace", help="namespace to watch (default all)")
    ap.add_argument("--keys-file", help="API keys and tiers (YAML)")
    a = ap.parse_args(argv)
    try:
        settings = load_settings(a.config, host=a.host, port=a.port, kubernetes=a.kubernetes,
                                 kubeconfig=a.kubeconfig, namespace=a.namespace, keys_file=a.keys_file)
        logs.configure(settings.log_level)
        prometheus_client.disable_created_metrics()  # *_created series only double every counter's size
        app = create_app(settings)
    except (OSError, ValueError, ValidationError) as e:
        print(f"cxygpt-gateway: {e}", file=sys.stderr)
        return 2
    # uvloop + httptools, no access log, no proxy-header rewriting (nothing reads the client address): measured
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False, proxy_headers=False,
                loop="uvloop", http=GatewayHttpProtocol, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
