"""The load generator: closed loop (N users, rounds or duration) or open loop (Poisson arrivals at a rate),
one aiohttp session, per request only timestamps and byte counts (no JSON parsing of answers)."""
from __future__ import annotations

import asyncio
import gc
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from .stats import NO_STATUS, Record, Report

COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
TAIL_BYTES = 4096  # the end of a stream kept to find its usage chunk


class Dist:
    """A seeded integer distribution from a spec: `N` (fixed), `uniform:A:B`, `normal:MEAN:SD` (clamped ≥ 1),
    `choice:A,B,C`."""

    def __init__(self, spec: str):
        self.spec = spec
        kind, _, args = spec.partition(":")
        try:
            if not args:
                self.kind, self.args = "fixed", (int(kind),)
            elif kind == "uniform":
                a, b = (int(x) for x in args.split(":"))
                self.kind, self.args = kind, (min(a, b), max(a, b))
            elif kind == "normal":
                mean, sd = (float(x) for x in args.split(":"))
                self.kind, self.args = kind, (mean, sd)
            elif kind == "choice":
                self.kind, self.args = kind, tuple(int(x) for x in args.split(","))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"bad distribution {spec!r}: use N, uniform:A:B, normal:MEAN:SD or choice:A,B,C") from None
        if any(a < 0 for a in self.args) or (self.kind != "normal" and max(self.args) < 1):
            raise ValueError(f"bad distribution {spec!r}: values must be positive")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "uniform":
            return rng.randint(*self.args)
        if self.kind == "normal":
            return max(1, round(rng.gauss(*self.args)))
        return rng.choice(self.args)


def prompt_of(tokens: int) -> str:
    """About `tokens` tokens for common tokenizers (short words separated by spaces)."""
    words = ("alpha", "bravo", "delta", "echo", "gamma", "kilo", "lima", "oscar")
    return " ".join(words[i % len(words)] for i in range(max(tokens, 1)))


@dataclass
class LoadConfig:
    url: str
    concurrency: int = 10
    rounds: int | None = None          # requests per user (closed loop); total requests with --rate
    duration: float | None = None      # seconds; with rounds, whichever ends first
    stream: bool = True
    model: str = "qwen3-14b"
    api_key: str | None = None
    prompt_tokens: str = "64"
    max_tokens: str = "64"
    rate: float | None = None          # open loop: mean arrivals per second (Poisson); concurrency caps in flight
    timeout: float = 120.0
    include_usage: bool = True         # streams ask for the usage chunk to count output tokens exactly
    seed: int = 1
    extra_body: dict = field(default_factory=dict)
    window_start: float | None = None  # with duration: also report the served rate from here to the end
    ramp_up: float = 0.0               # closed loop: user i starts i × ramp_up / concurrency seconds in

    def check(self) -> None:
        """ValueError naming the first setting that cannot work."""
        if self.rounds is None and self.duration is None:
            raise ValueError("give rounds or duration")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        Dist(self.prompt_tokens), Dist(self.max_tokens)
        if self.ramp_up < 0:
            raise ValueError(f"--ramp-up must be 0 or more seconds, not {self.ramp_up:g}")
        if self.ramp_up and self.rate:
            raise ValueError("--ramp-up is for the closed loop: with --rate, arrivals are spread already")


class LoadRun:
    def __init__(self, cfg: LoadConfig):
        cfg.check()
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.prompt_dist, self.max_dist = Dist(cfg.prompt_tokens), Dist(cfg.max_tokens)
        self.chat = not cfg.url.rstrip("/").endswith("/v1/completions")
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key:
            self.headers["Authorization"] = f"Bearer {cfg.api_key}"
        self._bodies: dict[tuple[int, int], bytes] = {}
        self.report = Report()
        if cfg.window_start is not None and cfg.duration:
            self.report.window = (cfg.window_start, cfg.duration)
        self.in_flight = 0
        self.started = time.perf_counter()

    def body(self) -> bytes:
        key = (self.prompt_dist.sample(self.rng), self.max_dist.sample(self.rng))
        body = self._bodies.get(key)
        if body is None:
            text = prompt_of(key[0])
            data = {"model": self.cfg.model, "max_tokens": key[1], "stream": self.cfg.stream, **self.cfg.extra_body}
            if self.chat:
                data["messages"] = [{"role": "user", "content": text}]
            else:
                data["prompt"] = text
            if self.cfg.stream and self.cfg.include_usage:
                data["stream_options"] = {"include_usage": True}
            body = self._bodies[key] = orjson.dumps(data)
        return body

    async def one(self, session: aiohttp.ClientSession) -> None:
        body, clock = self.body(), time.perf_counter
        self.in_flight += 1
        started = clock()
        try:
            async with session.post(self.cfg.url, data=body, headers=self.headers) as r:
                status = r.status
                if status != 200:
                    await r.read()
                    rec = Record(status, None, clock() - started, retry_after="Retry-After" in r.headers)
                elif self.cfg.stream:
                    rec = await self._stream(r, started)
                else:
                    head = clock() - started
                    data = await r.read()
                    m = COMPLETION_TOKENS.search(data)
                    rec = Record(status, head, clock() - started, tokens=int(m.group(1)) if m else 0)
        except (TimeoutError, aiohttp.ClientError, OSError):
            rec = Record(NO_STATUS, None, clock() - started)
        finally:
            self.in_flight -= 1
        rec.end = clock() - self.started
        self.report.records.append(rec)

    async def _stream(self, r: aiohttp.ClientResponse, started: float) -> Record:
        clock = time.perf_counter
        ttft, events, tail, prev_newline = None, 0, b"", False
        async for data in r.content.iter_any():
            if ttft is None:
                ttft = clock() - started
            events += data.count(b"\n\n") + (prev_newline and data[:1] == b"\n")
            prev_newline = data[-1:] == b"\n"
            tail = data[-TAIL_BYTES:] if len(data) >= TAIL_BYTES else (tail + data)[-TAIL_BYTES:]
        total = clock() - started
        done = b"data: [DONE]" in tail
        chunks = events - done
        m = COMPLETION_TOKENS.search(tail)
        tokens = int(m.group(1)) if m else chunks
        status = 200 if done and b'"error"' not in tail[-600:] else 599  # 599: the stream ended in an error
        return Record(status, ttft, total, tokens=tokens, chunks=chunks - (1 if m else 0))

    async def run(self, progress: Callable[[LoadRun, float], None] | None = None) -> Report:
        cfg = self.cfg
        connector = aiohttp.TCPConnector(limit=cfg.concurrency, ttl_dns_cache=300)
        timeout = aiohttp.ClientTimeout(total=cfg.timeout)
        started = self.started = time.perf_counter()
        deadline = started + cfg.duration if cfg.duration else float("inf")
        ticker = asyncio.ensure_future(self._tick(progress, started)) if progress else None
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            if cfg.rate:
                await self._open_loop(session, deadline)
            else:
                async def user(i: int):
                    # users that all start in the same instant, with answers of one length, stay in lockstep:
                    # every request then meets a burst of the others at the server
                    await asyncio.sleep(cfg.ramp_up * i / cfg.concurrency)
                    n = 0
                    while (cfg.rounds is None or n < cfg.rounds) and time.perf_counter() < deadline:
                        await self.one(session)
                        n += 1
                await asyncio.gather(*(user(i) for i in range(cfg.concurrency)))
        self.report.elapsed_s = time.perf_counter() - started
        if ticker:
            ticker.cancel()
            progress(self, self.report.elapsed_s)
        return self.report

    async def _open_loop(self, session: aiohttp.ClientSession, deadline: float) -> None:
        cfg, tasks = self.cfg, set()
        total = cfg.rounds if cfg.rounds is not None else None
        next_at, sent = time.perf_counter(), 0
        while time.perf_counter() < deadline and (total is None or sent < total):
            next_at += self.rng.expovariate(cfg.rate)
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent += 1
            if self.in_flight >= cfg.concurrency:
                self.report.dropped += 1
                continue
            task = asyncio.ensure_future(self.one(session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def _tick(self, progress, started: float) -> None:
        while True:
            await asyncio.sleep(0.5)
            progress(self, time.perf_counter() - started)


def progress_line(run: LoadRun, elapsed: float) -> None:
    recs = run.report.records
    ok = sum(1 for r in recs if 200 <= r.status < 300)
    line = (f"\r{elapsed:6.1f} s  done {len(recs):7d}  ok {ok:7d}  errors {len(recs) - ok:6d}  "
            f"in flight {run.in_flight:4d}  rps {len(recs) / elapsed if elapsed else 0:8.1f}")
    sys.stderr.write(line)
    sys.stderr.flush()


def run_load(cfg: LoadConfig, *, progress: bool = False) -> dict:
    """One run in a fresh event loop (uvloop when installed); the statistics as a dict."""
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    run = LoadRun(cfg)
    # the client's own collector pauses (gen-2 passes of ~100 ms over the suite's heap, measured) would show up as
    # the front's latency: none during a run; what it leaves is collected after it
    gc.collect()
    gc.disable()
    try:
        report = runner(run.run(progress_line if progress else None))
    finally:
        gc.enable()
    if progress:
        sys.stderr.write("\n")
    return report.to_dict()
