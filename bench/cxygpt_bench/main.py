"""`cxygpt-bench`: load an OpenAI-compatible chat/completions endpoint and report latency, throughput, errors."""
from __future__ import annotations

import argparse
import json
import sys

from .load import LoadConfig, run_load
from .stats import render


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cxygpt-bench", description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8001/v1/chat/completions",
                    help="endpoint (…/v1/chat/completions or …/v1/completions)")
    ap.add_argument("--concurrency", "-c", type=int, default=10,
                    help="users in the closed loop; with --rate, the cap of requests in flight")
    ap.add_argument("--rounds", "-n", type=int, help="requests per user (with --rate: requests in all)")
    ap.add_argument("--duration", "-d", type=float, help="seconds to run (default 10 when --rounds is not given)")
    ap.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second instead of closed-loop users")
    ap.add_argument("--ramp-up", type=float, default=0.0,
                    help="closed loop: start the users evenly over this many seconds instead of all at once")
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="default: --stream")
    ap.add_argument("--model", default="qwen3-14b")
    ap.add_argument("--api-key", help="sent as 'Authorization: Bearer …'")
    ap.add_argument("--prompt-tokens", default="64", help="N, uniform:A:B, normal:MEAN:SD or choice:A,B (default 64)")
    ap.add_argument("--max-tokens", default="64", help="same forms (default 64)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--no-usage", dest="include_usage", action="store_false",
                    help="do not ask streams for the usage chunk (output tokens are then counted as events)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the statistics as JSON")
    ap.add_argument("--quiet", "-q", action="store_true", help="no live progress line")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    cfg = LoadConfig(url=a.url, concurrency=a.concurrency, rounds=a.rounds,
                     duration=a.duration if a.duration or a.rounds else 10.0, stream=a.stream, model=a.model,
                     api_key=a.api_key, prompt_tokens=a.prompt_tokens, max_tokens=a.max_tokens, rate=a.rate,
                     timeout=a.timeout, include_usage=a.include_usage, seed=a.seed, ramp_up=a.ramp_up)
    try:
        cfg.check()
    except ValueError as e:
        print(f"cxygpt-bench: {e}", file=sys.stderr)
        return 2
    try:
        result = run_load(cfg, progress=not a.quiet and sys.stderr.isatty())
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result, indent=2) if a.json else render(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
