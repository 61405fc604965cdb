"""Before/after: the gateway of several git revisions, interleaved against one fast fake upstream, rounds × points
(non-streamed wrk c1 and c16, streamed c32): rps and gateway CPU per request, median per revision."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from cxygpt_bench.procstat import free_port
from run import BIN, MODEL, OPEN_LIMITS, REPO, Proc, Target, fake_upstream, log, measure

POINTS = {"c1": dict(stream=False, concurrency=1, tool="wrk"), "c16": dict(stream=False, concurrency=16, tool="wrk"),
          "stream c32": dict(stream=True, concurrency=32)}


def checkout(rev: str, into: Path) -> dict:
    """The revision's gateway and profile packages, and the environment that imports them instead of the venv's."""
    into.mkdir()
    archive = subprocess.run(["git", "archive", rev, "gateway", "profiles"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    env = {"PYTHONPATH": f"{into / 'gateway'}{os.pathsep}{into / 'profiles'}"}
    where = subprocess.run([sys.executable, "-c", "import cxygpt_gateway; print(cxygpt_gateway.__file__)"],
                           env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    if not where.startswith(str(into)):
        raise SystemExit(f"{rev}: the gateway imported from {where.strip()}, not from the checkout")
    return env


def gateway_of(env: dict, logs: Path, upstream: str, *, wrap: list[str] = (), ready_timeout: float = 90.0) -> Proc:
    """The revision's gateway (its command after `wrap`, e.g. a valgrind line) in front of `upstream`."""
    port = free_port()
    config = logs / f"gateway-{port}.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": MODEL, "url": upstream, "profile": "DEV_32G",
                                                  "limits": OPEN_LIMITS}]}))
    argv = [*wrap, str(BIN / "python"), "-m", "cxygpt_gateway.main", "--config", str(config), "--port", str(port)]
    return Proc("cxygpt", argv, port, "/readyz", logs, env=env).start(ready_timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("revs", nargs="+", help="git revisions, oldest first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per point")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxygpt-ab-") as tmp:
        tmp = Path(tmp)
        envs = {rev: checkout(rev, tmp / f"rev{i}") for i, rev in enumerate(a.revs)}
        up = fake_upstream(tmp, tokens=64)
        results = {rev: {p: [] for p in POINTS} for rev in a.revs}
        try:
            for r in range(a.rounds):
                for rev in a.revs:
                    gw = gateway_of(envs[rev], tmp, up.url)
                    try:
                        target = Target(rev, gw.url, gw)
                        for point, kw in POINTS.items():
                            m = measure(target, duration=a.duration, warmup=1.0, **kw)
                            results[rev][point].append((m["ok_rps"], m["cpu_per_request_us"]))
                    finally:
                        gw.stop()
                    log(f"round {r + 1} {rev}: " + ", ".join(f"{p} {v[-1][0]:.0f} rps {v[-1][1]:.0f} µs"
                                                              for p, v in results[rev].items()))
        finally:
            up.stop()
    print("\n| revision | " + " | ".join(f"{p} rps | {p} CPU/request (µs)" for p in POINTS) + " |")
    print("|---|" + "---|---|" * len(POINTS))
    for rev in a.revs:
        cells = [f"{statistics.median(x[i] for x in results[rev][p]):.0f}" for p in POINTS for i in (0, 1)]
        print(f"| {rev} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
