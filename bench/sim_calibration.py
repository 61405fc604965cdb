"""Prints BENCHMARKS.md's "Simulator calibration": the simulator beside AIConfigurator and published vLLM figures."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from cxygpt_bench.closed_loop import Measured, closed_loop
from cxygpt_profiles import default_catalog, default_table
from cxygpt_profiles.gpus import default_gpus
from cxygpt_profiles.predict import steady_state
from cxygpt_profiles.roofline import Workload
from cxygpt_profiles.speed import default_speeds, step_model
from cxygpt_sim.speed import GpuSpeed

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
QWEN = "Qwen/Qwen3-14B"


@dataclass(frozen=True)
class Point:
    """One workload shape and what vLLM measured there (None: not published; no source: none at all)."""
    gpu: str
    model: str
    source: str
    shape: str
    prompt: int
    output: int
    concurrency: int
    requests: int
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    output_tok_s: float | None = None
    latency_ms: float | None = None   # mean end-to-end latency of a batch sent at once
    at_once: bool = False             # a batch sent at once (vLLM's latency benchmark), else clients spread out


# Sources: simulator/README.md, "Speed model", has the links and how each figure was read.
POINTS = (
    Point("h100-80g", LLAMA, "vLLM perf CI latency_llama8B_tp1", "32 in / 128 out, batch 8 at once", 32, 128, 8, 8,
          latency_ms=997.5, at_once=True),
    *(Point("h100-80g", LLAMA, "InferenceBench sweep, vLLM 0.21", f"chatbot-short (~128 in / 128 out assumed), c={c}",
            128, 128, c, 20 * c, ttft_ms=ttft, tpot_ms=tpot, output_tok_s=tok_s)
      for c, ttft, tpot, tok_s in ((1, 13.98, 6.48, 122.2), (4, 22.75, 6.59, 580.3), (16, 41.69, 10.94, 1384.2))),
    Point("a100-80g", LLAMA, "vLLM perf CI latency_llama8B_tp1 (A100-SXM4-80GB)", "32 in / 128 out, batch 8 at once",
          32, 128, 8, 8, latency_ms=1585.4, at_once=True),
    Point("a100-80g", LLAMA, "sweep on an A100 40GB, vLLM 0.23", "1024 in / 128 out, c=1", 1024, 128, 1, 20,
          output_tok_s=75),
    Point("a100-80g", LLAMA, "sweep on an A100 40GB, vLLM 0.23", "1024 in / 128 out, c=8", 1024, 128, 8, 160,
          output_tok_s=6.6 * 75),
    *(Point("h100-80g", QWEN, "none (the issue's shape)", f"2000 in / 256 out, c={c}", 2000, 256, c, 4 * c)
      for c in (1, 8, 32)),
)
METRICS = (("TTFT p50 ms", "ttft_ms"), ("TPOT p50 ms", "tpot_ms"), ("output tok/s", "output_tok_s"),
           ("batch latency ms", "latency_ms"))


def simulate(p: Point) -> Measured:
    """The engine core at the GPU's speed for the model (bf16 weights and KV, as the sources ran), clock injected,
    vLLM's token budget on that GPU; a batch at once, or a closed loop (vLLM's bench serve --max-concurrency) whose
    clients start spread over one request's predicted time, the steady state the sweeps and AIConfigurator report
    (started at once, answers of one length keep every client's prompt in the same steps)."""
    workload = Workload(default_catalog().lookup(p.model), "bf16", "auto", 1, default_table().fit)
    model = step_model(p.gpu, workload, p.model)
    budget = default_gpus().gpus[p.gpu].default_max_num_batched_tokens
    ttft, tpot, _ = steady_state(model, concurrency=p.concurrency, prompt=p.prompt, output=p.output, budget=budget)
    ramp_s = 0.0 if p.at_once else (ttft + (p.output - 1) * tpot) / 1000
    return closed_loop(GpuSpeed(model), prompt=p.prompt, output=p.output, concurrency=p.concurrency,
                       requests=p.requests, budget=budget, ramp_s=ramp_s)


def estimated(p: Point) -> Measured | None:
    """AIConfigurator's aggregated-serving estimate for the shape (speeds.json), in the same figures."""
    e = default_speeds().estimate(p.gpu, p.model, p.prompt, p.output, p.concurrency)
    if e is None:
        return None
    latency = e.ttft_ms + (p.output - 1) * e.tpot_ms
    return Measured(ttft_ms=e.ttft_ms, tpot_ms=e.tpot_ms, output_tok_s=p.concurrency * p.output * 1000 / latency,
                    latency_ms=latency)


def off(value: float, reference: float | None) -> str:
    return f"{value / reference - 1:+.0%}" if reference else "–"


def table() -> str:
    rows = ["| GPU | model | source | workload shape | figure | published | AIConfigurator (vs published) | "
            "simulator (vs published, vs AIConfigurator) |", "|---|---|---|---|---|---|---|---|"]
    for p in POINTS:
        sim, aic = simulate(p), estimated(p)
        for label, field in METRICS:
            published = getattr(p, field)
            if published is None and (field == "latency_ms" or p.output_tok_s is not None or p.latency_ms):
                continue  # the source publishes other figures of this shape: only those are compared
            a = getattr(aic, field) if aic else None
            s = getattr(sim, field)
            rows.append(f"| {p.gpu} | {p.model.split('/')[1]} | {p.source} | {p.shape} | {label} | "
                        f"{published if published is not None else '–'} | "
                        f"{f'{a:.1f} ({off(a, published)})' if a is not None else '–'} | "
                        f"{s:.1f} ({off(s, published)}, {off(s, a)}) |")
    return "\n".join(rows)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(table())
