"""Autoscaling on the dev cluster: cold start from zero (request → first token) and the reaction to a load step,
beside the dev cluster's engine start time; prints a Markdown table (and JSON with --json)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import yaml

BIN = Path(sys.executable).parent
API_MD = "/apis/cxygpt.io/v1alpha1/namespaces/default/modeldeployments"


class Cluster:
    def __init__(self, state: Path, interval: float, window: float):
        self.state, self.port = state, _free_port()
        self.gateway = f"http://127.0.0.1:{self.port}"
        self.log = open(state / "dev.log", "wb")
        self.proc = subprocess.Popen([str(BIN / "cxygpt-dev"), "up", "--no-examples", "--state-dir", str(state),
                                      "--gateway-port", str(self.port), "--autoscale-interval", str(interval)],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "CXYGPT_DEMAND_WINDOW_S": str(window)})
        _until(lambda: (state / "ready").exists() or self.proc.poll() is not None, 90)
        if self.proc.poll() is not None:
            raise SystemExit(f"cxygpt-dev exited; see {state / 'dev.log'}")
        info = json.loads((state / "ready").read_text())
        self.api, self.kubeconfig = info["api"], info["kubeconfig"]

    def apply(self, doc: dict):
        subprocess.run([str(BIN / "kubectl"), "--kubeconfig", self.kubeconfig, "--cache-dir", str(self.state / "kc"),
                        "apply", "-f", "-"], input=yaml.safe_dump(doc), text=True, check=True, capture_output=True)

    def md(self, name: str) -> dict:
        return httpx.get(f"{self.api}{API_MD}/{name}", timeout=5).json()

    def scale(self, name: str, replicas: int):
        httpx.patch(f"{self.api}{API_MD}/{name}/scale", json={"spec": {"replicas": replicas}}, timeout=5,
                    headers={"Content-Type": "application/merge-patch+json"}).raise_for_status()

    def ready_engines(self, name: str) -> int:
        slices = httpx.get(f"{self.api}/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
                           params={"labelSelector": f"kubernetes.io/service-name={name}"}, timeout=5).json()["items"]
        return sum(1 for s in slices for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready"))

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=60)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return time.monotonic()
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout} s")


def model(name: str, load_s: float, *, replicas: int, autoscaling: dict | None) -> dict:
    spec = {"model": {"name": name, "source": "hf://Qwen/Qwen3-14B"}, "replicas": replicas,
            "engine": {"kind": "sim", "env": [{"name": "CXYGPT_SIM_LOAD_S", "value": str(load_s)},
                                              {"name": "CXYGPT_SIM_ITL_MS", "value": "20"}]}}
    if autoscaling:
        spec["autoscaling"] = autoscaling
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def engine_start(c: Cluster, rounds: int) -> list[float]:
    """spec.replicas 0 -> 1 (kubectl scale) until the engine's endpoint is ready, for a model without autoscaling."""
    out = []
    for _ in range(rounds):
        c.scale("plain", 0)
        _until(lambda: c.ready_engines("plain") == 0 and c.md("plain")["status"].get("phase") == "ScaledToZero", 60)
        t0 = time.monotonic()
        c.scale("plain", 1)
        out.append(_until(lambda: c.ready_engines("plain") == 1, 120) - t0)
    return out


def cold_start(c: Cluster, rounds: int) -> list[float]:
    """A streamed chat for the autoscaled model at zero, sent until its first token arrives."""
    client = openai.OpenAI(base_url=c.gateway + "/v1", api_key="none", max_retries=0, timeout=300)
    out = []
    for _ in range(rounds):
        _until(lambda: c.md("cold")["spec"]["replicas"] == 0 and c.ready_engines("cold") == 0, 120)
        t0, first = time.monotonic(), None
        for chunk in client.chat.completions.create(model="cold", max_tokens=8, stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.monotonic() - t0
        out.append(first)
    return out


def load_step(c: Cluster, users: int, max_replicas: int) -> dict:
    """From one replica, idle, to `users` closed-loop clients at once: when the count first moves, when it is at
    the maximum, when that many engines serve."""
    _until(lambda: c.ready_engines("step") == 1 and c.md("step")["spec"]["replicas"] == 1, 120)
    stop, failures, answered = threading.Event(), [], []

    def user():
        client = openai.OpenAI(base_url=c.gateway + "/v1", api_key="none", max_retries=0, timeout=120)
        while not stop.is_set():
            try:
                client.chat.completions.create(model="step", max_tokens=40, extra_body={"ignore_eos": True},
                                               messages=[{"role": "user", "content": "load"}])
                answered.append(1)
            except openai.APIError as e:
                failures.append(repr(e))

    t0 = time.monotonic()
    threads = [threading.Thread(target=user, daemon=True) for _ in range(users)]
    for t in threads:
        t.start()
    try:
        first = _until(lambda: c.md("step")["spec"]["replicas"] > 1, 120, 0.1) - t0
        at_max = _until(lambda: c.md("step")["spec"]["replicas"] == max_replicas, 120, 0.1) - t0
        serving = _until(lambda: c.ready_engines("step") == max_replicas, 180, 0.1) - t0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=150)
    return {"first_change_s": first, "at_max_s": at_max, "max_serving_s": serving, "answered": len(answered),
            "failed": len(failures)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/bench_autoscaling.py", description=__doc__)
    ap.add_argument("--load-s", type=float, default=0.0, help="simulated model load per engine (CXYGPT_SIM_LOAD_S)")
    ap.add_argument("--rounds", type=int, default=3, help="cold starts and engine starts measured (default 3)")
    ap.add_argument("--interval", type=float, default=5.0, help="the operator's --autoscale-interval (default 5)")
    ap.add_argument("--window", type=float, default=10.0, help="the gateway's demand window (default 10)")
    ap.add_argument("--users", type=int, default=8, help="clients of the load step (target 2 per replica, max 4)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        c = Cluster(Path(tmp), a.interval, a.window)
        try:
            c.apply(model("plain", a.load_s, replicas=0, autoscaling=None))
            c.apply(model("cold", a.load_s, replicas=0, autoscaling={"minReplicas": 0, "maxReplicas": 1,
                                                                      "scaleDownDelaySeconds": 3}))
            c.apply(model("step", a.load_s, replicas=1, autoscaling={
                "minReplicas": 1, "maxReplicas": 4, "targetInFlightPerReplica": 2, "scaleDownDelaySeconds": 30}))
            starts = engine_start(c, a.rounds)
            colds = cold_start(c, a.rounds)
            step = load_step(c, a.users, 4)
        finally:
            c.stop()
    result = {"load_s": a.load_s, "interval_s": a.interval, "window_s": a.window, "engine_start_s": starts,
              "cold_start_first_token_s": colds, "load_step": step}
    if a.json:
        print(json.dumps(result, indent=1))
    med = statistics.median
    print(f"| engine start (kubectl scale 0 -> 1 to a ready endpoint) | {med(starts):.2f} s "
          f"({', '.join(f'{s:.2f}' for s in starts)}) |")
    print(f"| cold start from zero (request -> first token, streamed) | {med(colds):.2f} s "
          f"({', '.join(f'{s:.2f}' for s in colds)}) |")
    print(f"| load step, 1 idle replica -> {a.users} users (target 2, max 4): first change / at max / 4 engines "
          f"serving | {step['first_change_s']:.1f} / {step['at_max_s']:.1f} / {step['max_serving_s']:.1f} s "
          f"({step['answered']} answered, {step['failed']} failed) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
