"""The fleet benchmark (issue 15): a multi-turn chat workload over 4 simulator replicas with prefix caching, at 50,
80 and 100 % of the fleet's capacity, through each router; writes bench/results/fleet-<time>.json and the "Fleet
(issue 15)" results section of BENCHMARKS.md."""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from cxygpt_bench import fleet  # noqa: E402
from cxygpt_bench.procstat import cpu_s  # noqa: E402
from cxygpt_bench.stats import percentile  # noqa: E402
from run import MODEL, REPO, RESULTS, Proc, gateway, log, simulator, vllm_router  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- fleet:begin (bench/fleet.py writes this section) -->", "<!-- fleet:end -->"
REPLICAS = 4
BLOCK_SIZE = 16
SLOTS = 8
# Each replica: 8 slots, a token budget of 2048 per step (chunked prefill, so a long miss does not stall the running
# batch for a whole prompt), prefill 100 ms per 1k tokens against a decode step of ~14 ms: a lost prefix costs what
# it costs next to decode on an H100 at a batch of 128 (on 8 slots at the H100's own rates decode would dwarf it), at
# a speed whose capacity 2 shared cores can drive; KV blocks sized so that one replica holds its share of the
# conversations but not all of them (BENCHMARKS.md, "Fleet")
KV_BLOCKS = 3072
SIM_ARGS = ("--max-num-seqs", str(SLOTS), "--max-model-len", "16384", "--max-num-batched-tokens", "2048",
            "--speed-profile", "h100-80g", "--ttft-ms", "30", "--itl-ms", "10", "--sim-prefill-ms-per-1k", "100",
            "--sim-itl-batch-slope", "0.03", "--sim-context-ms-per-1k", "0.078125", "--block-size", str(BLOCK_SIZE),
            "--enable-prefix-caching")
# the capacity probe's replica: the same engine with a cache that never evicts within a run
CAPACITY_BLOCKS = 1_000_000
# the gateway refuses nothing (no 429/503 of its own): the fronts are compared on routing, not on admission. Its
# slots per replica are the engine's, as the operator derives them (a profile's max_concurrency is at most its
# max_num_seqs), so the gateway holds what the engines cannot run yet and places it when a slot frees;
# --gateway-slots 1024 sends everything to the engines at once (the runs before 2026-12-02 06:00 UTC)
FLEET_LIMITS = {"rate_qps": 1_000_000, "rate_tpm": 1_000_000_000, "max_concurrency": SLOTS, "queue_size": 4096,
                "max_input_tokens": 65536, "max_output_tokens": 512, "degraded_max_output_tokens": 512,
                "timeouts": {"connect_s": 5, "ttft_s": 120, "total_s": 300, "queue_s": 60}}
FRONTS = ("gw-prefix", "gw-least-load", "gw-round-robin", "random", "vr-cache_aware", "vr-round_robin", "gw-prefix-x2")
# not run by default: each conversation pinned to one replica by the client (affinity with no load bound and no
# proxy), a reference for what affinity alone gives
EXTRA_FRONTS = ("sticky",)
GATEWAY_POLICY = {"gw-prefix": "prefix", "gw-least-load": "least-load", "gw-round-robin": "round-robin",
                  "gw-prefix-x2": "prefix"}
LOADS = (0.5, 0.8, 1.0)
CPU_BOUND = 0.8  # cores used by one single-threaded process (the client, a simulator, a gateway) that are noted
METRIC = re.compile(rb"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", re.M)


def load_name(load: float) -> str:
    return f"{load:.0%}"


# --- the client ------------------------------------------------------------------------------------------

@dataclass
class Result:
    conversation: int
    turn: int
    scheduled: float          # seconds from the start
    sent: float
    status: str = "ok"        # ok | http-<code> | broken (no [DONE] or an error event) | timeout | connection
    ttft: float | None = None  # to the first content piece
    total: float | None = None
    end: float | None = None
    tokens: int = 0
    text: str = field(default="", repr=False)


async def _exchange(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict, clock) -> tuple:
    """One streamed chat completion: (status, ttft, text, completion tokens); status "ok" only for a 200 whose stream
    ended in [DONE] with no error event."""
    started = clock()
    async with session.post(url, data=body, headers=headers) as r:
        if r.status != 200:
            await r.read()
            return f"http-{r.status}", None, "", 0
        buf, parts, ttft, tokens, done, error = b"", [], None, 0, False, False
        async for data in r.content.iter_any():
            buf += data
            while (i := buf.find(b"\n\n")) >= 0:
                event, buf = buf[:i], buf[i + 2:]
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    try:
                        obj = orjson.loads(payload)
                    except orjson.JSONDecodeError:
                        error = True
                        continue
                    if "error" in obj:
                        error = True
                    for choice in obj.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            if ttft is None:
                                ttft = clock() - started
                            parts.append(piece)
                    if obj.get("usage"):
                        tokens = obj["usage"].get("completion_tokens") or 0
        return ("ok" if done and not error else "broken"), ttft, "".join(parts), tokens


class Client:
    """Drives a point: each conversation is a task that sends its turns at their scheduled times (or when the
    previous answer ends, if later), appending the user message and the actual answer to its history; a failed
    turn ends its conversation. Samples the replicas' running + waiting requests meanwhile."""

    def __init__(self, spec: fleet.WorkloadSpec, sends: list[fleet.Send], conversations: list[fleet.Conversation],
                 pick, *, timeout: float, session_mode: str, sims: list[str], sample_s: float,
                 duration: float = float("inf")):
        self.spec, self.sends, self.conversations, self.pick = spec, sends, conversations, pick
        self.timeout, self.session_mode, self.sims, self.sample_s = timeout, session_mode, sims, sample_s
        self.duration = duration
        self.cut = 0  # turns not sent: the previous answer ended after the last arrival
        self.systems = fleet.system_prompts(spec)
        self.results: list[Result] = []
        self.samples: list[tuple[float, list[float]]] = []
        self.answers: dict[int, list[str]] = {}
        self.counter = 0

    def body(self, conv: fleet.Conversation, turn: int) -> tuple[bytes, dict]:
        data = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                "max_tokens": conv.turns[turn].max_tokens, "ignore_eos": True, "temperature": 0,
                "messages": fleet.messages(self.systems[conv.tenant], conv, turn, self.answers[conv.index])}
        headers = {"Content-Type": "application/json"}
        if self.session_mode == "user":
            data["user"] = conv.id
        elif self.session_mode == "header":
            headers["x-session-id"] = conv.id
        return orjson.dumps(data), headers

    async def conversation(self, session, conv: fleet.Conversation, times: list[float], t0: float) -> None:
        clock = time.perf_counter
        self.answers[conv.index] = []
        for turn, at in enumerate(times):
            delay = t0 + at - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            if clock() - t0 >= self.duration:
                self.cut += len(times) - turn
                return
            body, headers = self.body(conv, turn)
            url, extra = self.pick(conv.index, turn, self.counter)
            self.counter += 1
            res = Result(conv.index, turn, at, clock() - t0)
            self.results.append(res)
            start = clock()
            try:
                res.status, res.ttft, res.text, res.tokens = await _exchange(session, url, body, {**headers, **extra},
                                                                             clock)
            except TimeoutError:
                res.status = "timeout"
            except (aiohttp.ClientError, OSError):
                res.status = "connection"
            res.total, res.end = clock() - start, clock() - t0
            if res.status != "ok":
                return
            self.answers[conv.index].append(res.text)

    async def sampler(self, session, t0: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.perf_counter() - t0
            loads = await asyncio.gather(*(self._in_flight(session, u) for u in self.sims))
            if all(x is not None for x in loads):
                self.samples.append((now, loads))
            try:
                await asyncio.wait_for(stop.wait(), self.sample_s)
            except TimeoutError:
                pass

    @staticmethod
    async def _in_flight(session, base: str) -> float | None:
        try:
            async with session.get(base + "/metrics") as r:
                m = metrics(await r.read())
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None
        return m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)

    async def run(self) -> float:
        by_conv: dict[int, list[float]] = {}
        for s in self.sends:
            by_conv.setdefault(s.conversation, []).append(s.at)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as probes:
            t0 = time.perf_counter()
            stop = asyncio.Event()
            sampler = asyncio.ensure_future(self.sampler(probes, t0, stop))
            await asyncio.gather(*(self.conversation(session, self.conversations[c], times, t0)
                                   for c, times in by_conv.items()))
            stop.set()
            await sampler
            return time.perf_counter() - t0


def metrics(text: bytes) -> dict[str, float]:
    """vLLM's gauges and counters by name, summed over their labels."""
    out: dict[str, float] = {}
    for name, value in METRIC.findall(text):
        key = name.decode()
        out[key] = out.get(key, 0.0) + float(value)
    return out


def read_metrics(urls: list[str]) -> list[dict[str, float]]:
    import httpx
    with httpx.Client(timeout=5) as c:
        return [metrics(c.get(u + "/metrics").content) for u in urls]


def run_client(client) -> float:
    """The client's run in a fresh event loop (uvloop when installed), with no garbage collection during it: the
    collector's gen-2 passes (~100 ms over a large heap) would count as the fronts' latency; what the run leaves is
    collected after it."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    gc.collect()
    gc.disable()
    try:
        return runner(client.run())
    finally:
        gc.enable()


# --- the ideal hit rate ----------------------------------------------------------------------------------

def replay(client: Client, prompts: fleet.PromptTokens) -> dict:
    """The point's requests, in the order sent: the ideal hit rate (one cache that never evicts) and the working
    set (what the fleet would have to keep cached to lose nothing that comes back), from their token ids."""
    seq, events = [], []
    systems = [len(prompts.ids([{"role": "system", "content": s}])) - len(prompts.tail) for s in client.systems]
    for r in sorted(client.results, key=lambda r: r.sent):
        conv = client.conversations[r.conversation]
        answers = client.answers[r.conversation][:r.turn]
        ids = prompts.ids(fleet.messages(client.systems[conv.tenant], conv, r.turn, answers))
        seq.append(ids)
        events.append((r.sent, r.conversation, len(ids) - systems[conv.tenant], r.turn == len(conv.turns) - 1))
    hits, queries = fleet.ideal_hits(seq, BLOCK_SIZE)
    return {"ideal_hits": hits, "ideal_queries": queries, "ideal_hit_rate": hits / queries if queries else None,
            "working_set_tokens": fleet.working_set(events, sum(systems)),
            "prompt_tokens_mean": sum(map(len, seq)) / len(seq) if seq else None}


# --- fronts and points -----------------------------------------------------------------------------------

class Fleet:
    """Fresh replicas (cold caches) for one point."""

    def __init__(self, logs: Path, blocks: int = KV_BLOCKS, replicas: int = REPLICAS):
        self.sims = [simulator(logs, *SIM_ARGS, "--num-gpu-blocks-override", str(blocks), wait=False)
                     for _ in range(replicas)]
        try:
            for s in self.sims:
                s.wait_ready()
        except RuntimeError:
            self.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.sims]

    def stop(self) -> None:
        stop_all(self.sims)


def routing_supported(notes: list[str]) -> bool:
    """Whether this gateway's static config takes a model's `routing:` (the policies of issue 15)."""
    from pydantic import ValidationError

    from cxygpt_gateway.settings import ModelConfig
    try:
        ModelConfig.model_validate({"name": MODEL, "url": "http://127.0.0.1:9", "routing": {"policy": "least-load"}})
    except ValidationError:
        notes.append("this gateway does not accept `routing:` (issue 15's policies not merged): gw-least-load ran "
                     "with today's balancing (least outstanding requests), the other gateway policies were skipped")
        return False
    return True


def start_front(front: str, logs: Path, urls: list[str], *, routing: bool, epsilon: float | None,
                vr_cache_args: tuple[str, ...], limits: dict = FLEET_LIMITS) -> list[Proc] | None:
    """The front's processes (none for random); None when this front cannot run here."""
    if front in ("random", "sticky"):
        return []
    if front.startswith("vr-"):
        policy = front[3:]
        proc = vllm_router(logs, urls, policy=policy, extra=vr_cache_args if policy == "cache_aware" else ())
        return None if proc is None else [proc]
    policy = GATEWAY_POLICY[front]
    if not routing and policy != "least-load":
        return None
    settings = {}
    if routing:
        settings["routing"] = {"policy": policy, **({"epsilon": epsilon} if epsilon is not None else {})}
    count = 2 if front == "gw-prefix-x2" else 1
    # each gateway told how many share the engines, as the chart tells them (gateway_replicas)
    shared = {"gateway_replicas": count} if routing and count > 1 else {}
    procs = [gateway(logs, urls, limits, profile="SRV_80G", model_settings=settings, settings=shared, wait=False)
             for _ in range(count)]
    try:
        for p in procs:
            p.wait_ready()
    except RuntimeError:
        for p in procs:
            p.stop()
        raise
    return procs


def picker(front: str, procs: list[Proc], sims: list[str], seed: int):
    chat = "/v1/chat/completions"
    if front == "random":
        return lambda c, k, i: (sims[fleet.replica_of(seed, c, k, len(sims))] + chat, {})
    if front == "sticky":
        return lambda c, k, i: (sims[fleet.replica_of(seed, c, 0, len(sims))] + chat, {})
    if len(procs) == 2:
        return lambda c, k, i: (procs[i % 2].url + chat, {})
    return lambda c, k, i: (procs[0].url + chat, {})


def summarize(client: Client, elapsed: float, *, duration: float, warm: float, before: list[dict],
              after: list[dict], cpu: dict, replayed: dict) -> dict:
    res = client.results
    window = [r for r in res if warm <= r.sent < duration]
    ok = [r for r in window if r.status == "ok" and r.ttft is not None]
    ttft = [r.ttft * 1000 for r in ok]
    ended = [r for r in res if r.status == "ok" and r.end is not None and warm <= r.end <= duration]
    span = duration - warm
    errors = {}
    for r in res:
        if r.status != "ok":
            errors[r.status] = errors.get(r.status, 0) + 1
    late = [r.sent - r.scheduled for r in res]
    delta = lambda key: [a.get(key, 0) - b.get(key, 0) for a, b in zip(after, before)]
    queries, hits = sum(delta("vllm:prefix_cache_queries_total")), sum(delta("vllm:prefix_cache_hits_total"))
    bal = fleet.balance([s for t, s in client.samples if warm <= t <= duration])
    return {
        "scheduled": len(client.sends), "sent": len(res), "cut_at_end": client.cut,
        "unsent_after_error": len(client.sends) - len(res) - client.cut, "ok": sum(r.status == "ok" for r in res),
        "errors": sum(errors.values()), "errors_by_kind": errors, "elapsed_s": round(elapsed, 2),
        "window_sent": len(window), "ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p99_ms": percentile(ttft, 99),
        "latency_p50_ms": percentile([r.total * 1000 for r in ok], 50),
        "output_tokens_per_s": sum(r.tokens for r in ended) / span, "ok_rps": len(ended) / span,
        "late_sends": sum(1 for x in late if x > 0.05), "late_p90_s": percentile(late, 90),
        "hit_rate": hits / queries if queries else None, "prefix_queries": queries, "prefix_hits": hits, **replayed,
        "preemptions": sum(delta("vllm:num_preemptions_total")),
        "served_per_replica": [round(x) for x in delta("vllm:request_success_total")],
        "in_flight_mean": [round(x, 2) for x in bal["mean"]], "in_flight_peak": bal["peak"],
        "max_over_mean": bal["max_over_mean"], "samples": bal["samples"], "cpu_cores": cpu,
    }


def check_same_answers(answers: dict[str, dict], load: str, notes: list[str]) -> None:
    """Every front must have been sent the same requests: the answers (which the simulator derives from the
    prompt) of the turns that two fronts both served must be equal."""
    fronts = list(answers)
    for other in fronts[1:]:
        common = answers[fronts[0]].keys() & answers[other].keys()
        differ = sum(answers[fronts[0]][k] != answers[other][k] for k in common)
        if differ:
            notes.append(f"at {load}, {differ} of the {len(common)} turns that {fronts[0]} and {other} both served "
                         "got different answers: a front changed the requests")


def stop_all(procs: list[Proc]) -> None:
    """SIGTERM to all at once, then wait for each (one by one, each waits for the last to go)."""
    for p in procs:
        if p.proc and p.proc.poll() is None:
            try:
                os.killpg(p.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        p.stop()


def run_point(front: str, load: float, rate: float, spec: fleet.WorkloadSpec, a, logs: Path, notes: list[str],
              routing: bool, prompts: fleet.PromptTokens, answers: dict) -> dict | None:
    """One front at one load on fresh replicas; `answers` gets the front's answers (a digest per turn) to check
    that every front was sent the same requests."""
    sends, conversations = fleet.schedule(spec, rate, a.duration)
    setup = time.perf_counter()
    fl = Fleet(logs)
    procs: list[Proc] = []
    try:
        got = start_front(front, logs, fl.urls, routing=routing, epsilon=a.epsilon,
                          vr_cache_args=tuple(shlex.split(a.vr_cache_args)), limits=a.gateway_limits)
        if got is None:
            return None
        procs = got
        client = Client(spec, sends, conversations, picker(front, procs, fl.urls, spec.seed), timeout=a.timeout,
                        session_mode=a.session, sims=fl.urls, sample_s=a.sample_s, duration=a.duration)
        before = read_metrics(fl.urls)
        setup = time.perf_counter() - setup
        pids = {"client": [os.getpid()], "sims": [s.pid for s in fl.sims], "front": [p.pid for p in procs]}
        cpu0 = {k: [cpu_s(p) for p in v] for k, v in pids.items()}
        wall0 = time.perf_counter()
        elapsed = run_client(client)
        wall = time.perf_counter() - wall0
        used = {k: [cpu_s(p) - c for p, c in zip(v, cpu0[k])] for k, v in pids.items()}
        after = read_metrics(fl.urls)
    finally:
        stopping = time.perf_counter()
        stop_all(procs + fl.sims)
        stopping = time.perf_counter() - stopping
    cpu = {"client": round(sum(used["client"]) / wall, 2), "sims_total": round(sum(used["sims"]) / wall, 2),
           "sim_max": round(max(used["sims"]) / wall, 2),
           "front": round(sum(used["front"]) / wall, 2) if used["front"] else None,
           "front_max_process": round(max(used["front"]) / wall, 2) if used["front"] else None}
    r = summarize(client, elapsed, duration=a.duration, warm=a.warm, before=before, after=after, cpu=cpu,
                  replayed=replay(client, prompts))
    r.update(front=front, load=load, offered_rps=rate, setup_s=round(setup, 2), stop_s=round(stopping, 2))
    answers[front] = {(x.conversation, x.turn): hashlib.blake2b(x.text.encode(), digest_size=8).digest()
                      for x in client.results if x.status == "ok"}
    if r["prefix_queries"] != r["ideal_queries"]:
        notes.append(f"{front} at {load_name(load)}: the replicas queried {r['prefix_queries']:.0f} prompt tokens, the "
                     f"replay {r['ideal_queries']} ({r['preemptions']:.0f} preemptions re-query theirs)")
    busy = {name: v for name, v in (("client", cpu["client"]), ("a simulator", cpu["sim_max"]),
                                     ("the front", cpu["front_max_process"])) if v is not None and v >= CPU_BOUND}
    if busy:
        notes.append(f"{front} at {load_name(load)}: " + ", ".join(f"{k} used {v} cores" for k, v in busy.items())
                     + f" (≥ {CPU_BOUND}: may be CPU-bound, its latencies include waiting for a core)")
    log(f"{front:15s} {load_name(load):>4s}: sent {r['sent']:4d} err {r['errors']:3d} late {r['late_sends']:3d}  TTFT "
        f"p50/p90/p99 {fmt(r['ttft_p50_ms'])}/{fmt(r['ttft_p90_ms'])}/{fmt(r['ttft_p99_ms'])} ms  tok/s "
        f"{r['output_tokens_per_s']:6.0f}  hit {pct(r['hit_rate'])} (ideal {pct(r['ideal_hit_rate'])})  max/mean "
        f"{fmt(r['max_over_mean'], '{:.2f}')}  run {r['elapsed_s']} s (setup {r['setup_s']}, stop {r['stop_s']})  cpu client {cpu['client']} sims {cpu['sims_total']} front {cpu['front']}")
    return r


def capacity(spec: fleet.WorkloadSpec, a, logs: Path, prompts: fleet.PromptTokens) -> dict:
    """One replica, the same engine with a cache that never evicts, kept saturated: 2 × its slots of closed-loop
    users each running the workload's conversations back to back with no think time. What it serves per second
    (answers ending after the warm-up) times the replicas is the fleet's capacity: what it would serve if no prefix
    were ever lost and the load were even, whichever the router."""
    fl = Fleet(logs, blocks=CAPACITY_BLOCKS, replicas=1)
    users = 2 * SLOTS
    sends: list[fleet.Send] = []
    conversations = [fleet.conversation(spec, i) for i in range(400)]
    try:
        client = Client(spec, sends, conversations, lambda c, k, i: (fl.urls[0] + "/v1/chat/completions", {}),
                        timeout=a.timeout, session_mode="none", sims=fl.urls, sample_s=1.0)
        before = read_metrics(fl.urls)
        cpu0 = cpu_s(fl.sims[0].pid)
        wall0 = time.perf_counter()
        elapsed = run_client(_ClosedLoop(client, users, a.capacity_s))
        sim_cores = (cpu_s(fl.sims[0].pid) - cpu0) / (time.perf_counter() - wall0)
        after = read_metrics(fl.urls)
    finally:
        fl.stop()
    warm = a.capacity_s / 4
    span = a.capacity_s - warm
    ended = [r for r in client.results if r.status == "ok" and warm <= r.end <= a.capacity_s]
    q = after[0].get("vllm:prefix_cache_queries_total", 0) - before[0].get("vllm:prefix_cache_queries_total", 0)
    h = after[0].get("vllm:prefix_cache_hits_total", 0) - before[0].get("vllm:prefix_cache_hits_total", 0)
    replayed = replay(client, prompts)
    ttft = [r.ttft * 1000 for r in ended if r.ttft is not None]
    out = {"replica_rps": len(ended) / span, "fleet_rps": REPLICAS * len(ended) / span,
           "replica_output_tokens_per_s": sum(r.tokens for r in ended) / span, "users": users,
           "duration_s": a.capacity_s, "requests": len(client.results),
           "errors": sum(r.status != "ok" for r in client.results), "hit_rate": h / q if q else None,
           "ideal_hit_rate": replayed["ideal_hit_rate"], "ttft_p50_ms": percentile(ttft, 50),
           "prompt_tokens_mean": (after[0].get("vllm:prompt_tokens_total", 0) - before[0].get("vllm:prompt_tokens_total", 0))
           / max(len(client.results), 1), "sim_cpu_cores": round(sim_cores, 2), "elapsed_s": round(elapsed, 1)}
    log(f"capacity: one replica {out['replica_rps']:.2f} req/s ({out['replica_output_tokens_per_s']:.0f} output "
        f"tokens/s, {users} closed-loop users, hit rate {pct(out['hit_rate'])} (computed ideal "
        f"{pct(out['ideal_hit_rate'])}), mean prompt "
        f"{out['prompt_tokens_mean']:.0f} tokens, sim CPU {sim_cores:.2f} cores) -> fleet {out['fleet_rps']:.2f} req/s")
    return out


class _ClosedLoop:
    """Closed-loop users over the client's conversations: each takes the next conversation and sends its turns back
    to back until `duration`; a wrapper so Client's request code and bookkeeping are reused."""

    def __init__(self, client: Client, users: int, duration: float):
        self.client, self.users, self.duration = client, users, duration

    async def run(self) -> float:
        c, clock = self.client, time.perf_counter
        nxt = iter(range(len(c.conversations)))
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=c.timeout),
                                         auto_decompress=False) as session:
            t0 = clock()

            async def user():
                while clock() - t0 < self.duration:
                    conv = c.conversations[next(nxt)]
                    c.answers[conv.index] = []
                    for turn in range(len(conv.turns)):
                        if clock() - t0 >= self.duration:
                            return
                        body, headers = c.body(conv, turn)
                        res = Result(conv.index, turn, clock() - t0, clock() - t0)
                        c.results.append(res)
                        start = clock()
                        try:
                            res.status, res.ttft, res.text, res.tokens = await _exchange(
                                session, c.pick(conv.index, turn, 0)[0], body, headers, clock)
                        except (TimeoutError, aiohttp.ClientError, OSError):
                            res.status = "connection"
                        res.total, res.end = clock() - start, clock() - t0
                        if res.status != "ok":
                            break
                        c.answers[conv.index].append(res.text)

            await asyncio.gather(*(user() for _ in range(self.users)))
            return clock() - t0


# --- report ----------------------------------------------------------------------------------------------

def fmt(x, f="{:.0f}"):
    return "-" if x is None else f.format(x)


def pct(x):
    return "-" if x is None else f"{x:.0%}"


def goal_points(r: dict) -> dict:
    return {front: {load: p for load, p in loads.items()} for front, loads in r["points"].items()}


def working_sets(r: dict) -> dict:
    """The working set per load (the same arrivals for every front: taken from the first front measured)."""
    out = {}
    for load in r["loads"]:
        for front in r["fronts"]:
            p = (r["points"].get(front) or {}).get(load)
            if p:
                out[load] = p["working_set_tokens"]
                break
    return out


def render(r: dict) -> str:
    cap, w = r["capacity"], r["workload"]
    lines = [MARK_BEGIN, "", f"Run {r['started']} on {r['machine']} ({r['load_before']}; after: {r['load_after']}), "
             f"revision {r.get('revision') or '?'}; command:", "", f"```sh\n{r['command']}\n```", "",
             f"Raw results: `{r['results_file']}`."]
    if r["notes"]:
        lines.append("")
    for note in r["notes"]:
        lines.append(f"- note: {note}")
    if cap.get("given"):
        measured = f"Capacity given (`--capacity-rps`, not measured): **{cap['fleet_rps']:.2f} req/s**."
    else:
        measured = (f"Capacity: one replica served {cap['replica_rps']:.2f} req/s ({cap['replica_output_tokens_per_s']:.0f} "
                    f"output tokens/s; mean prompt {cap['prompt_tokens_mean']:.0f} tokens, hit rate "
                    f"{pct(cap['hit_rate'])}, computed ideal {pct(cap['ideal_hit_rate'])}) with a cache that never "
                    f"evicts, {cap['users']} closed-loop users, {cap['duration_s']:g} s; fleet capacity = {REPLICAS} × "
                    f"that = **{cap['fleet_rps']:.2f} req/s**.")
    lines += ["", measured + f" Points: {r['duration_s']:g} s of "
              f"arrivals each, measured from second {r['warm_s']:g}; workload seed {w['seed']}, session ids: "
              f"{r['session']}; the gateway's slots per replica: {r['gateway_limits']['max_concurrency']}. KV cache: {KV_BLOCKS * BLOCK_SIZE} tokens per replica, {REPLICAS * KV_BLOCKS * BLOCK_SIZE} in the "
              "fleet; what the fleet would have to keep to lose nothing that comes back (the latest prompt of every "
              "conversation with turns to come, system prompts once), mean / max over the requests: "
              + ", ".join(f"{load} {fmt(ws['mean'])} / {fmt(ws['max'])}" for load, ws in working_sets(r).items())
              + " tokens.", "", "### Goals (at 80 and 100 % of capacity)", "",
              "| load | goal | target | measured | met |", "|---|---|---|---|---|"]
    for g in r["goals"]:
        met = "yes" if g["met"] else "no" if g["met"] is not None else "n/a"
        lines.append(f"| {g['load']} | {g['goal']} | {g['target']} | {g['measured']} | {met} |")
    lines += ["", "### Points", "",
              "| load (req/s) | front | TTFT p50 / p90 / p99 (ms) | output tok/s | served req/s | hit rate (ideal) | "
              "in flight per replica, mean (max/mean) | errors | late / not sent | CPU cores: client / sims / front |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for load in r["loads"]:
        for front in r["fronts"]:
            p = (r["points"].get(front) or {}).get(load)
            if not p:
                continue
            c = p["cpu_cores"]
            lines.append(
                f"| {load} ({p['offered_rps']:.1f}) | {front} | {fmt(p['ttft_p50_ms'])} / {fmt(p['ttft_p90_ms'])} / "
                f"{fmt(p['ttft_p99_ms'])} | {p['output_tokens_per_s']:.0f} | {p['ok_rps']:.2f} | {pct(p['hit_rate'])} "
                f"({pct(p['ideal_hit_rate'])}) | {' '.join(f'{x:.1f}' for x in p['in_flight_mean'])} "
                f"({fmt(p['max_over_mean'], '{:.2f}')}) | {p['errors']} | {p['late_sends']} / {p['cut_at_end']} | {c['client']} / "
                f"{c['sims_total']} / {fmt(c['front'], '{}')} |")
    lines += ["", MARK_END]
    return "\n".join(lines)


def write_benchmarks(section: str) -> None:
    run.write_benchmarks(section, (MARK_BEGIN, MARK_END), "Fleet (issue 15): latest results")


def revision() -> str | None:
    """The checkout's commit (with -dirty when it has changes): which gateway was measured."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a ~2-minute smoke: 80 %% only, 8 s points")
    ap.add_argument("--loads", type=float, nargs="+", help="shares of the capacity (default 0.5 0.8 1.0)")
    ap.add_argument("--fronts", nargs="+", choices=FRONTS + EXTRA_FRONTS,
                    help=f"default: {' '.join(FRONTS)} (sticky: each conversation pinned to a replica by the client)")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per point (default 20, quick 8)")
    ap.add_argument("--warm", type=float, help="seconds from the start not measured (default a quarter)")
    ap.add_argument("--capacity-s", type=float, help="seconds of the capacity probe (default 20, quick 10)")
    ap.add_argument("--capacity-rps", type=float, help="use this fleet capacity instead of probing it")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request (more is an error)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--session", choices=("none", "user", "header"), default="none",
                    help="send the conversation id as the `user` field or an x-session-id header (default: none)")
    ap.add_argument("--epsilon", type=float, help="the gateway's bounded-load slack (default: the gateway's)")
    ap.add_argument("--vr-cache-args", default="", help="more vllm-router flags for cache_aware, e.g. "
                    "'--balance-abs-threshold 8' (default: none, its defaults)")
    ap.add_argument("--gateway-slots", type=int, default=SLOTS,
                    help=f"the gateway's max_concurrency per replica (default {SLOTS}, the engines' max-num-seqs)")
    ap.add_argument("--sample-s", type=float, default=0.25, help="seconds between samples of the replicas' load")
    ap.add_argument("--no-write", action="store_true", help="print, do not write results or BENCHMARKS.md")
    ap.add_argument("--results", metavar="PATH", help="also write the results JSON here (with --no-write too)")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="only rewrite BENCHMARKS.md's section from a results file")
    a = ap.parse_args(argv)
    if a.render:
        write_benchmarks(render(json.loads(Path(a.render).read_text())))
        return 0
    a.duration = a.duration or (8.0 if a.quick else 20.0)
    a.warm = a.duration / 4 if a.warm is None else a.warm
    a.gateway_limits = {**FLEET_LIMITS, "max_concurrency": a.gateway_slots}
    a.capacity_s = a.capacity_s or (10.0 if a.quick else 20.0)
    loads = a.loads or ((0.8,) if a.quick else LOADS)
    fronts = a.fronts or FRONTS
    spec = fleet.WorkloadSpec(seed=a.seed)
    args = list(argv if argv is not None else sys.argv[1:])
    if "--results" in args:  # where a copy goes changes nothing measured
        i = args.index("--results")
        del args[i:i + 2]
    command = "python bench/fleet.py" + (" " + shlex.join(args) if args else "")
    started = dt.datetime.now(dt.UTC)
    notes: list[str] = []
    r: dict = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "command": command,
               "machine": f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
               "load_before": "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()), "notes": notes,
               "workload": asdict(spec), "sim_args": list(SIM_ARGS), "kv_blocks": KV_BLOCKS,
               "gateway_limits": a.gateway_limits, "duration_s": a.duration, "warm_s": a.warm, "session": a.session,
               "epsilon": a.epsilon, "vr_cache_args": a.vr_cache_args, "fronts": list(fronts),
               "loads": [load_name(x) for x in loads], "points": {}, "revision": revision()}
    log(f"fleet benchmark started ({r['load_before']})")
    from cxygpt_sim import text
    prompts = fleet.PromptTokens(text.token_ids, text.render_chat)
    with tempfile.TemporaryDirectory(prefix="cxygpt-fleet-") as tmp:
        logs = Path(tmp)
        systems = fleet.system_prompts(spec)
        r["system_prompt_tokens"] = [len(prompts.ids([{"role": "system", "content": s}])) for s in systems]
        if a.capacity_rps:
            r["capacity"] = {"fleet_rps": a.capacity_rps, "given": True}
        else:
            r["capacity"] = capacity(spec, a, logs, prompts)
        routing = routing_supported(notes)
        for load in loads:
            rate = load * r["capacity"]["fleet_rps"]
            answers: dict = {}
            for front in fronts:
                try:
                    p = run_point(front, load, rate, spec, a, logs, notes, routing, prompts, answers)
                except RuntimeError as e:  # a process that did not start: what happened, not its log
                    notes.append(f"{front} at {load_name(load)}: {str(e).split(':', 1)[0]}")
                    log(f"{front} at {load_name(load)}: {e}")
                    continue
                if p is None:
                    if not any(n.startswith(front + ":") for n in notes) and front.startswith("vr-"):
                        notes.append(f"{front}: vllm-router is not installed (bench/setup_peers.sh): skipped")
                    continue
                r["points"].setdefault(front, {})[load_name(load)] = p
            check_same_answers(answers, load_name(load), notes)
    r["goals"] = fleet.judge(goal_points(r), [x for x in r["loads"] if x in fleet.JUDGED_LOADS])
    r["load_after"] = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    r["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    name = "fleet-" + started.strftime("%Y-%m-%dT%H%M") + ".json"
    r["results_file"] = f"bench/results/{name}"
    raw = json.dumps(r, indent=1, default=str) + "\n"
    if a.results:
        Path(a.results).write_text(raw)
    if not a.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(raw)
    section = render(r)
    print(section)
    if not a.no_write:
        write_benchmarks(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
