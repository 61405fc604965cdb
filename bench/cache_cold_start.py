"""Cold start with and without the model cache on the dev cluster: apply → Ready, a scale-up and an engine pod
replaced, each timed, and the bytes the local Hub served. Starts its own `cxygpt-dev up --detach` and stops it."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from cxygpt_dev.hub import make_repo

BIN = Path(sys.executable).parent
MIB = 2**20


class Cluster:
    def __init__(self, state: Path, port: int, rate: float):
        self.state = state
        out = subprocess.run([str(BIN / "cxygpt-dev"), "up", "--detach", "--no-examples", "--state-dir", str(state),
                              "--gateway-port", str(port), "--hub-rate-mib-s", str(rate)],
                             capture_output=True, text=True, timeout=240)
        if out.returncode:
            sys.exit(f"cxygpt-dev up failed: {out.stdout}{out.stderr}")
        info = json.loads((state / "ready").read_text())
        self.kubeconfig, self.hub, self.hub_root = info["kubeconfig"], info["hub"], Path(info["hub_root"])

    def kubectl(self, *args, stdin=None) -> str:
        out = subprocess.run([str(BIN / "kubectl"), "--kubeconfig", self.kubeconfig, "--cache-dir",
                              str(self.state / "kc"), *args], capture_output=True, text=True, input=stdin, timeout=60)
        if out.returncode:
            raise RuntimeError(f"kubectl {args}: {out.stderr}")
        return out.stdout

    def status(self, name) -> dict:
        return json.loads(self.kubectl("get", "md", name, "-o", "json")).get("status") or {}

    def wait_ready(self, name, replicas, timeout=600) -> float:
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            status = self.status(name)
            if status.get("phase") == "Ready" and status.get("readyReplicas") == replicas:
                return time.monotonic() - began
            time.sleep(0.1)
        raise RuntimeError(f"{name} not Ready with {replicas} replicas after {timeout}s: {status}")

    def hub_bytes(self) -> int:
        stats = httpx.get(self.hub + "/_dev/stats").json()
        return sum(v for k, v in stats["files"].items() if k.endswith(".safetensors"))

    def down(self):
        subprocess.run([str(BIN / "cxygpt-dev"), "down", "--state-dir", str(self.state)], capture_output=True,
                       timeout=60)


def scenario(c: Cluster, name: str, repo: str, cache: bool, replicas: int, scale_to: int) -> dict:
    model = {"name": name, "source": f"hf://{repo}"}
    if cache:
        model["cache"] = {"enabled": True, "size": "1Gi"}
    httpx.post(c.hub + "/_dev/stats/reset")
    began = time.monotonic()
    c.kubectl("apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"model": model, "replicas": replicas, "engine": {"kind": "sim"}}}))
    cold = c.wait_ready(name, replicas)
    cold_bytes = c.hub_bytes()
    c.kubectl("scale", "md", name, f"--replicas={scale_to}")
    scale = c.wait_ready(name, scale_to)
    pods = json.loads(c.kubectl("get", "pods", "-l", f"app.kubernetes.io/instance={name}", "-o", "json"))["items"]
    victim = pods[0]["metadata"]["name"]
    began_restart = time.monotonic()
    c.kubectl("delete", "pod", victim, "--wait=false")
    while True:  # the replacement ready, the victim gone
        names = {p["metadata"]["name"] for p in json.loads(c.kubectl(
            "get", "pods", "-l", f"app.kubernetes.io/instance={name}", "-o", "json"))["items"]}
        status = c.status(name)
        if victim not in names and status.get("readyReplicas") == scale_to and status.get("phase") == "Ready":
            break
        time.sleep(0.1)
    restart = time.monotonic() - began_restart
    result = {"cache": cache, "cold_start_s": round(cold, 2), f"scale_{replicas}_to_{scale_to}_s": round(scale, 2),
              "pod_replaced_s": round(restart, 2), "hub_weight_bytes_cold": cold_bytes,
              "hub_weight_bytes_total": c.hub_bytes(), "total_s": round(time.monotonic() - began, 2)}
    c.kubectl("delete", "md", name, "--timeout=60s")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights-mib", type=int, default=128, help="fake weights of the model (MiB, default 128)")
    ap.add_argument("--hub-rate-mib-s", type=float, default=32, help="the local Hub's bandwidth (default 32 MiB/s)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--scale-to", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1, help="each scenario this many times (a new repository each)")
    ap.add_argument("--gateway-port", type=int, default=8011)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxygpt-cache-bench-") as tmp:
        c = Cluster(Path(tmp) / "state", a.gateway_port, a.hub_rate_mib_s)
        results = []
        try:
            for i in range(a.rounds):
                for cache in (False, True):
                    repo = f"cxygpt-bench/model-{i}-{'cache' if cache else 'direct'}"
                    make_repo(c.hub_root, repo, weights_bytes=a.weights_mib * MIB, shard_bytes=32 * MIB)
                    results.append(scenario(c, f"bench-{i}-{'cache' if cache else 'direct'}", repo, cache,
                                            a.replicas, a.scale_to))
                    print(json.dumps(results[-1]), flush=True)
        finally:
            c.down()
    keys = [k for k in results[0] if k not in ("cache",)]
    print("\n| | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in results:
        print(f"| {'cache' if r['cache'] else 'no cache'} | " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
