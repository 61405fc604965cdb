"""`cxygpt-gateway`: serve the OpenAI-compatible gateway (static backend file or Kubernetes discovery)."""
from __future__ import annotations

import argparse
import gc
import sys

import prometheus_client
from pydantic import ValidationError

from . import logs
from .app import create_app
from .servers import uvicorn_native
from .servers.connections import raise_fd_limit, usable_connections
from .settings import load_settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxygpt-gateway", description=__doc__)
    ap.add_argument("--config", help="YAML settings file (models, keys_file, ...); environment variables override it")
    ap.add_argument("--host", help="listen address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, help="listen port (default 8080)")
    ap.add_argument("--kubernetes", action="store_true", default=None,
                    help="route to the ModelDeployments' ready endpoints instead of the config's models")
    ap.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG, else in-cluster)")
    ap.add_argument("--namespace", action="append", dest="namespaces",
                    help="a namespace to watch (repeatable; default all namespaces)")
    ap.add_argument("--keys-file", help="API keys and tiers (YAML)")
    a = ap.parse_args(argv)
    try:
        settings = load_settings(a.config, host=a.host, port=a.port, kubernetes=a.kubernetes,
                                 kubeconfig=a.kubeconfig, namespaces=a.namespaces, keys_file=a.keys_file)
        logs.configure(settings.log_level)
        # every connection is a descriptor: the cap is what the process may open, or the fd limit ends everyone
        allowed = usable_connections(settings.max_connections + settings.health_connections, raise_fd_limit())
        if allowed < settings.max_connections + settings.health_connections:
            settings.max_connections = max(1, allowed - settings.health_connections)
            print(f"cxygpt-gateway: max_connections lowered to {settings.max_connections} (the open-files limit)",
                  file=sys.stderr)
        prometheus_client.disable_created_metrics()  # *_created series only double every counter's size
        app = create_app(settings)
    except (OSError, ValueError, ValidationError) as e:
        print(f"cxygpt-gateway: {e}", file=sys.stderr)
        return 2
    # what start-up built lives as long as the process: out of the collector's sight, a full collection no longer
    # walks it (measured, BENCHMARKS.md)
    gc.collect()
    gc.freeze()
    gw = app.state.gateway
    uvicorn_native.run(app, settings, gw.director, gw.connections, gw.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
