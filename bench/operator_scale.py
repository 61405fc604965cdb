"""G5/G6 (operator): N ModelDeployments over M GPU nodes in the in-memory API — time to converge, RSS, start time."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from cxygpt_bench.procstat import cpu_s, free_port, rss_mb

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MD_PATH = "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments"


async def wait_http(session, url, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.02)
    raise SystemExit(f"{url} not up in {timeout}s")


def node(i: int) -> dict:
    kinds = [("32607", "1", "NVIDIA-GeForce-RTX-5090"), ("46068", "1", "NVIDIA-L40S"),
             ("81559", "1", "NVIDIA-H100-80GB-HBM3"), ("81559", "8", "NVIDIA-H100-80GB-HBM3")]
    memory, count, product = kinds[i % len(kinds)]
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"gpu-{i}", "labels": {
        "nvidia.com/gpu.memory": memory, "nvidia.com/gpu.count": count, "nvidia.com/gpu.product": product}}}


def model(i: int) -> dict:
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": f"m-{i}"},
            "spec": {"model": {"name": f"model-{i}", "source": "hf://Qwen/Qwen3-14B",
                               "variants": {"int4": "hf://Qwen/Qwen3-14B-GPTQ-Int4"}},
                     "mode": "single" if i % 3 == 0 else "multi"}}


async def run(models: int, nodes: int, tmp: Path) -> dict:
    api_port, live_port = free_port(), free_port()
    api = subprocess.Popen([sys.executable, "-m", "cxygpt_dev.kubeapi", "--port", str(api_port), "--preload",
                            str(REPO / "deploy/crds")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{api_port}"
    from cxygpt_dev.kubeapi import write_kubeconfig
    kubeconfig = write_kubeconfig(tmp / "kubeconfig", base)
    operator = None
    try:
        async with aiohttp.ClientSession() as session:
            await wait_http(session, base + "/version")
            for i in range(nodes):
                async with session.post(base + "/api/v1/nodes", json=node(i)) as r:
                    r.raise_for_status()
            started = time.monotonic()
            operator = subprocess.Popen([str(BIN / "cxygpt-operator"), "--kubeconfig", str(kubeconfig), "--liveness",
                                         f"http://127.0.0.1:{live_port}/healthz", "--metrics-port", "0"],
                                        stdout=open(tmp / "operator.log", "wb"), stderr=subprocess.STDOUT)
            await wait_http(session, f"http://127.0.0.1:{live_port}/healthz")
            start_s = time.monotonic() - started
            spy = os.environ.get("PROFILE")  # py-spy samples of the operator or the API while it converges
            target = api if os.environ.get("PROFILE_TARGET") == "api" else operator
            profiler = subprocess.Popen([str(BIN / "py-spy"), "record", "--pid", str(target.pid), "-o", spy,
                                         "-f", "raw", "--nonblocking"]) if spy else None
            created = time.monotonic()
            for i in range(models):
                async with session.post(base + MD_PATH, json=model(i)) as r:
                    r.raise_for_status()
            create_s = time.monotonic() - created
            peak = 0.0
            while True:
                async with session.get(base + MD_PATH) as r:
                    items = (await r.json())["items"]
                done = sum(1 for m in items if (m.get("status") or {}).get("phase") in ("Starting", "Ready", "Pending"))
                peak = max(peak, rss_mb(operator.pid))
                if done == models:
                    break
                if time.monotonic() - created > 300:
                    raise SystemExit(f"only {done}/{models} converged in 300 s")
                await asyncio.sleep(1)
            converge_s = time.monotonic() - created
            if profiler:
                profiler.send_signal(2)
                profiler.wait(timeout=30)
            async with session.get(base + "/apis/apps/v1/deployments") as r:
                deployments = len((await r.json())["items"])
            return {"models": models, "nodes": nodes, "operator_start_s": round(start_s, 2),
                    "operator_cpu_s": round(cpu_s(operator.pid), 1), "api_cpu_s": round(cpu_s(api.pid), 1),
                    "create_s": round(create_s, 2), "converge_s": round(converge_s, 2),
                    "deployments": deployments, "operator_rss_mb": round(max(peak, rss_mb(operator.pid)), 1)}
    finally:
        for proc in (operator, api):
            if proc:
                proc.terminate()
                proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    results = []
    for n in a.models:
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(run(n, a.nodes, Path(tmp)))
        results.append(result)
        print(json.dumps(result) if a.json else
              f"{n:5d} models / {a.nodes} nodes: converged in {result['converge_s']:6.2f} s "
              f"(created in {result['create_s']:.2f} s), operator RSS {result['operator_rss_mb']:.0f} MB, "
              f"operator start-to-ready {result['operator_start_s']:.2f} s; CPU operator {result['operator_cpu_s']} s, "
              f"API {result['api_cpu_s']} s", flush=True)
    return results


if __name__ == "__main__":
    main()
