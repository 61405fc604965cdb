"""`cxygpt-console`: see the fleet and talk to it in a browser (read-only on the cluster)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn

from .app import Settings, create_app
from .auth import MODES

TOKEN_ENV = "CXYGPT_CONSOLE_TOKEN"


def parse_service(value: str) -> tuple[str, str]:
    namespace, _, name = value.partition("/")
    if not namespace or not name:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAMESPACE/NAME")
    return namespace, name


def settings_from(args: argparse.Namespace) -> Settings:
    token = None
    if args.auth == "token":
        token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get(TOKEN_ENV, "").strip()
    return Settings(gateway_url=args.gateway_url, namespaces=args.namespace or [], kubeconfig=args.kubeconfig,
                    gateway_service=args.gateway_service, prometheus_url=args.prometheus_url, auth=args.auth,
                    token=token, interval_s=args.interval, secure_cookies=args.secure_cookies)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cxygpt-console", description=__doc__)
    ap.add_argument("--gateway-url", required=True, help="the gateway, e.g. http://cxygpt-gateway.cxygpt.svc:80")
    ap.add_argument("--gateway-service", type=parse_service, metavar="NAMESPACE/NAME",
                    help="the gateway's Service: each ready replica is scraped (its EndpointSlices); "
                         "default: --gateway-url only")
    ap.add_argument("--prometheus-url", help="a Prometheus that scrapes the gateways: the charts come from it "
                                             "(default: the console scrapes and keeps the last 15 minutes)")
    ap.add_argument("-n", "--namespace", action="append", metavar="NS",
                    help="watch this namespace (repeatable; default: the whole cluster)")
    ap.add_argument("--kubeconfig", help="default $KUBECONFIG, ~/.kube/config, then in-cluster")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--auth", choices=MODES, default="none",
                    help="none; api-key (sign in with a gateway API key, checked by the gateway); "
                         f"token (sign in with the token in ${TOKEN_ENV} or --token-file)")
    ap.add_argument("--token-file", help="the console token (--auth token), instead of the environment")
    ap.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                    help="how often the gateway is read (default 5)")
    ap.add_argument("--secure-cookies", action="store_true",
                    help="session cookie only over HTTPS (set when the console is served behind TLS)")
    ap.add_argument("--log-level", default="info")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings_from(args))
    except (ValueError, OSError) as e:
        print(f"cxygpt-console: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=3, limit_concurrency=400)
    return 0


if __name__ == "__main__":
    sys.exit(main())
