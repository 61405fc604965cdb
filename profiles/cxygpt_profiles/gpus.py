"""GPU facts (memory, bandwidth, peak FLOPs, where the step times come from): schema, loading, product lookup."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .table import PACKAGE_DIR, Strict, _parse

DEFAULT_GPUS = PACKAGE_DIR / "gpus.yaml"
GPUS_ENV = "CXYGPT_GPUS"
ComputeDtype = Literal["bf16", "fp8"]
LARGE_GPU_MIB = 70 * 1024  # vLLM's threshold for its larger per-step token budget


def vllm_token_budget(memory_mib: int, *, a100: bool) -> int:
    """vLLM's API-server default --max-num-batched-tokens (EngineArgs.get_batch_defaults): 8192 on a GPU of 70 GiB or
    more that is not an A100, whose throughput dropped with the larger budget (vLLM PR #17885), else 2048."""
    return 8192 if memory_mib >= LARGE_GPU_MIB and not a100 else 2048


class SpeedSource(Strict):
    source: Literal["silicon", "fitted"]
    aiconfigurator_system: str | None = Field(None, description="silicon: the system in AIConfigurator's database")
    fitted_on: str | None = Field(None, description="fitted: the AIConfigurator system the efficiencies come from")

    @model_validator(mode="after")
    def _named(self):
        if self.source == "silicon" and not self.aiconfigurator_system:
            raise ValueError("a silicon speed names its aiconfigurator_system")
        if self.source == "fitted" and not self.fitted_on:
            raise ValueError("a fitted speed names the system it is fitted_on")
        return self


class Gpu(Strict):
    name: str
    products: list[str] = Field(min_length=1)
    memory_mib: int = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0)
    peak_tflops: dict[ComputeDtype, float] = Field(min_length=1)
    speed: SpeedSource

    @model_validator(mode="after")
    def _bf16(self):
        if "bf16" not in self.peak_tflops:
            raise ValueError("peak_tflops needs bf16 (the compute dtype of bf16 and 4-bit weights)")
        return self

    @property
    def bytes_per_ms(self) -> float:
        return self.memory_bandwidth_gbs * 1e6

    def flops_per_ms(self, dtype: ComputeDtype = "bf16") -> float:
        return self.peak_tflops[dtype] * 1e9

    @property
    def default_max_num_batched_tokens(self) -> int:
        return vllm_token_budget(self.memory_mib, a100="A100" in self.name)


class GpuTable(Strict):
    gpus: dict[str, Gpu] = Field(min_length=1)

    def by_product(self, product: str) -> str | None:
        """The GPU whose product this is: GPU Feature Discovery's label or nvidia-smi's name (spaces for '-')."""
        wanted = product.strip().replace(" ", "-").lower()
        return next((key for key, gpu in self.gpus.items() if wanted in (p.lower() for p in gpu.products)), None)


def load_gpus(path: str | os.PathLike | None = None) -> GpuTable:
    return _parse(GpuTable, Path(path or os.environ.get(GPUS_ENV) or DEFAULT_GPUS))


@lru_cache(maxsize=1)
def default_gpus() -> GpuTable:
    return load_gpus()
