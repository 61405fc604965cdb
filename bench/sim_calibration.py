"""Prints BENCHMARKS.md's "Simulator calibration": the pure engine on published vLLM workload shapes, clock injected."""
from __future__ import annotations

import argparse
import itertools
import statistics
from dataclasses import dataclass

from cxygpt_sim.engine import Capacity, Scheduler, Sequence
from cxygpt_sim.speed import SPEED_PROFILES

KV_BLOCKS = 100_000  # the sources' engines never ran out of KV blocks on these shapes


@dataclass(frozen=True)
class Published:
    """One published point: the workload shape and what vLLM measured (None: not published)."""
    profile: str
    source: str
    shape: str
    prompt: int
    output: int
    concurrency: int
    requests: int
    budget: int               # the source's --max-num-batched-tokens (vLLM's default on that GPU)
    ttft_ms: float | None = None
    itl_ms: float | None = None
    output_tok_s: float | None = None
    latency_ms: float | None = None   # mean end-to-end latency of a batch sent at once


# Sources (simulator/README.md, "Speed model", has the links and how each figure was read).
POINTS = (
    Published("h100-80g", "vLLM perf CI latency_llama8B_tp1", "32 in / 128 out, batch 8 at once", 32, 128, 8, 8,
              8192, latency_ms=997.5),
    Published("h100-80g", "InferenceBench sweep, vLLM 0.21", "chatbot-short (~128 in / 128 out assumed), c=1",
              128, 128, 1, 20, 8192, ttft_ms=13.98, itl_ms=6.48, output_tok_s=122.2),
    Published("h100-80g", "InferenceBench sweep, vLLM 0.21", "chatbot-short (~128 in / 128 out assumed), c=4",
              128, 128, 4, 80, 8192, ttft_ms=22.75, itl_ms=6.59, output_tok_s=580.3),
    Published("h100-80g", "InferenceBench sweep, vLLM 0.21", "chatbot-short (~128 in / 128 out assumed), c=16",
              128, 128, 16, 320, 8192, ttft_ms=41.69, itl_ms=10.94, output_tok_s=1384.2),
    Published("a100-80g", "vLLM perf CI latency_llama8B_tp1 (A100-SXM4-80GB)", "32 in / 128 out, batch 8 at once",
              32, 128, 8, 8, 2048, latency_ms=1585.4),
    Published("a100-80g", "A100 40GB sweep, vLLM 0.23", "1024 in / 128 out, c=1", 1024, 128, 1, 20, 2048,
              output_tok_s=75),
    Published("a100-80g", "A100 40GB sweep, vLLM 0.23", "1024 in / 128 out, c=8", 1024, 128, 8, 160, 2048,
              output_tok_s=6.6 * 75),
)


@dataclass(frozen=True)
class Simulated:
    ttft_ms: float
    itl_ms: float
    output_tok_s: float
    latency_ms: float


def simulate(p: Published) -> Simulated:
    """Closed loop: `concurrency` clients, each sending its next request when its answer ends (vLLM's
    bench serve --max-concurrency); a batch test is the same with one request per client."""
    scheduler = Scheduler(Capacity(max_num_seqs=256, kv_blocks=KV_BLOCKS, max_num_batched_tokens=p.budget),
                          SPEED_PROFILES[p.profile], seed=0)
    ids = itertools.count()
    # distinct random-like prompts, as vLLM's random dataset: nothing comes from the prefix cache
    new = lambda now: Sequence(id=str(next(ids)), prompt_ids=[next(ids) for _ in range(p.prompt)],
                               output_tokens=p.output, arrived=now)
    sent, done, now = 0, [], 0.0
    for _ in range(min(p.concurrency, p.requests)):
        scheduler.submit(new(now))
        sent += 1
    while scheduler.has_work:
        now += scheduler.begin_step(now).duration_s
        for progress in scheduler.end_step(now):
            if progress.done:
                done.append(progress.seq)
                if sent < p.requests:
                    scheduler.submit(new(now))
                    sent += 1
    return Simulated(
        ttft_ms=1000 * statistics.median(s.first_token_at - s.arrived for s in done),
        itl_ms=1000 * statistics.median((s.last_token_at - s.first_token_at) / (s.generated - 1) for s in done),
        output_tok_s=sum(s.generated for s in done) / now,
        latency_ms=1000 * statistics.mean(s.last_token_at - s.arrived for s in done))


def cell(simulated: float, published: float | None, unit: str = "") -> str:
    if published is None:
        return f"{simulated:.1f}{unit} (–)"
    return f"{simulated:.1f} / {published:g}{unit} ({simulated / published - 1:+.0%})"


def table() -> str:
    rows = ["| profile | source | workload shape | TTFT p50 ms | ITL p50 ms | output tok/s | batch latency ms |",
            "|---|---|---|---|---|---|---|"]
    for p in POINTS:
        s = simulate(p)
        latency = cell(s.latency_ms, p.latency_ms) if p.latency_ms else "–"
        rows.append(f"| {p.profile} | {p.source} | {p.shape} | {cell(s.ttft_ms, p.ttft_ms)} | "
                    f"{cell(s.itl_ms, p.itl_ms)} | {cell(s.output_tok_s, p.output_tok_s)} | {latency} |")
    return "\n".join(rows)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(table())
