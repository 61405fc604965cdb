"""Engine step times (pure): interpolated in the table measured on silicon (speeds.json), else a fitted roofline."""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from pydantic import Field

from .gpus import Gpu, GpuTable, default_gpus
from .roofline import StepShape, Workload, step_bytes, step_flops
from .table import PACKAGE_DIR, Strict, _parse

DEFAULT_SPEEDS = PACKAGE_DIR / "speeds.json"
SPEEDS_ENV = "CXYGPT_SPEEDS"
# vLLM's --kv-cache-dtype → the KV layouts AIConfigurator measured
KV_LAYOUT = {"auto": "bfloat16", "bfloat16": "bfloat16", "float16": "bfloat16",
             "fp8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}


class StepModel(Protocol):
    @property
    def source(self) -> str: ...

    @property
    def dispatch_ms(self) -> float:
        """A request's time on the CPU before its prefill, beside the engine's steps."""

    def step_ms(self, shape: StepShape) -> float: ...


# --- the data file --------------------------------------------------------------------------------------------

class Grids(Strict):
    """The axes every table is sampled on."""
    decode_batch: list[int] = Field(min_length=2)      # decoding sequences in a step
    decode_context: list[int] = Field(min_length=2)    # KV tokens each of them attends to
    prefill_tokens: list[int] = Field(min_length=2)    # tokens computed in a step (linear layers); a chunk's length
    prefill_before: list[int] = Field(min_length=2)    # tokens of the sequence computed before the chunk


class AttentionTable(Strict):
    decode_ms: list[list[float]]     # [decode_batch][decode_context]: the attention of a decode step
    prefill_ms: list[list[float]]    # [prefill_tokens][prefill_before]: the attention of one prefill chunk


class SiliconTable(Strict):
    """One model at one tensor-parallel size on one GPU, bf16 weights."""
    decode_linear_ms: list[float]    # [decode_batch]: everything but attention in a decode-only step
    prefill_linear_ms: list[float]   # [prefill_tokens]: everything but attention in a step that prefills
    attention: dict[str, AttentionTable]   # by KV layout (bfloat16, fp8)
    # what AIConfigurator adds to each request's TTFT for vLLM's dispatch on the CPU (Python, kernel launches across
    # the layers), which its kernel timings do not hold: its estimate of one request minus its prefill alone
    dispatch_ms: float = Field(ge=0)


class SiliconGpu(Strict):
    aiconfigurator_system: str
    database: str                     # the vLLM version of the measurements, e.g. "vllm 0.24.0"
    models: dict[str, dict[str, SiliconTable]]   # repository id → "tp<N>" → table


class Roofline(Strict):
    """step = overhead + max(bytes / (bandwidth x memory efficiency), FLOPs / (peak x compute efficiency)): never
    above 1, so never faster than the hardware."""
    memory_efficiency: float = Field(gt=0, le=1)
    compute_efficiency: float = Field(gt=0, le=1)
    step_overhead_ms: float = Field(ge=0)
    dispatch_ms_per_layer: float = Field(ge=0)   # SiliconTable.dispatch_ms on fitted_on, per layer of the model
    fitted_on: str                    # the AIConfigurator system whose vLLM step times it was fitted to
    median_error: float               # of the fit on those step times, relative


class Estimate(Strict):
    """AIConfigurator's own end-to-end estimate (aggregated serving) for one shape, beside which the simulator is
    measured (BENCHMARKS.md, "Simulator calibration")."""
    gpu: str
    model: str
    kv_cache_dtype: str
    prompt: int
    output: int
    batch: int
    ttft_ms: float
    tpot_ms: float


class SpeedTable(Strict):
    generator: dict[str, str]         # the script, AIConfigurator's and its core's versions, the backend
    grids: Grids
    silicon: dict[str, SiliconGpu]
    fitted: dict[str, Roofline]
    estimates: list[Estimate] = []

    def silicon_table(self, gpu: str, repo: str | None, tp: int) -> SiliconTable | None:
        if repo is None or gpu not in self.silicon:
            return None
        return self.silicon[gpu].models.get(repo, {}).get(f"tp{tp}")

    def estimate(self, gpu: str, model: str, prompt: int, output: int, batch: int) -> Estimate | None:
        return next((e for e in self.estimates if (e.gpu, e.model, e.prompt, e.output, e.batch)
                     == (gpu, model, prompt, output, batch)), None)


def load_speeds(path: str | os.PathLike | None = None) -> SpeedTable:
    return _parse(SpeedTable, Path(path or os.environ.get(SPEEDS_ENV) or DEFAULT_SPEEDS))


@lru_cache(maxsize=1)
def default_speeds() -> SpeedTable:
    return load_speeds()


# --- interpolation --------------------------------------------------------------------------------------------

def interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear in the samples; below the first, the first (a step does not get cheaper than its smallest
    measured shape); past the last, the last segment's slope carried on (never downwards)."""
    if x <= xs[0]:
        return ys[0]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    slope = (y1 - y0) / (x1 - x0)
    if x > x1:
        return y1 + max(slope, 0.0) * (x - x1)
    return y0 + slope * (x - x0)


def interpolate2(xs: list[int], ys: list[int], grid: list[list[float]], x: float, y: float) -> float:
    """The same along y in every row, then along x."""
    return interpolate(xs, [interpolate(ys, row, y) for row in grid], x)


@dataclass(frozen=True)
class SiliconSpeed:
    """Step times interpolated in a table measured on the GPU. A step is its linear layers over all of its tokens
    (decode kernels when it only decodes) plus the attention of its decoding sequences at their mean context plus
    that of each prefill chunk after what came before it: how AIConfigurator composes vLLM's mixed steps."""
    table: SiliconTable
    attention: AttentionTable
    grids: Grids
    source: str

    @property
    def dispatch_ms(self) -> float:
        return self.table.dispatch_ms

    def step_ms(self, shape: StepShape) -> float:
        if not shape.sequences:
            return 0.0
        g, a = self.grids, self.attention
        n = shape.decode_count
        ms = interpolate2(g.decode_batch, g.decode_context, a.decode_ms, n, shape.decode_context / n) if n else 0.0
        if not shape.prefill:
            return ms + interpolate(g.decode_batch, self.table.decode_linear_ms, n)
        ms += interpolate(g.prefill_tokens, self.table.prefill_linear_ms, shape.tokens)
        for tokens, before in shape.prefill:
            # AIConfigurator scales a chunk's attention by what came before it; a short chunk after a long prefix
            # (the last token of a prompt found in the prefix cache) still reads all of it, as a decode step does
            ms += max(interpolate2(g.prefill_tokens, g.prefill_before, a.prefill_ms, tokens, before),
                      interpolate2(g.decode_batch, g.decode_context, a.decode_ms, 1, before + tokens))
        return ms


@dataclass(frozen=True)
class RooflineSpeed:
    """Step times from what the step reads and computes (roofline.py) at the fitted efficiencies."""
    gpu: Gpu
    workload: Workload
    fit: Roofline
    source: str

    @property
    def dispatch_ms(self) -> float:
        return self.fit.dispatch_ms_per_layer * self.workload.facts.layers

    def step_ms(self, shape: StepShape) -> float:
        if not shape.sequences:
            return 0.0
        w, f = self.workload, self.fit
        memory = step_bytes(w, shape) / (self.gpu.bytes_per_ms * f.memory_efficiency)
        compute = step_flops(w, shape) / (self.gpu.flops_per_ms(w.compute_dtype) * f.compute_efficiency)
        return f.step_overhead_ms + max(memory, compute)


def step_model(gpu_key: str, workload: Workload, repo: str | None, *, gpus: GpuTable | None = None,
               speeds: SpeedTable | None = None) -> StepModel:
    """The table measured for a catalogued model's bf16 weights at this tensor-parallel size and KV layout on a GPU
    the database covers; else the roofline fitted for the GPU."""
    gpus, speeds = gpus or default_gpus(), speeds or default_speeds()
    gpu = gpus.gpus[gpu_key]
    table = speeds.silicon_table(gpu_key, repo, workload.tp) if workload.weights == "bf16" else None
    layout = KV_LAYOUT.get(workload.kv_cache_dtype, "bfloat16")
    # an A100 has no FP8: vLLM keeps an fp8 KV cache there and widens it to compute, no faster than a bf16 one
    attention = table and (table.attention.get(layout) or (layout == "fp8" and table.attention.get("bfloat16")))
    if table is not None and attention:
        measured = speeds.silicon[gpu_key]
        return SiliconSpeed(table, attention, speeds.grids,
                            f"silicon: AIConfigurator {speeds.generator['aiconfigurator']}, "
                            f"{measured.aiconfigurator_system} {measured.database}")
    fit = speeds.fitted[gpu_key]
    return RooflineSpeed(gpu, workload, fit, f"fitted: roofline, efficiencies from {fit.fitted_on} "
                         f"(median error {fit.median_error:.0%})")
