"""The simulator's engine core under a closed loop (pure, clock injected): what a benchmark client would measure."""
from __future__ import annotations

import heapq
import itertools
import statistics
from dataclasses import dataclass

from cxygpt_sim.engine import Capacity, Scheduler, Sequence


@dataclass(frozen=True)
class Measured:
    ttft_ms: float        # median over the requests
    tpot_ms: float        # median of each request's (last token - first token) / (tokens - 1)
    output_tok_s: float
    latency_ms: float     # mean, arrival to last token


def closed_loop(speed, *, prompt: int, output: int, concurrency: int, requests: int, budget: int,
                kv_blocks: int = 100_000, max_num_seqs: int = 256, ramp_s: float = 0.0) -> Measured:
    """`concurrency` clients, each sending its next request when its answer ends (vLLM's bench serve
    --max-concurrency); a batch test is the same with one request per client. The clients start evenly over
    `ramp_s` (0: all at once, and with answers of one length they stay in lockstep). A request reaches the scheduler
    after the speed's dispatch time, as in the simulator's server. Prompts are distinct, as vLLM's random dataset:
    nothing comes from the prefix cache."""
    scheduler = Scheduler(Capacity(max_num_seqs=max_num_seqs, kv_blocks=kv_blocks, max_num_batched_tokens=budget),
                          speed, seed=0)
    ids = itertools.count()
    pending: list[tuple[float, int, Sequence]] = []   # (when the scheduler sees it, order, request)

    def send(at: float) -> None:
        seq = Sequence(id=str(next(ids)), prompt_ids=[next(ids) for _ in range(prompt)], output_tokens=output,
                       arrived=at)
        heapq.heappush(pending, (at + speed.dispatch_s, int(seq.id), seq))
    for i in range(min(concurrency, requests)):
        send(i * ramp_s / concurrency)
    sent, done, now = len(pending), [], 0.0
    while pending or scheduler.has_work:
        while pending and pending[0][0] <= now:
            scheduler.submit(heapq.heappop(pending)[2])
        if not scheduler.has_work:
            now = pending[0][0]
            continue
        now += scheduler.begin_step(now).duration_s
        for progress in scheduler.end_step(now):
            if progress.done:
                done.append(progress.seq)
                if sent < requests:
                    send(now)
                    sent += 1
    return Measured(
        ttft_ms=1000 * statistics.median(s.first_token_at - s.arrived for s in done),
        tpot_ms=1000 * statistics.median((s.last_token_at - s.first_token_at) / max(s.generated - 1, 1) for s in done),
        output_tok_s=sum(s.generated for s in done) / now,
        latency_ms=1000 * statistics.mean(s.last_token_at - s.arrived for s in done))
