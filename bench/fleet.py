"""The fleet benchmark (issue 26): four workload shapes over 4 simulator replicas with prefix caching, each front
swept from light load to past its saturation on the same Poisson arrivals, judged by its throughput at a TTFT SLO;
writes bench/results/fleet-<time>.json and the "Fleet" results section of BENCHMARKS.md."""
from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import gc
import itertools
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
from dataclasses import asdict
from pathlib import Path

import aiohttp
import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402
from cxygpt_bench import fleet, shapes  # noqa: E402
from cxygpt_bench.procstat import cpu_s, free_port  # noqa: E402
from run import MODEL, REPO, RESULTS, VENVS, Proc, gateway, log, simulator, vllm_router  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- fleet-sweep:begin (bench/fleet.py writes this section) -->", "<!-- fleet-sweep:end -->"
REPLICAS = 4
BLOCK_SIZE = 16
SLOTS = 8
# Each replica: 8 slots, a token budget of 2048 per step (chunked prefill, so a long miss does not stall the running
# batch for a whole prompt), prefill 100 ms per 1k tokens against a decode step of ~14 ms: a lost prefix costs what
# it costs next to decode on an H100 at a batch of 128 (on 8 slots at the H100's own rates decode would dwarf it), at
# a speed whose capacity 2 shared cores can drive; KV blocks sized so that one replica holds its share of the
# conversations or documents but not all of them (BENCHMARKS.md, "Fleet")
KV_BLOCKS = 3072
SIM_ARGS = ("--max-num-seqs", str(SLOTS), "--max-model-len", "16384", "--max-num-batched-tokens", "2048",
            "--speed-profile", "h100-80g", "--ttft-ms", "30", "--itl-ms", "10", "--sim-prefill-ms-per-1k", "100",
            "--sim-itl-batch-slope", "0.03", "--block-size", str(BLOCK_SIZE), "--enable-prefix-caching")
# the capacity probe's replica: the same engine with a cache that never evicts within a run
CAPACITY_BLOCKS = 1_000_000
# the gateway refuses nothing (no 429/503 of its own): the fronts are compared on routing, not on admission. Its
# slots per replica are the engine's, as the operator derives them (a profile's max_concurrency is at most its
# max_num_seqs), so the gateway holds what the engines cannot run yet and places it when a slot frees
FLEET_LIMITS = {"rate_qps": 1_000_000, "rate_tpm": 1_000_000_000, "max_concurrency": SLOTS, "queue_size": 4096,
                "max_input_tokens": 65536, "max_output_tokens": 512, "degraded_max_output_tokens": 512,
                "timeouts": {"connect_s": 5, "ttft_s": 120, "total_s": 300, "queue_s": 60}}
FRONTS = ("gw-prefix", "gw-least-load", "gw-round-robin", "service", "vr-cache_aware", "vr-consistent_hash",
          "vr-power_of_two", "gw-prefix-x2")
EXTRA_FRONTS = ("vr-round_robin", "vr-random")   # not run by default
GATEWAY_POLICY = {"gw-prefix": "prefix", "gw-least-load": "least-load", "gw-round-robin": "round-robin",
                  "gw-prefix-x2": "prefix"}
GRID = (0.4, 0.6, 0.75, 0.9, 1.0, 1.15, 1.3, 1.5)
QUICK_GRID = (0.75,)
SLO_TTFT_S = 2.0
CPU_BOUND = 0.8  # cores used by one single-threaded process (the client, a simulator, a front) that are noted
METRIC = re.compile(rb"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", re.M)


# --- the client ------------------------------------------------------------------------------------------

def _events(buf: bytearray):
    """Complete SSE events taken off the front of buf: the payload of each `data:` line."""
    while (i := buf.find(b"\n\n")) >= 0:
        event = bytes(buf[:i])
        del buf[:i + 2]
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                yield line[5:].strip()


async def exchange(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict, clock, res: fleet.Result,
                   want_text: bool) -> None:
    """One streamed chat completion or completion into `res`: its first content piece's time, text (when wanted),
    completion tokens; status "ok" only for a 200 whose stream ended in [DONE] with no error event. Past the first
    piece, only events that may carry usage or an error are parsed unless the text is wanted (the client's CPU)."""
    started = clock()
    async with session.post(url, data=body, headers=headers) as r:
        if r.status != 200:
            await r.read()
            res.status = f"http-{r.status}"
            return
        buf, parts, done, error = bytearray(), [], False, False
        async for data in r.content.iter_any():
            buf += data
            for payload in _events(buf):
                if payload == b"[DONE]":
                    done = True
                    continue
                if res.ttft is not None and not want_text and b'"usage":{' not in payload \
                        and b'"error"' not in payload:
                    continue
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    error = True
                    continue
                if "error" in obj:
                    error = True
                for choice in obj.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        if res.ttft is None:
                            res.ttft = clock() - started
                        if want_text:
                            parts.append(piece)
                if obj.get("usage"):
                    res.tokens = obj["usage"].get("completion_tokens") or 0
        res.text = "".join(parts)
        res.status = "ok" if done and not error else "broken"


class Workload:
    """A shape's requests for a front's sweep: their bodies (the shared blocks' words salted per sweep, so that no
    front finds another's prefixes cached; the requests' own words by `point`, so that the warm-up's and the
    perfect router's probe's are not the sweep's), the warm-up requests (one per shared prefix) and the prompt
    token ids of what was sent."""

    def __init__(self, shape: str, spec, salt: int, point: int, session_mode: str):
        self.shape, self.spec, self.salt, self.point, self.session_mode = shape, spec, salt, point, session_mode
        self.chat = shape == "chat"
        self.systems = shapes.system_prompts(spec, salt) if self.chat else []
        self.answers: dict[int, list[str]] = {}
        self.conversations: list[shapes.Conversation] = []
        self.requests: dict[int, shapes.Request] = {}

    def extend(self, count: int) -> None:
        """Conversations (chat) or requests up to `count`."""
        if self.chat:
            self.conversations += [shapes.conversation(self.spec, i, self.salt, self.point)
                                   for i in range(len(self.conversations), count)]
        else:
            for i in range(len(self.requests), count):
                self.requests[i] = shapes.request(self.shape, self.spec, i, self.salt, self.point)

    def warm(self) -> list[tuple[str, bytes, dict, dict]]:
        """(path, body, headers, prompt fields) of one request per shared prefix, answering one token: a tenant's
        system prompt, a group's document or few-shot block (with the header)."""
        if self.chat:
            fields = [{"messages": [{"role": "system", "content": s}, {"role": "user", "content": "Hello."}]}
                      for s in self.systems]
            paths = [shapes.CHAT] * len(fields)
        else:
            reqs = [shapes.request(self.shape, self.spec, i, self.salt) for i in shapes.warm_indices(self.shape,
                                                                                                     self.spec)]
            fields, paths = [r.fields for r in reqs], [r.path for r in reqs]
        return [(path, self._encode(f, 1), {"Content-Type": "application/json"}, f) for path, f in zip(paths, fields)]

    def _encode(self, fields: dict, max_tokens: int) -> bytes:
        return orjson.dumps({"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                             "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, **fields})

    def chat_body(self, conv: shapes.Conversation, turn: int) -> tuple[str, bytes, dict]:
        fields = {"messages": shapes.messages(self.systems[conv.tenant], conv, turn, self.answers[conv.index])}
        headers = {"Content-Type": "application/json"}
        if self.session_mode == "user":
            fields["user"] = conv.id
        elif self.session_mode == "header":
            headers["x-session-id"] = conv.id
        return shapes.CHAT, self._encode(fields, conv.turns[turn].max_tokens), headers

    def body(self, index: int) -> tuple[str, bytes, dict]:
        req = self.requests[index]
        return req.path, self._encode(req.fields, req.max_tokens), {"Content-Type": "application/json"}

    def prompt_ids(self, res: fleet.Result, prompts: fleet.PromptTokens) -> list[int]:
        if self.chat:
            conv = self.conversations[res.conversation]
            return prompts.ids(shapes.messages(self.systems[conv.tenant], conv, res.turn,
                                               self.answers[conv.index][:res.turn]))
        return prompts.of(self.requests[res.index].fields)


class Client:
    """Drives a front's sweep, open loop: stages of rising rates back to back. Independent requests go at their
    arrival times; chat conversations are tasks that send their turns at their scheduled times (or when the
    previous answer ends, if later), appending the user message and the actual answer to their history (a failed
    turn ends its conversation). `grace` seconds after each stage's last arrival, `judge(k, now)` says whether the
    sweep goes on; when it does not, or after the last stage, what still runs is cut. Samples the replicas' load
    and counters, and reads the processes' CPU at each stage's bounds, meanwhile."""

    def __init__(self, load: Workload, pick, *, stages: list[tuple[float, float]], lead: float, grace: float,
                 timeout: float, sims: list[str], sample_s: float, pids: dict[str, list[int]], judge,
                 times: list[float] | None = None, sends: list[shapes.Send] | None = None):
        self.load, self.pick, self.times, self.sends = load, pick, times or [], sends or []
        self.lead, self.grace, self.timeout, self.sims, self.sample_s = lead, grace, timeout, sims, sample_s
        self.pids, self.judge = pids, judge
        self.bounds = list(itertools.accumulate([lead] + [d for _, d in stages]))   # stage k: bounds[k]..bounds[k+1]
        self.results: list[fleet.Result] = []
        self.samples: list[tuple[float, list[float], list[dict]]] = []
        self.cpu: list[tuple[float, dict]] = []
        self.counter = itertools.count()
        self.requests: set[asyncio.Task] = set()
        self.stopped_at = 0.0
        self.judged = 0   # stages judged

    async def _send(self, session, res: fleet.Result, path: str, body: bytes, headers: dict, t0: float) -> None:
        clock = time.perf_counter
        base, extra = self.pick(next(self.counter))
        self.results.append(res)
        try:
            await exchange(session, base + path, body, {**headers, **extra}, clock, res, want_text=self.load.chat)
        except asyncio.CancelledError:
            res.status = fleet.CUT
        except TimeoutError:
            res.status = "timeout"
        except (aiohttp.ClientError, OSError):
            res.status = "connection"
        res.end = clock() - t0

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.requests.add(task)
        task.add_done_callback(self.requests.discard)
        return task

    async def _independent(self, session, t0: float) -> None:
        clock = time.perf_counter
        for index, at in enumerate(self.times):
            if (delay := t0 + at - clock()) > 0:
                await asyncio.sleep(delay)
            path, body, headers = self.load.body(index)
            res = fleet.Result(sent=clock() - t0, scheduled=at, index=index)
            self._spawn(self._send(session, res, path, body, headers, t0))

    async def _conversation(self, session, conv: shapes.Conversation, times: list[float], t0: float) -> None:
        clock = time.perf_counter
        self.load.answers[conv.index] = []
        for turn, at in enumerate(times):
            if (delay := t0 + at - clock()) > 0:
                await asyncio.sleep(delay)
            if clock() - t0 >= self.bounds[-1]:
                return
            path, body, headers = self.load.chat_body(conv, turn)
            res = fleet.Result(sent=clock() - t0, scheduled=at, conversation=conv.index, turn=turn)
            await self._send(session, res, path, body, headers, t0)
            if res.status != "ok":
                return
            self.load.answers[conv.index].append(res.text)

    async def _sampler(self, session, t0: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.perf_counter() - t0
            got = await asyncio.gather(*(read_one(session, u) for u in self.sims))
            if all(m is not None for m in got):
                self.samples.append((now, [m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
                                           for m in got], got))
            try:
                await asyncio.wait_for(stop.wait(), self.sample_s)
            except TimeoutError:
                pass

    def _mark_cpu(self, t: float) -> None:
        self.cpu.append((t, {"client": time.process_time(),
                             **{k: [cpu_s(p) for p in v] for k, v in self.pids.items()}}))

    async def _monitor(self, t0: float) -> None:
        """Marks the CPU at each bound and judges each stage `grace` after its end."""
        clock = time.perf_counter
        marks = [(b, None) for b in self.bounds] + [(b + self.grace, k) for k, b in enumerate(self.bounds[1:])]
        for at, stage in sorted(marks, key=lambda m: (m[0], m[1] is not None)):
            if (delay := t0 + at - clock()) > 0:
                await asyncio.sleep(delay)
            if stage is None:
                self._mark_cpu(at)
                continue
            self.judged = stage + 1
            if not self.judge(stage, clock() - t0):
                return

    async def run(self) -> float:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as probes:
            t0 = time.perf_counter()
            stop = asyncio.Event()
            sampler = asyncio.ensure_future(self._sampler(probes, t0, stop))
            if self.load.chat:
                by_conv: dict[int, list[float]] = {}
                for s in self.sends:
                    by_conv.setdefault(s.conversation, []).append(s.at)
                senders = [asyncio.ensure_future(self._conversation(session, self.load.conversations[c], times, t0))
                           for c, times in by_conv.items()]
            else:
                senders = [asyncio.ensure_future(self._independent(session, t0))]
            await self._monitor(t0)
            self.stopped_at = time.perf_counter() - t0
            for t in senders + list(self.requests):
                t.cancel()
            await asyncio.gather(*senders, *list(self.requests), return_exceptions=True)
            stop.set()
            await sampler
            return time.perf_counter() - t0


async def read_one(session, base: str) -> dict[str, float] | None:
    try:
        async with session.get(base + "/metrics") as r:
            return metrics(await r.read())
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None


def metrics(text: bytes) -> dict[str, float]:
    """vLLM's gauges and counters by name, summed over their labels."""
    out: dict[str, float] = {}
    for name, value in METRIC.findall(text):
        key = name.decode()
        out[key] = out.get(key, 0.0) + float(value)
    return out


def read_metrics(urls: list[str]) -> list[dict[str, float]]:
    with httpx.Client(timeout=5) as c:
        return [metrics(c.get(u + "/metrics").content) for u in urls]


def stage_judge(client: Client, a: argparse.Namespace, label) -> None:
    """Hands `client` the sweep's judge of each stage it ends: the stage logged under `label(k)`, and whether the
    sweep goes on (within the SLO, or every stage with --full-sweep)."""
    slo_ms = a.slo_ttft_s * 1000

    def judge(k: int, now: float) -> bool:
        p = fleet.summarize(client.results, start=client.bounds[k], end=client.bounds[k + 1], stopped_at=now,
                            slo_s=a.slo_ttft_s, samples=client.samples)
        log(f"{label(k)}: TTFT p90 {fleet.fmt(p['ttft_p90_ms'])} ms, {p['errors']} errors: "
            f"{'within the SLO' if fleet.passes(p, slo_ms) else 'MISSED'}")
        return a.full_sweep or fleet.passes(p, slo_ms)

    client.judge = judge


def run_client(coro_owner) -> float:
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
        return runner(coro_owner.run())
    finally:
        gc.enable()


# --- replicas and fronts ---------------------------------------------------------------------------------

class Fleet:
    """The replicas of a shape's sweep, started once: a point's words are its own (salted), so what earlier points
    left in the caches is never hit and is evicted first, as from a fresh cache."""

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

    def idle(self, timeout: float = 60.0) -> bool:
        """Wait until no replica runs or holds a request (what a point cut is aborted when its front closes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = read_metrics(self.urls)
            if all(m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0) == 0 for m in got):
                return True
            time.sleep(0.2)
        return False

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
                     "with its balancing (least outstanding requests), the other gateway policies were skipped")
        return False
    return True


def service(logs: Path, urls: list[str], seed: int) -> Proc:
    port = free_port()
    argv = [sys.executable, "-m", "cxygpt_bench.service", "--port", str(port), "--seed", str(seed), *urls]
    return Proc("service", argv, port, "/health", logs).spawn()


def start_front(front: str, logs: Path, urls: list[str], *, routing: bool, epsilon: float | None,
                vr_cache_args: tuple[str, ...], limits: dict, seed: int) -> list[Proc] | None:
    """The front's processes, ready; None when this front cannot run here."""
    if front.startswith("vr-"):
        policy = front[3:]
        proc = vllm_router(logs, urls, policy=policy, extra=vr_cache_args if policy == "cache_aware" else ())
        return None if proc is None else [proc]
    if front == "service":
        procs = [service(logs, urls, seed)]
    else:
        policy = GATEWAY_POLICY[front]
        if not routing and policy != "least-load":
            return None
        settings = {}
        if routing:
            settings["routing"] = {"policy": policy, **({"epsilon": epsilon} if epsilon is not None else {})}
        count = 2 if front.endswith("-x2") else 1
        # each gateway told how many share the engines, as the chart tells them (gateway_replicas)
        shared = {"gateway_replicas": count} if routing and count > 1 else {}
        procs = [gateway(logs, urls, limits, profile="SRV_80G", model_settings=settings, settings=shared, wait=False)
                 for _ in range(count)]
    try:
        for p in procs:
            p.wait_ready()
    except RuntimeError:
        stop_all(procs)
        raise
    return procs


def picker(procs: list[Proc]):
    """The front's base URL for the n-th request: two gateways take turns (a conversation's turns go through
    both)."""
    bases = [p.url for p in procs]
    return lambda n: (bases[n % len(bases)], {})


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


# --- points ----------------------------------------------------------------------------------------------

def warm(load: Workload, bases: list[str], timeout: float) -> list[fleet.Result]:
    """The warm-up requests, all at once, through the front (its bases in turn) or to a replica; not measured."""
    todo = load.warm()

    async def go() -> list[fleet.Result]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            results = [fleet.Result(sent=0.0, index=i) for i in range(len(todo))]

            async def one(i: int, path: str, body: bytes, headers: dict) -> None:
                try:
                    await exchange(session, bases[i % len(bases)] + path, body, headers, time.perf_counter,
                                   results[i], want_text=False)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    results[i].status = "connection"

            await asyncio.gather(*(one(i, path, body, headers) for i, (path, body, headers, _) in enumerate(todo)))
            return results

    return asyncio.run(go()) if todo else []


def sweep_front(front: str, procs: list[Proc], shape: str, spec, cap: float, salt: int, fl: Fleet, a,
                notes: list[str], prompts: fleet.PromptTokens, seen: set[int]) -> list[dict]:
    """A front's sweep on the shape's replicas: a lead-in at the first rate, then a stage per rate of the grid, back
    to back; each stage summarized, up to the first that misses the SLO. `seen`: the blocks the warm-up sent (the
    ideal cache), updated."""
    rates = [x * cap for x in a.grid]
    stages = [(r, a.duration) for r in rates]
    times = [t for t, _ in shapes.ramp(f"{shape}:{spec.seed}", [(rates[0], a.lead)] + stages)]
    load = Workload(shape, spec, salt, 1, a.session)
    sends = None
    if load.chat:
        sends, load.conversations = shapes.chat_schedule(spec, times, salt, 1)
    else:
        load.extend(len(times))
    client = Client(load, picker(procs), stages=stages, lead=a.lead, grace=a.grace, timeout=a.timeout, sims=fl.urls,
                    sample_s=a.sample_s, pids={"sims": [s.pid for s in fl.sims], "front": [p.pid for p in procs]},
                    judge=None, times=None if load.chat else times, sends=sends)

    stage_judge(client, a, lambda k: f"{shape:11s} {front:18s} {a.grid[k]:4g}× ({rates[k]:5.1f}/s)")
    loadavg = os.getloadavg()[0]
    elapsed = run_client(client)
    # the ideal cache over everything sent, in order; each request's share counted in its stage
    ideal = [[0, 0] for _ in stages]
    for res in sorted(client.results, key=lambda x: x.sent):
        hits, queries = fleet.ideal_hits([load.prompt_ids(res, prompts)], BLOCK_SIZE, seen)
        k = bisect.bisect_right(client.bounds, res.sent) - 1
        if 0 <= k < len(stages):
            ideal[k][0] += hits
            ideal[k][1] += queries
    points = []
    for k in range(client.judged):
        start, end = client.bounds[k], client.bounds[k + 1]
        r = fleet.summarize(client.results, start=start, end=end, stopped_at=client.stopped_at, slo_s=a.slo_ttft_s,
                            samples=client.samples)
        (t0, c0), (t1, c1) = client.cpu[k], client.cpu[k + 1]
        wall = t1 - t0
        front_s = sum(c1["front"]) - sum(c0["front"])
        sims = [x1 - x0 for x0, x1 in zip(c0["sims"], c1["sims"])]
        cpu = {"client": round((c1["client"] - c0["client"]) / wall, 2), "sims_total": round(sum(sims) / wall, 2),
               "sim_max": round(max(sims) / wall, 2), "front": round(front_s / wall, 2),
               "front_max_process": round(max(x1 - x0 for x0, x1 in zip(c0["front"], c1["front"])) / wall, 2)}
        hits, queries = ideal[k]
        r.update(front=front, shape=shape, rate_x=a.grid[k], offered_rps=rates[k], salt=salt, cpu_cores=cpu,
                 loadavg=loadavg, ideal_hit_rate=hits / queries if queries else None, ideal_queries=queries,
                 prompt_tokens_mean=queries / r["sent"] if r["sent"] else None,
                 front_cpu_ms_per_request=1000 * front_s / r["sent"] if r["sent"] else None)
        busy = {name: v for name, v in (("client", cpu["client"]), ("a simulator", cpu["sim_max"]),
                                         ("the front", cpu["front_max_process"])) if v >= CPU_BOUND}
        if busy:
            notes.append(f"{shape}, {front} at {a.grid[k]:g}×: " + ", ".join(f"{n} used {v} cores" for n, v in busy.items())
                         + f" (≥ {CPU_BOUND}: may be CPU-bound, its latencies include waiting for a core)")
        log(f"{shape:11s} {front:18s} {a.grid[k]:4g}× ({rates[k]:5.1f}/s): sent {r['sent']:4d} err {r['errors']:3d} "
            f"cut {r['cut']:3d} TTFT p50/p90/p99 {fleet.fmt(r['ttft_p50_ms'])}/{fleet.fmt(r['ttft_p90_ms'])}/"
            f"{fleet.fmt(r['ttft_p99_ms'])} ms goodput {r['goodput_rps']:5.2f} tok/s {r['output_tokens_per_s']:5.0f} "
            f"hit {fleet.pct(r['hit_rate'])} (ideal {fleet.pct(r['ideal_hit_rate'])}) max/mean "
            f"{fleet.fmt(r['max_over_mean'], '{:.2f}')} cpu client {cpu['client']} sims {cpu['sims_total']} front "
            f"{cpu['front']}")
        points.append(r)
    log(f"{shape} {front}: swept in {elapsed:.0f} s (load average {loadavg:.1f} at its start)")
    return points


# --- the perfect router ----------------------------------------------------------------------------------

class ClosedLoop:
    """Closed-loop users on one replica: each takes the next conversation (chat; its turns back to back, no think
    time) or the next request until `duration`."""

    def __init__(self, load: Workload, url: str, users: int, duration: float, timeout: float):
        self.load, self.url, self.users, self.duration, self.timeout = load, url, users, duration, timeout
        self.results: list[fleet.Result] = []
        self.next = itertools.count()

    async def _one(self, session, res: fleet.Result, path: str, body: bytes, headers: dict, t0: float) -> None:
        clock = time.perf_counter
        self.results.append(res)
        try:
            await exchange(session, self.url + path, body, headers, clock, res, want_text=self.load.chat)
        except (TimeoutError, aiohttp.ClientError, OSError):
            res.status = "connection"
        res.end = clock() - t0

    async def run(self) -> float:
        load, clock = self.load, time.perf_counter
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            t0 = clock()

            async def user():
                while clock() - t0 < self.duration:
                    n = next(self.next)
                    load.extend(n + 1)
                    if not load.chat:
                        path, body, headers = load.body(n)
                        await self._one(session, fleet.Result(sent=clock() - t0, index=n), path, body, headers, t0)
                        continue
                    conv = load.conversations[n]
                    load.answers[n] = []
                    for turn in range(len(conv.turns)):
                        if clock() - t0 >= self.duration:
                            return
                        path, body, headers = load.chat_body(conv, turn)
                        res = fleet.Result(sent=clock() - t0, conversation=n, turn=turn)
                        await self._one(session, res, path, body, headers, t0)
                        if res.status != "ok":
                            break
                        load.answers[n].append(res.text)

            await asyncio.gather(*(user() for _ in range(self.users)))
            return clock() - t0


def capacity(shape: str, spec, a, logs: Path) -> dict:
    """The perfect router's capacity: one replica, the same engine with a cache that never evicts and every shared
    prefix in it (the warm-up requests first), kept saturated by 2 × its slots of closed-loop users. What it serves per second (answers ending after the first quarter)
    times the replicas is what the fleet would serve if no prefix were ever lost and the load were even."""
    fl = Fleet(logs, blocks=CAPACITY_BLOCKS, replicas=1)
    users = 2 * SLOTS
    try:
        load = Workload(shape, spec, 0, 1, "none")
        warmed = warm(load, fl.urls, a.timeout)
        probe = ClosedLoop(load, fl.urls[0], users, a.capacity_s, a.timeout)
        before = read_metrics(fl.urls)
        cpu0, wall0 = cpu_s(fl.sims[0].pid), time.perf_counter()
        elapsed = run_client(probe)
        sim_cores = (cpu_s(fl.sims[0].pid) - cpu0) / (time.perf_counter() - wall0)
        after = read_metrics(fl.urls)
    finally:
        fl.stop()
    skip = a.capacity_s / 4
    span = a.capacity_s - skip
    ended = [r for r in probe.results if r.status == "ok" and skip <= r.end <= a.capacity_s]
    delta = lambda key: after[0].get(key, 0) - before[0].get(key, 0)
    q, h = delta("vllm:prefix_cache_queries_total"), delta("vllm:prefix_cache_hits_total")
    out = {"replica_rps": len(ended) / span, "fleet_rps": REPLICAS * len(ended) / span,
           "replica_output_tokens_per_s": sum(r.tokens for r in ended) / span, "users": users,
           "duration_s": a.capacity_s, "requests": len(probe.results),
           "errors": sum(r.status != "ok" for r in probe.results + warmed), "hit_rate": h / q if q else None,
           "prompt_tokens_mean": delta("vllm:prompt_tokens_total") / max(len(probe.results), 1),
           "sim_cpu_cores": round(sim_cores, 2), "elapsed_s": round(elapsed, 1)}
    log(f"{shape}: perfect router {out['fleet_rps']:.2f} req/s (one replica {out['replica_rps']:.2f} req/s, "
        f"{out['replica_output_tokens_per_s']:.0f} output tokens/s, hit rate {fleet.pct(out['hit_rate'])}, mean "
        f"prompt {out['prompt_tokens_mean']:.0f} tokens, sim CPU {sim_cores:.2f} cores, errors {out['errors']})")
    return out


# --- the sweep -------------------------------------------------------------------------------------------

def sweep(shape: str, spec, cap: float, fronts: list[str], a, logs: Path, notes: list[str], routing: bool,
          prompts: fleet.PromptTokens, salts) -> dict[str, list[dict]]:
    """Each front in turn on the shape's replicas (idle, and cold for its salt): the front started, one request per
    shared prefix sent through it (not measured), then its sweep, so a router's own state (a tree, a ring) and the
    engines' caches carry from one rate to the next as in a deployment whose load rises."""
    points: dict[str, list[dict]] = {}
    fl = Fleet(logs)
    try:
        for front in fronts:
            salt = next(salts)
            if not fl.idle():
                notes.append(f"{shape}, before {front}: the replicas still held requests a minute after the last "
                             "sweep; they were restarted")
                fl.stop()
                fl = Fleet(logs)
            try:
                procs = start_front(front, logs, fl.urls, routing=routing, epsilon=a.epsilon, limits=a.gateway_limits,
                                    vr_cache_args=tuple(shlex.split(a.vr_cache_args)), seed=a.seed)
            except RuntimeError as e:  # a process that did not start: what happened, not its log
                notes.append(f"{shape}, {front}: {str(e).split(':', 1)[0]}")
                log(f"{shape} {front}: {e}")
                continue
            if procs is None:
                if front.startswith("vr-") and not any(n.startswith(front + ":") for n in notes):
                    notes.append(f"{front}: vllm-router is not installed (bench/setup_peers.sh): skipped")
                continue
            try:
                load = Workload(shape, spec, salt, 0, a.session)
                warmed = warm(load, [p.url for p in procs], a.timeout)
                if any(w.status != "ok" for w in warmed):
                    notes.append(f"{shape}, {front}: {sum(w.status != 'ok' for w in warmed)} of the {len(warmed)} "
                                 "warm-up requests failed")
                seen: set[int] = set()
                fleet.ideal_hits([prompts.of(f) for *_, f in load.warm()], BLOCK_SIZE, seen)
                points[front] = sweep_front(front, procs, shape, spec, cap, salt, fl, a, notes, prompts, seen)
            finally:
                stop_all(procs)
    finally:
        fl.stop()
    return points


def revision() -> str | None:
    """The checkout's commit (with -dirty when it has changes): which gateway was measured."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_benchmarks(section: str) -> None:
    run.write_benchmarks(section, (MARK_BEGIN, MARK_END), "Fleet (issue 26): latest results")


def vllm_router_version() -> str | None:
    """The installed vllm-router's version (bench/setup_peers.sh installs it unpinned), or None."""
    try:
        shown = subprocess.run([str(VENVS / "vllm-router" / "bin" / "pip"), "show", "vllm-router"],
                               capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^Version: (\S+)", shown, re.M)
    return found.group(1) if found else None


def loadavg() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_capacities(given: list[str] | None) -> dict[str, float]:
    out = {}
    for item in given or ():
        shape, _, value = item.partition("=")
        if shape not in shapes.SHAPES:
            raise SystemExit(f"--capacity {item}: the shape must be one of {', '.join(shapes.SHAPES)}")
        try:
            out[shape] = float(value)
        except ValueError:
            raise SystemExit(f"--capacity {item}: need SHAPE=REQ_PER_S") from None
        if out[shape] <= 0:
            raise SystemExit(f"--capacity {item}: must be positive")
    return out


def finish(r: dict) -> None:
    """The sweep's throughput at the SLO, errors, CPU per request and goals, from its points."""
    slo_ms = r["slo_ttft_s"] * 1000
    r["throughput"], errors, r["front_cpu_ms_per_request"], r["prompt_tokens_mean"] = {}, {}, {}, {}
    for shape, by_front in r["points"].items():
        r["throughput"][shape] = {fleet.PERFECT: fleet.exact(r["capacity"][shape]["fleet_rps"]),
                                  **{f: fleet.throughput_at_slo(ps, slo_ms) for f, ps in by_front.items()}}
        errors[shape] = {f: sum(p["errors"] for p in ps) for f, ps in by_front.items()}
        r["front_cpu_ms_per_request"][shape] = {f: fleet.cpu_per_request(ps) for f, ps in by_front.items()}
        means = [p["prompt_tokens_mean"] for ps in by_front.values() for p in ps if p["prompt_tokens_mean"]]
        r["prompt_tokens_mean"][shape] = sum(means) / len(means) if means else None
    r["goals"] = fleet.judge(r["throughput"], errors, r["front_cpu_ms_per_request"])
    during = [p["loadavg"] for by_front in r["points"].values() for ps in by_front.values() for p in ps]
    r["load_during"] = f"{min(during):.1f}–{max(during):.1f} (mean {sum(during) / len(during):.1f})" if during else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help=f"a smoke test: {' '.join(map(str, QUICK_GRID))} × capacity only, 4 s stages, 6 s probes")
    ap.add_argument("--shapes", nargs="+", choices=shapes.SHAPES, help=f"default: {' '.join(shapes.SHAPES)}")
    ap.add_argument("--fronts", nargs="+", choices=FRONTS + EXTRA_FRONTS, help=f"default: {' '.join(FRONTS)}")
    ap.add_argument("--grid", type=float, nargs="+",
                    help=f"offered rates as multiples of the perfect router's capacity (default {' '.join(map(str, GRID))})")
    ap.add_argument("--full-sweep", action="store_true", help="run every rate for every front (default: a front's "
                    "sweep stops at its first stage that misses the SLO)")
    ap.add_argument("--slo-ttft-s", type=float, default=SLO_TTFT_S, help="the SLO on p90 TTFT (default %(default)s)")
    ap.add_argument("--duration", type=float, help="seconds of each stage (default 8, quick 4)")
    ap.add_argument("--lead", type=float, help="seconds at the first rate before the first stage, not measured "
                    "(default 2, quick 1)")
    ap.add_argument("--grace", type=float, help="seconds after a stage's last arrival before it is judged (default "
                    "the SLO + 1, so that a request still without its first token has waited longer than the SLO)")
    ap.add_argument("--capacity-s", type=float, help="seconds of each capacity probe (default 20, quick 6)")
    ap.add_argument("--capacity", nargs="+", metavar="SHAPE=RPS",
                    help="use this perfect-router capacity for a shape instead of probing it")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request (more is an error)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--session", choices=("none", "user", "header"), default="none",
                    help="chat: send the conversation id as the `user` field or an x-session-id header")
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
        write_benchmarks(fleet.render(json.loads(Path(a.render).read_text()), MARK_BEGIN, MARK_END))
        return 0
    a.duration = a.duration or (4.0 if a.quick else 8.0)
    a.lead = (1.0 if a.quick else 2.0) if a.lead is None else a.lead
    a.grace = a.slo_ttft_s + 1 if a.grace is None else a.grace
    a.capacity_s = a.capacity_s or (6.0 if a.quick else 20.0)
    a.grid = sorted(a.grid or (QUICK_GRID if a.quick else GRID))
    a.gateway_limits = {**FLEET_LIMITS, "max_concurrency": a.gateway_slots}
    if a.lead <= 0 or a.duration <= 0 or min(a.grid) <= 0 or a.slo_ttft_s <= 0 or a.grace < a.slo_ttft_s:
        raise SystemExit("need a positive --lead, --duration, rates and SLO, and --grace at least the SLO")
    given = parse_capacities(a.capacity)
    shape_list = a.shapes or list(shapes.SHAPES)
    fronts = a.fronts or list(FRONTS)
    args = list(argv if argv is not None else sys.argv[1:])
    if "--results" in args:  # where a copy goes changes nothing measured
        i = args.index("--results")
        del args[i:i + 2]
    started = dt.datetime.now(dt.UTC)
    notes: list[str] = []
    specs = {s: shapes.spec_of(s, a.seed) for s in shape_list}
    r: dict = {"started": started.strftime("%Y-%m-%d %H:%M UTC"),
               "command": "python bench/fleet.py" + (" " + shlex.join(args) if args else ""),
               "machine": f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
               "load_before": loadavg(), "notes": notes, "revision": revision(), "replicas": REPLICAS,
               "vllm_router": vllm_router_version(),
               "specs": {s: asdict(v) for s, v in specs.items()}, "sim_args": list(SIM_ARGS), "kv_blocks": KV_BLOCKS,
               "gateway_limits": a.gateway_limits, "slo_ttft_s": a.slo_ttft_s, "duration_s": a.duration,
               "lead_s": a.lead, "grace_s": a.grace, "grid": a.grid, "full_sweep": a.full_sweep,
               "session": a.session, "epsilon": a.epsilon, "vr_cache_args": a.vr_cache_args, "fronts": fronts,
               "shapes": shape_list, "capacity": {}, "points": {}}
    log(f"fleet benchmark started ({r['load_before']})")
    from cxygpt_sim import text
    prompts = fleet.PromptTokens(text.token_ids, text.render_chat)
    salts = itertools.count(1)
    with tempfile.TemporaryDirectory(prefix="cxygpt-fleet-") as tmp:
        logs = Path(tmp)
        routing = routing_supported(notes)
        for shape in shape_list:
            if shape in given:
                r["capacity"][shape] = {"fleet_rps": given[shape], "given": True}
            else:
                r["capacity"][shape] = capacity(shape, specs[shape], a, logs)
            r["points"][shape] = sweep(shape, specs[shape], r["capacity"][shape]["fleet_rps"], fronts, a, logs, notes,
                                       routing, prompts, salts)
    finish(r)
    r["load_after"] = loadavg()
    finished = dt.datetime.now(dt.UTC)
    r["finished"] = finished.strftime("%H:%M UTC")
    r["wall_s"] = round((finished - started).total_seconds())
    name = "fleet-" + started.strftime("%Y-%m-%dT%H%M") + ".json"
    r["results_file"] = f"bench/results/{name}"
    raw = json.dumps(r, indent=1, default=str) + "\n"
    if a.results:
        Path(a.results).write_text(raw)
    if not a.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / name).write_text(raw)
    section = fleet.render(r, MARK_BEGIN, MARK_END)
    print(section)
    if not a.no_write:
        write_benchmarks(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
