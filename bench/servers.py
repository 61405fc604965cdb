"""The gateway's HTTP server side, measured: today's (uvicorn's httptools protocol driven through its private
request-cycle interface, server.py) against public interfaces — plain ASGI on uvicorn's public API, ASGI and RSGI
on granian — and vllm-router, interleaved rounds against one fast fake upstream (G1 stream c32 chunks/s, G2
non-stream c16 rps, CPU per request): issue 15's decision whether to switch."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from cxygpt_bench.procstat import free_port
from run import BIN, MODEL, OPEN_LIMITS, VENVS, Proc, Target, fake_upstream, log, measure, vllm_router

POINTS = {"G1 stream c32": dict(stream=True, concurrency=32), "G2 non-stream c16": dict(stream=False, concurrency=16,
                                                                                            tool="wrk")}
GRANIAN = ["--interface", "{interface}", "--host", "127.0.0.1", "--port", "{port}", "--workers", "1",
           "--runtime-threads", "1", "--loop", "uvloop", "--http", "1", "--no-ws", "--log-level", "warning"]


def variant(name: str, logs: Path, upstream: str) -> Proc:
    port = free_port()
    config = logs / f"gateway-{port}.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": MODEL, "url": upstream, "profile": "DEV_32G",
                                                  "limits": OPEN_LIMITS}]}))
    env = {"CXYGPT_GATEWAY_CONFIG": str(config)}
    python = str(BIN / "python")
    if name == "uvicorn-native":
        argv = [python, "-m", "cxygpt_gateway.main", "--config", str(config), "--port", str(port)]
        ready = "/readyz"
    elif name == "uvicorn-asgi":  # the same app on uvicorn's public API only: uvloop + httptools, plain ASGI
        code = ("import os, uvicorn; from cxygpt_gateway.app import create_app; "
                "from cxygpt_gateway.settings import load_settings; "
                "app = create_app(load_settings(os.environ['CXYGPT_GATEWAY_CONFIG'])); "
                f"uvicorn.run(app, host='127.0.0.1', port={port}, log_config=None, access_log=False, "
                "proxy_headers=False, loop='uvloop', http='httptools')")
        argv, ready = [python, "-c", code], "/readyz"
    elif name in ("granian-asgi", "granian-rsgi"):
        interface = name.split("-")[1]
        args = [a.format(interface=interface, port=port) for a in GRANIAN]
        argv = [python, "-m", "granian", *args, f"{interface}_gateway:app"]
        env["PYTHONPATH"] = str(Path(__file__).parent)
        ready = "/healthz"
    else:
        raise ValueError(name)
    return Proc(name, argv, port, ready, logs, env=env).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", nargs="+",
                    default=["uvicorn-native", "uvicorn-asgi", "granian-asgi", "granian-rsgi", "vllm-router"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per point")
    a = ap.parse_args(argv)
    if not (VENVS / "vllm-router").exists():
        print("vllm-router is not installed: bench/setup_peers.sh", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="cxygpt-servers-") as tmp:
        tmp = Path(tmp)
        up = fake_upstream(tmp, tokens=64)
        results = {v: {p: [] for p in POINTS} for v in a.variants}
        try:
            for r in range(a.rounds):
                for v in a.variants:
                    proc = vllm_router(tmp, up.url) if v == "vllm-router" else variant(v, tmp, up.url)
                    try:
                        target = Target(v, proc.url, proc)
                        for point, kw in POINTS.items():
                            m = measure(target, duration=a.duration, warmup=1.0, **kw)
                            rate = m["chunks_per_s"] if kw["stream"] else m["ok_rps"]
                            results[v][point].append((rate, m["cpu_per_request_us"]))
                    finally:
                        proc.stop()
                    log(f"round {r + 1} {v}: " + ", ".join(f"{p} {x[-1][0]:.0f}/s {x[-1][1]:.0f} µs"
                                                            for p, x in results[v].items()))
        finally:
            up.stop()
    med = {v: {p: [statistics.median(x[i] for x in results[v][p]) for i in (0, 1)] for p in POINTS}
           for v in a.variants}
    print("\n| server | G1 stream c32 chunks/s | CPU/stream (µs) | G2 c16 rps | CPU/request (µs) "
          "| G1 vs vllm-router | G2 vs vllm-router |")
    print("|---|---|---|---|---|---|---|")
    ref = med.get("vllm-router")
    for v in a.variants:
        g1, g2 = med[v]["G1 stream c32"], med[v]["G2 non-stream c16"]
        rel = (f"{g1[0] / ref['G1 stream c32'][0]:.2f}× | {g2[0] / ref['G2 non-stream c16'][0]:.2f}×" if ref
               else "- | -")
        print(f"| {v} | {g1[0]:.0f} | {g1[1]:.0f} | {g2[0]:.0f} | {g2[1]:.0f} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
