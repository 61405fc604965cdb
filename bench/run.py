"""The benchmark suite: G1–G6 for cxygpt-gateway beside direct, LiteLLM and vllm-router, in one run on one
machine; writes bench/results/<time>.json and the results section of BENCHMARKS.md."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from cxygpt_bench.load import LoadConfig, run_load
from cxygpt_bench.overload import judge
from cxygpt_bench.procstat import cpu_s, free_port, rss_mb

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VENVS = REPO / ".bench-venvs"
RESULTS = REPO / "bench" / "results"
MODEL = "qwen3-14b"
PEER_KEY = "sk-bench"
ORDER = ("direct", "cxygpt", "vllm-router", "litellm")
MARK_BEGIN, MARK_END = "<!-- results:begin (bench/run.py writes this section) -->", "<!-- results:end -->"


class Proc:
    """A server process in its own session, ready when `ready_path` answers 200."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, logs: Path, env: dict | None = None):
        self.name, self.argv, self.port, self.ready_path = name, argv, port, ready_path
        self.log_path = logs / f"{name}-{port}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 90.0) -> Proc:
        return self.spawn().wait_ready(timeout)

    def spawn(self) -> Proc:
        """Start the process without waiting (several can then start at once; wait_ready each)."""
        self._spawned = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     env=self.env, cwd=REPO, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 90.0) -> Proc:
        started = self._spawned
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() - started < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
                try:
                    if client.get(self.url + self.ready_path).status_code == 200:
                        self.ready_s = time.monotonic() - started
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"{self.name} not ready in {timeout:g} s: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)


class Target:
    """Something the load is sent to: its chat URL, key, and the process whose CPU and RSS are charged."""

    def __init__(self, name: str, base: str, proc: Proc | None, api_key: str | None = None):
        self.name, self.base, self.proc, self.api_key = name, base, proc, api_key

    @property
    def url(self) -> str:
        return self.base + "/v1/chat/completions"


# --- processes -------------------------------------------------------------------------------------------

def fake_upstream(logs: Path, **kw) -> Proc:
    port = free_port()
    argv = [sys.executable, "-m", "cxygpt_bench.fakeup", "--port", str(port), "--model", MODEL]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return Proc("fakeup", argv, port, "/health", logs).start()


def simulator(logs: Path, *args: str, wait: bool = True) -> Proc:
    port = free_port()
    argv = [str(BIN / "cxygpt-sim"), "serve", "Qwen/Qwen3-14B", "--served-model-name", MODEL, "--host", "127.0.0.1",
            "--port", str(port), "--max-model-len", "4096", "--sim-jitter", "0", "--sim-seed", "1", *args]
    proc = Proc("sim", argv, port, "/health", logs)
    return proc.start() if wait else proc.spawn()


def gateway(logs: Path, upstream: str | list[str], limits: dict, env: dict | None = None, settings: dict | None = None,
            profile: str = "DEV_32G", model_settings: dict | None = None, wait: bool = True) -> Proc:
    """upstream: one replica's URL or a list of replicas; model_settings: more keys of the model entry; wait: False
    to spawn it only (wait_ready later)."""
    port = free_port()
    where = {"url": upstream} if isinstance(upstream, str) else {"urls": list(upstream)}
    config = {"models": [{"name": MODEL, **where, "profile": profile, "limits": limits, **(model_settings or {})}],
              **(settings or {})}
    path = logs / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [str(BIN / "cxygpt-gateway"), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    proc = Proc("cxygpt", argv, port, "/readyz", logs, env=env)
    return proc.start() if wait else proc.spawn()


def litellm(logs: Path, upstream: str) -> Proc | None:
    exe = VENVS / "litellm" / "bin" / "litellm"
    if not exe.exists():
        return None
    port = free_port()
    path = logs / f"litellm-{port}.yaml"
    path.write_text(yaml.safe_dump({
        "model_list": [{"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}", "api_base": upstream + "/v1",
                                                              "api_key": "sk-fake"}}],
        "general_settings": {"master_key": PEER_KEY}}))
    argv = [str(exe), "--config", str(path), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return Proc("litellm", argv, port, "/health/liveliness", logs).start(timeout=120)


def vllm_router(logs: Path, upstream: str | list[str], policy: str = "round_robin", extra: tuple[str, ...] = ()) -> Proc | None:
    exe = VENVS / "vllm-router" / "bin" / "vllm-router"
    if not exe.exists():
        return None
    port = free_port()
    workers = [upstream] if isinstance(upstream, str) else list(upstream)
    # its metrics exporter takes a fixed port unless told otherwise: one left running would make every start fail
    argv = [str(exe), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers, "--policy", policy,
            "--prometheus-port", str(free_port()), *extra]
    return Proc("vllm-router", argv, port, "/health", logs).start()


OPEN_LIMITS = {"rate_qps": 1_000_000, "rate_tpm": 1_000_000_000, "max_concurrency": 4096, "queue_size": 4096,
               "max_output_tokens": 512, "degraded_max_output_tokens": 512}


class Stack:
    """One upstream with every available front in front of it; the peers that could not start are noted."""

    def __init__(self, logs: Path, upstream: Proc, peers: bool, notes: list[str], gateway_limits: dict | None = None,
                 gateway_env: dict | None = None):
        self.upstream, self.procs = upstream, [upstream]
        self.targets = {"direct": Target("direct", upstream.url, None)}
        gw = gateway(logs, upstream.url, gateway_limits or OPEN_LIMITS, env=gateway_env)
        self.procs.append(gw)
        self.targets["cxygpt"] = Target("cxygpt", gw.url, gw)
        self.ready_s = {"cxygpt": gw.ready_s}
        for name, start, key in (("vllm-router", vllm_router, None), ("litellm", litellm, PEER_KEY)):
            if not peers:
                continue
            try:
                proc = start(logs, upstream.url)
            except RuntimeError as e:
                proc = None
                notes.append(f"{name} failed to start: {e}")
            if proc is None:
                if not any(name in n for n in notes):
                    notes.append(f"{name} is not installed (bench/setup_peers.sh): skipped")
                continue
            self.procs.append(proc)
            self.targets[name] = Target(name, proc.url, proc, key)
            self.ready_s[name] = proc.ready_s

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


# --- measurements --------------------------------------------------------------------------------------

def measure(target: Target, *, stream: bool, concurrency: int, duration: float, warmup: float = 1.0,
            max_tokens: int = 64, prompt_tokens: int = 16, rate: float | None = None, timeout: float = 60.0,
            tool: str = "bench", window_start: float | None = None, ramp_up: float = 0.0) -> dict:
    """One load point; the front's CPU per request / per chunk and RSS when it is a process of ours."""
    def cfg(d: float) -> LoadConfig:
        return LoadConfig(url=target.url, concurrency=concurrency, duration=d, stream=stream, model=MODEL,
                          api_key=target.api_key, prompt_tokens=str(prompt_tokens), max_tokens=str(max_tokens),
                          rate=rate, timeout=timeout, window_start=window_start if d == duration else None,
                          ramp_up=ramp_up)
    if warmup:
        run_load(cfg(warmup))
    pid = target.proc.pid if target.proc else None
    cpu0 = cpu_s(pid) if pid else None
    if tool == "wrk" and shutil.which("wrk") and not stream and rate is None:
        result = wrk(target, concurrency, duration, max_tokens, prompt_tokens)
    else:
        result = flatten(run_load(cfg(duration)))
    if pid:
        used = cpu_s(pid) - cpu0
        result["cpu_s"] = round(used, 3)
        result["cpu_per_request_us"] = round(used / result["ok"] * 1e6, 1) if result["ok"] else None
        result["cpu_per_chunk_us"] = round(used / result["chunks"] * 1e6, 2) if result.get("chunks") else None
        result["rss_mb"] = round(rss_mb(pid), 1)
    return result


def flatten(d: dict) -> dict:
    out = {k: d[k] for k in ("requests", "ok", "rps", "ok_rps", "output_tokens_per_s", "chunks", "chunks_per_s",
                             "elapsed_s", "dropped", "window_ok_rps")}
    out["tool"] = "cxygpt-bench"
    for key, prefix in (("ttft_ms", "ttft"), ("latency_ms", "lat"), ("rejection_ms", "reject")):
        for q in ("p50", "p95", "p99", "avg", "max"):
            out[f"{prefix}_{q}_ms"] = d[key][q]
    out["errors"] = d["errors"]
    out["status_counts"] = d["status_counts"]
    out["rejections"] = d["rejection_ms"]["n"]
    out["rejections_with_retry_after"] = d["rejections_with_retry_after"]
    return out


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{auth}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {{"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, '
    .. '"mean_us": %f, "max_us": %d, "status_errors": %d, "other_errors": %d}}\\n', summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.mean,
    latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def wrk(target: Target, concurrency: int, duration: float, max_tokens: int, prompt_tokens: int) -> dict:
    from cxygpt_bench.load import prompt_of
    body = json.dumps({"model": MODEL, "max_tokens": max_tokens, "stream": False,
                       "messages": [{"role": "user", "content": prompt_of(prompt_tokens)}]})
    auth = f'wrk.headers["Authorization"] = "Bearer {target.api_key}"' if target.api_key else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT.format(body=body, auth=auth))
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", "--timeout", "30s", "-s", f.name,
                              target.url], capture_output=True, text=True, timeout=duration + 60).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"WRKJSON (\{.*\})", out)
    if not m:
        raise RuntimeError(f"wrk output not understood: {out[-500:]}")
    w = json.loads(m.group(1))
    seconds = w["duration_us"] / 1e6
    errors = w["status_errors"] + w["other_errors"]
    ok = w["requests"] - errors
    return {"tool": "wrk", "requests": w["requests"], "ok": ok, "rps": w["requests"] / seconds, "ok_rps": ok / seconds,
            "elapsed_s": seconds, "lat_p50_ms": w["p50_us"] / 1000, "lat_p95_ms": w["p95_us"] / 1000,
            "lat_p99_ms": w["p99_us"] / 1000, "lat_avg_ms": w["mean_us"] / 1000, "lat_max_ms": w["max_us"] / 1000,
            "errors": {"non_2xx_or_socket": errors}, "chunks": 0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def each(stack: Stack, label: str, **kw) -> dict:
    out = {}
    for name in ORDER:
        if name in stack.targets:
            r = out[name] = measure(stack.targets[name], **kw)
            log(f"{label:28s} {name:12s} ok {r['ok']:7d}  rps {r['ok_rps']:9.1f}  "
                f"p50 {r.get('ttft_p50_ms') or r.get('lat_p50_ms') or 0:8.3f} ms  "
                f"chunks/s {r.get('chunks_per_s') or 0:9.0f}  cpu/req {r.get('cpu_per_request_us') or '-'} us")
    return out


def g1_g2(logs: Path, peers: bool, notes: list[str], d: float) -> dict:
    """G1 streaming relay (64 chunks) and G2 non-streaming, fast fake upstream."""
    up = fake_upstream(logs, tokens=64)
    stack = Stack(logs, up, peers, notes)
    try:
        return {"ready_s": stack.ready_s,
                "g1_stream_c1": each(stack, "G1 stream c1", stream=True, concurrency=1, duration=d),
                "g1_stream_c32": each(stack, "G1 stream c32", stream=True, concurrency=32, duration=d),
                "g2_whole_c1": each(stack, "G2 non-stream c1", stream=False, concurrency=1, duration=d, tool="wrk"),
                "g2_whole_c16": each(stack, "G2 non-stream c16", stream=False, concurrency=16, duration=d, tool="wrk")}
    finally:
        stack.stop()


def g3(logs: Path, peers: bool, notes: list[str], d: float) -> dict:
    """G3 upstream-bound: 10 ms per token, 64 tokens, c64; the users start over one answer's time (640 ms), as
    users do, rather than in one instant: with answers of one length they would stay in lockstep, and every
    request would meet the other 63 in a burst."""
    up = fake_upstream(logs, tokens=64, ttft_ms=10, itl_ms=10)
    stack = Stack(logs, up, peers, notes)
    try:
        return {"g3_paced_c64": each(stack, "G3 10ms/token c64", stream=True, concurrency=64, duration=d, warmup=1.5,
                                     ramp_up=0.64)}
    finally:
        stack.stop()


# G4: an engine with 8 slots, 20 ms TTFT, 10 ms per token; 48 output tokens (24 while degraded). Its capacity
# must not depend on the arrivals: every request sends the same prompt, so with the prefix cache on each one
# after the first would skip 96 of its ~117 prompt tokens (a best case no real workload has); the token budget
# (8 × ~117 never fills it) and the KV blocks (no preemption) are pinned so a change of the simulator's
# defaults cannot move the capacity, and so is every speed knob: prefill and context per 1k tokens are what the
# 20 ms TTFT and 10 ms ITL scaled from the h100-80g profile's knobs before it came from silicon data (issue 29)
G4_SIM = ("--max-num-seqs", "8", "--ttft-ms", "20", "--itl-ms", "10", "--sim-itl-batch-slope", "0",
          "--sim-prefill-ms-per-1k", "45.4545", "--sim-context-ms-per-1k", "0.078125", "--sim-text", "echo",
          "--speed-profile", "h100-80g", "--no-enable-prefix-caching", "--max-num-batched-tokens", "8192",
          "--num-gpu-blocks-override", "2048")
G4_PROMPT, G4_MAX = 100, 48
# goodput and capacity count the answers that end between this second and the last arrival: the engine is full
# by then, and the drain after the last arrival (long for an unprotected queue) is left out
G4_WARM_S = 2.0
G4_LIMITS = {"rate_qps": 1_000_000, "rate_tpm": 1_000_000_000, "max_concurrency": 8, "queue_size": 8,
             "max_output_tokens": G4_MAX, "degraded_max_output_tokens": G4_MAX // 2,
             "timeouts": {"queue_s": 0.03},
             "degrade": {"p95_ttft_ms": 60, "queue_depth": 4, "hold_s": 1, "recover_s": 30}}


def g4(logs: Path, peers: bool, notes: list[str], d: float) -> dict:
    """G4 overload: open-loop arrivals at 1×, 2×, 3× the engine's measured capacity."""
    out: dict = {}
    sim = simulator(logs, *G4_SIM)
    try:
        direct = Target("direct", sim.url, None)
        unloaded = measure(direct, stream=True, concurrency=1, duration=3, warmup=0.5, max_tokens=G4_MAX,
                           prompt_tokens=G4_PROMPT)
        # every slot busy, each answer followed at once by the next request (8 users started over one answer's
        # time): the TTFT the engine itself gives at full occupancy, the least a front that keeps it full can
        # admit with
        full = measure(direct, stream=True, concurrency=8, duration=4, warmup=1.0, max_tokens=G4_MAX,
                       prompt_tokens=G4_PROMPT, ramp_up=0.6)
        # closed loop with every slot busy overstates what the engine serves under arrivals (its requests start
        # in lockstep, one prefill step for all): the capacity is what it completes per second when arrivals at
        # twice that keep it saturated
        closed = measure(direct, stream=True, concurrency=8, duration=4, warmup=1.0, max_tokens=G4_MAX,
                         prompt_tokens=G4_PROMPT)
        saturated = measure(direct, stream=True, concurrency=2000, duration=d, warmup=0, max_tokens=G4_MAX,
                            prompt_tokens=G4_PROMPT, rate=2 * closed["ok_rps"], timeout=60, window_start=G4_WARM_S)
        capacity = saturated["window_ok_rps"]
        out.update(capacity_rps=capacity, closed_loop_rps=closed["ok_rps"], unloaded_ttft_p95_ms=unloaded["ttft_p95_ms"],
                   unloaded_ttft_p50_ms=unloaded["ttft_p50_ms"], full_ttft_p50_ms=full["ttft_p50_ms"],
                   full_ttft_p95_ms=full["ttft_p95_ms"])
        log(f"G4 capacity {capacity:.1f} req/s (closed loop {closed['ok_rps']:.1f}), unloaded TTFT p50 "
            f"{unloaded['ttft_p50_ms']:.1f} p95 {unloaded['ttft_p95_ms']:.1f} ms, at full occupancy p50 "
            f"{full['ttft_p50_ms']:.1f} p95 {full['ttft_p95_ms']:.1f} ms")
    finally:
        sim.stop()
    fronts = [("cxygpt", {}), ("cxygpt+degrade", {"AUTO_DEGRADE": "1"}), ("direct", None)]
    if peers:
        fronts += [("vllm-router", None), ("litellm", None)]
    for front, env in fronts:
        out[front] = {}
        for mult in (1, 2, 3):
            sim = simulator(logs, *G4_SIM)  # a fresh engine: no backlog carried from the previous point
            procs = [sim]
            try:
                if front.startswith("cxygpt"):
                    gw = gateway(logs, sim.url, G4_LIMITS, env=env)
                    procs.append(gw)
                    target = Target(front, gw.url, gw)
                elif front == "direct":
                    target = Target("direct", sim.url, None)
                else:
                    proc = (vllm_router if front == "vllm-router" else litellm)(logs, sim.url)
                    if proc is None:
                        break
                    procs.append(proc)
                    target = Target(front, proc.url, proc, PEER_KEY if front == "litellm" else None)
                r = measure(target, stream=True, concurrency=2000, duration=d, warmup=0, max_tokens=G4_MAX,
                            prompt_tokens=G4_PROMPT, rate=mult * capacity, timeout=30, window_start=G4_WARM_S)
            except RuntimeError as e:
                notes.append(f"G4 {front}: {e}")
                break
            finally:
                for p in reversed(procs):
                    p.stop()
            r["offered_rps"] = mult * capacity
            r["goodput_ratio"] = r["window_ok_rps"] / capacity  # served per second in steady state
            out[front][f"{mult}x"] = r
            log(f"G4 {front:15s} {mult}x: ok {r['ok']:5d} goodput {r['goodput_ratio']:.2f}× capacity, TTFT p95 "
                f"{r['ttft_p95_ms'] or 0:8.1f} ms, rejected {r['rejections']} (p95 {r['reject_p95_ms'] or 0:.1f} ms, "
                f"Retry-After {r['rejections_with_retry_after']}), other errors {r['errors']['other']}")
    return out


def g6(logs: Path, runs: int = 5) -> dict:
    """G6: gateway process start to /readyz (median of several starts, upstream already up)."""
    up = fake_upstream(logs)
    try:
        times = []
        for _ in range(runs):
            gw = gateway(logs, up.url, OPEN_LIMITS)
            times.append(gw.ready_s)
            gw.stop()
        return {"gateway_ready_s": sorted(times)[len(times) // 2], "gateway_ready_all_s": times}
    finally:
        up.stop()


def g5(models: list[int]) -> list[dict]:
    sys.path.insert(0, str(REPO / "bench"))
    import asyncio

    import operator_scale
    results = []
    for n in models:
        with tempfile.TemporaryDirectory() as tmp:
            r = asyncio.run(operator_scale.run(n, 200, Path(tmp)))
        log(f"G5 {n} models: converged {r['converge_s']} s, RSS {r['operator_rss_mb']} MB, start {r['operator_start_s']} s")
        results.append(r)
    return results


# --- report ---------------------------------------------------------------------------------------------

def _v(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def ratio(a, b):
    return a / b if a and b else None


def goals(r: dict) -> list[tuple[str, str, str, bool | None]]:
    """(goal, target, measured, met) rows from one run's results."""
    rows = []
    get = lambda point, front, key: ((r.get(point) or {}).get(front) or {}).get(key)
    c32 = lambda f: get("g1_stream_c32", f, "chunks_per_s")
    added = get("g1_stream_c1", "cxygpt", "ttft_p50_ms"), get("g1_stream_c1", "direct", "ttft_p50_ms")
    if c32("cxygpt"):  # G1 was run (a missing peer still shows as n/a)
        rows.append(("G1 stream c32 chunks/s vs vllm-router", "≥ 1.0×",
                     _v(ratio(c32("cxygpt"), c32("vllm-router")), "{:.2f}×"),
                     None if not c32("vllm-router") else c32("cxygpt") >= c32("vllm-router")))
        rows.append(("G1 stream c32 chunks/s vs LiteLLM", "≥ 50×", _v(ratio(c32("cxygpt"), c32("litellm")), "{:.1f}×"),
                     None if not c32("litellm") else c32("cxygpt") >= 50 * c32("litellm")))
    if all(added):
        rows.append(("G1 added TTFT p50 at c1 over direct", "≤ 0.5 ms", f"{added[0] - added[1]:.3f} ms",
                     added[0] - added[1] <= 0.5))
    rps = lambda f: get("g2_whole_c16", f, "ok_rps")
    if rps("cxygpt"):
        rows.append(("G2 non-stream c16 rps vs vllm-router", "≥ 0.5×",
                     _v(ratio(rps("cxygpt"), rps("vllm-router")), "{:.2f}×"),
                     None if not rps("vllm-router") else rps("cxygpt") >= 0.5 * rps("vllm-router")))
        rows.append(("G2 non-stream c16 rps vs LiteLLM", "≥ 25×", _v(ratio(rps("cxygpt"), rps("litellm")), "{:.1f}×"),
                     None if not rps("litellm") else rps("cxygpt") >= 25 * rps("litellm")))
    p50 = get("g2_whole_c1", "cxygpt", "lat_p50_ms"), get("g2_whole_c1", "direct", "lat_p50_ms")
    if all(p50):
        rows.append(("G2 added latency p50 at c1 over direct", "≤ 0.5 ms", f"{p50[0] - p50[1]:.3f} ms", p50[0] - p50[1] <= 0.5))
    tps = lambda f: get("g3_paced_c64", f, "output_tokens_per_s")
    if tps("cxygpt") and tps("direct"):
        rows.append(("G3 10 ms/token c64 throughput vs direct", "≥ 0.99×", f"{tps('cxygpt') / tps('direct'):.3f}×",
                     tps("cxygpt") >= 0.99 * tps("direct")))
        t = get("g3_paced_c64", "cxygpt", "ttft_p50_ms") - get("g3_paced_c64", "direct", "ttft_p50_ms")
        rows.append(("G3 added TTFT p50", "≤ 1 ms", f"{t:.3f} ms", t <= 1.0))
    g4r = r.get("g4") or {}
    if "full_ttft_p95_ms" in g4r:
        queue_s = g4r["gateway_limits"]["timeouts"]["queue_s"]
        for front in ("cxygpt", "cxygpt+degrade"):
            for mult in ("1x", "2x", "3x"):
                p = (g4r.get(front) or {}).get(mult)
                if not p:
                    continue
                v = judge(p, engine_full_ttft_p95_ms=g4r["full_ttft_p95_ms"], queue_s=queue_s,
                          degrade=front == "cxygpt+degrade")
                rows.append((f"G4 {front} {mult}: admitted TTFT p95 ≤ 1.5 × engine's own + queue_s "
                             f"({v['ttft_bound_ms']:.0f} ms), goodput ≥ {v['goodput_min']:.0%}, rejections ≤ 50 ms "
                             "+ Retry-After", "report only" if mult == "1x" else "all three",
                             f"{_v(p['ttft_p95_ms'], '{:.0f}')} ms {mark(v['ttft_ok'])}, {p['goodput_ratio']:.0%} "
                             f"{mark(v['goodput_ok'])}, {p['rejections']} rejected (max {_v(p['reject_max_ms'])} ms, "
                             f"{p['rejections_with_retry_after']} with Retry-After) {mark(v['rejections_ok'])}",
                             None if mult == "1x" else v["met"]))
        for mult in ("1x", "2x", "3x"):
            others = [(f, (g4r.get(f) or {}).get(mult)) for f in ("direct", "vllm-router", "litellm")]
            others = [(f, p) for f, p in others if p]
            if others:
                rows.append((f"G4 {mult} on the same arrivals: TTFT p95, goodput", "report only",
                             ", ".join(f"{f} {_v(p['ttft_p95_ms'], '{:.0f}')} ms {p['goodput_ratio']:.0%}"
                                       for f, p in others), None))
    g5r = r.get("g5") or []
    big = [x for x in g5r if x["models"] == 1000]
    if big:
        rows.append(("G5 1000 models / 200 nodes converge", "≤ 60 s", f"{big[0]['converge_s']} s", big[0]["converge_s"] <= 60))
        rows.append(("G5 operator RSS at 1000 models", "≤ 200 MB", f"{big[0]['operator_rss_mb']} MB",
                     big[0]["operator_rss_mb"] <= 200))
    if r.get("g6"):
        rows.append(("G6 gateway start to ready", "≤ 1 s", f"{r['g6']['gateway_ready_s']:.2f} s", r["g6"]["gateway_ready_s"] <= 1))
    if g5r:
        start = max(x["operator_start_s"] for x in g5r)
        rows.append(("G6 operator start to ready (slowest of G5's runs)", "≤ 2 s", f"{start:.2f} s", start <= 2))
    return rows


def render(r: dict, command: str) -> str:
    lines = [MARK_BEGIN, "", f"Run {r['started']} on {r['machine']} ({r['load_before']}); command:", "",
             f"```sh\n{command}\n```", "", f"Raw results: `{r['results_file']}`.", ""]
    for note in r["notes"]:
        lines.append(f"- note: {note}")
    lines += ["", "### Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    for goal, target, measured, met in goals(r):
        lines.append(f"| {goal} | {target} | {measured} | {'yes' if met else 'no' if met is not None else 'n/a'} |")
    fronts = [f for f in ORDER if any(f in (r.get(p) or {}) for p in ("g1_stream_c1", "g3_paced_c64"))]
    head = "| point | " + " | ".join(fronts) + " |"
    sep = "|---|" + "---|" * len(fronts)

    def row(label, point, key, fmt="{:.1f}"):
        cells = [_v(((r.get(point) or {}).get(f) or {}).get(key), fmt) for f in fronts]
        return f"| {label} | " + " | ".join(cells) + " |"

    if fronts:  # G1–G3 were run
        lines += ["", "### Relay overhead (G1–G3), absolute numbers of this run", "", head, sep,
                  row("G1 stream c1: TTFT p50 (ms)", "g1_stream_c1", "ttft_p50_ms", "{:.3f}"),
                  row("G1 stream c32: chunks/s", "g1_stream_c32", "chunks_per_s", "{:.0f}"),
                  row("G1 stream c32: TTFT p50 (ms)", "g1_stream_c32", "ttft_p50_ms", "{:.2f}"),
                  row("G2 non-stream c1: rps", "g2_whole_c1", "ok_rps", "{:.0f}"),
                  row("G2 non-stream c1: p50 (ms)", "g2_whole_c1", "lat_p50_ms", "{:.3f}"),
                  row("G2 non-stream c16: rps", "g2_whole_c16", "ok_rps", "{:.0f}"),
                  row("G3 10 ms/token c64: output tokens/s", "g3_paced_c64", "output_tokens_per_s", "{:.0f}"),
                  row("G3 10 ms/token c64: TTFT p50 (ms)", "g3_paced_c64", "ttft_p50_ms", "{:.2f}"),
                  row("G3 10 ms/token c64: TTFT p95 (ms)", "g3_paced_c64", "ttft_p95_ms", "{:.2f}"),
                  row("G3 10 ms/token c64: total p50 (ms)", "g3_paced_c64", "lat_p50_ms", "{:.0f}"),
                  row("CPU per request, G2 c16 (µs)", "g2_whole_c16", "cpu_per_request_us", "{:.0f}"),
                  row("CPU per request, G1 c32 (µs)", "g1_stream_c32", "cpu_per_request_us", "{:.0f}"),
                  row("CPU per chunk, G1 c32 (µs)", "g1_stream_c32", "cpu_per_chunk_us", "{:.2f}"),
                  row("CPU per chunk, G3 c64 (µs)", "g3_paced_c64", "cpu_per_chunk_us", "{:.2f}"),
                  row("RSS after G1 c32 (MB)", "g1_stream_c32", "rss_mb", "{:.0f}"),
                  row("RSS after G2 c16 (MB)", "g2_whole_c16", "rss_mb", "{:.0f}"),
                  row("RSS after G3 c64 (MB)", "g3_paced_c64", "rss_mb", "{:.0f}")]
        ready = r.get("ready_s") or {}
        lines.append("| start to ready (s) | " + " | ".join(
            "-" if f == "direct" else _v(r["g6"]["gateway_ready_s"] if f == "cxygpt" and r.get("g6") else ready.get(f), "{:.2f}")
            for f in fronts) + " |")
    g4r = r.get("g4")
    if g4r:
        lines += ["", f"### Overload (G4): engine capacity {g4r['capacity_rps']:.1f} req/s (8 slots, 20 ms TTFT, 10 ms/token, "
                  f"{G4_PROMPT} words in, {G4_MAX} tokens out, no prefix cache; {g4r['closed_loop_rps']:.1f} req/s closed loop), unloaded TTFT p50 {g4r['unloaded_ttft_p50_ms']:.1f} / p95 "
                  f"{g4r['unloaded_ttft_p95_ms']:.1f} ms"
                  + (f", at full occupancy (8 users, each answer followed at once by the next request) p50 "
                     f"{g4r['full_ttft_p50_ms']:.1f} / p95 {g4r['full_ttft_p95_ms']:.1f} ms"
                     if "full_ttft_p95_ms" in g4r else "")
                  + f"; open-loop arrivals for {r['g4_duration_s']:g} s", "",
                  "| front | load | goodput (× capacity) | TTFT p50 / p95 of served (ms) | served | 503 / 429 (p95 ms to answer, with Retry-After) | other errors | front CPU per served request (µs) |",
                  "|---|---|---|---|---|---|---|---|"]
        for front in ("cxygpt", "cxygpt+degrade", "direct", "vllm-router", "litellm"):
            for mult, p in (g4r.get(front) or {}).items():
                e = p["errors"]
                lines.append(f"| {front} | {mult} | {p['goodput_ratio']:.2f} | {_v(p['ttft_p50_ms'], '{:.0f}')} / "
                             f"{_v(p['ttft_p95_ms'], '{:.0f}')} | {p['ok']} | {e['503']} / {e['429']} "
                             f"({_v(p['reject_p95_ms'])}, {p['rejections_with_retry_after']}) | {e['other']} | "
                             f"{_v(p.get('cpu_per_request_us'), '{:.0f}')} |")
    g5r = r.get("g5")
    if g5r:
        lines += ["", "### Operator scale (G5/G6, `bench/operator_scale.py`, 200 GPU nodes)", "",
                  "| ModelDeployments | converged (s) | created (s) | operator RSS (MB) | operator CPU (s) | API CPU (s) | start to ready (s) |",
                  "|---|---|---|---|---|---|---|"]
        for x in g5r:
            lines.append(f"| {x['models']} | {x['converge_s']} | {x['create_s']} | {x['operator_rss_mb']} | "
                         f"{x['operator_cpu_s']} | {x['api_cpu_s']} | {x['operator_start_s']} |")
    lines += ["", MARK_END]
    return "\n".join(lines)


def write_benchmarks(section: str, marks: tuple[str, str] = (MARK_BEGIN, MARK_END),
                     heading: str = "Latest results") -> None:
    """`section` (which starts and ends with `marks`) in place of BENCHMARKS.md's section between those marks, or
    at the end under `heading`."""
    begin, end = marks
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="+", choices=["G1", "G2", "G3", "G4", "G5", "G6"],
                    help="run these goals only (G1 and G2 share their processes)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per relay load point (G1, G2)")
    ap.add_argument("--g3-duration", type=float, default=10.0)
    ap.add_argument("--g4-duration", type=float, default=12.0)
    ap.add_argument("--g4-queue-s", type=float, default=G4_LIMITS["timeouts"]["queue_s"],
                    help="the gateway's queue timeout in G4 (its admitted TTFT vs goodput at 1x)")
    ap.add_argument("--g4-queue-size", type=int, default=G4_LIMITS["queue_size"])
    ap.add_argument("--g4-max-concurrency", type=int, default=G4_LIMITS["max_concurrency"],
                    help="the gateway's requests in flight to the engine in G4 (its slots are 8)")
    ap.add_argument("--models", type=int, nargs="+", default=[100, 300, 1000], help="G5 sizes")
    ap.add_argument("--no-peers", action="store_true", help="only direct and cxygpt")
    ap.add_argument("--no-write", action="store_true", help="print, do not write results or BENCHMARKS.md")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only rewrite BENCHMARKS.md's section from a results file")
    a = ap.parse_args(argv)
    if a.render:
        r = json.loads(Path(a.render).read_text())
        write_benchmarks(render(r, r["command"]))
        return 0
    only = set(a.only or ["G1", "G2", "G3", "G4", "G5", "G6"])
    command = "python bench/run.py" + ("" if argv is None and len(sys.argv) == 1 else
                                       " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    started = dt.datetime.now(dt.UTC)
    notes: list[str] = []
    if not shutil.which("wrk"):
        notes.append("wrk not installed: G2 measured with cxygpt-bench")
    r: dict = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "command": command,
               "machine": f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
               "load_before": "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()), "notes": notes,
               "g4_duration_s": a.g4_duration}
    log(f"suite started ({r['load_before']})")
    with tempfile.TemporaryDirectory(prefix="cxygpt-bench-") as tmp:
        logs = Path(tmp)
        peers = not a.no_peers
        if only & {"G1", "G2"}:
            r.update(g1_g2(logs, peers, notes, a.duration))
        if "G3" in only:
            r.update(g3(logs, peers, notes, a.g3_duration))
        if "G4" in only:
            G4_LIMITS.update(queue_size=a.g4_queue_size, max_concurrency=a.g4_max_concurrency,
                             timeouts={"queue_s": a.g4_queue_s})
            r["g4"] = g4(logs, peers, notes, a.g4_duration)
            r["g4"]["gateway_limits"] = G4_LIMITS
        if "G6" in only:
            r["g6"] = g6(logs)
            log(f"G6 gateway start to ready {r['g6']['gateway_ready_s']:.2f} s")
        if "G5" in only:
            r["g5"] = g5(a.models)
    r["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    name = started.strftime("%Y-%m-%dT%H%M") + ".json"
    r["results_file"] = f"bench/results/{name}"
    section = render(r, command)
    print(section)
    if not a.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(json.dumps(r, indent=1, default=str) + "\n")
        write_benchmarks(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
