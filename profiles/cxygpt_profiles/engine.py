"""The vLLM server command line for a selection: one builder for the operator and `cxygpt-profile`."""
from __future__ import annotations

from .select import Selection
from .table import LoraConstants

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's /v1/load_lora_adapter and unload, with LoRA on


def engine_args(selection: Selection, *, model: str, served_name: str, port: int, host: str = "0.0.0.0") -> list[str]:
    """`vllm serve` arguments in a stable order (model first, as vLLM's positional model_tag)."""
    e = selection.profile.engine
    return [model,
            "--served-model-name", served_name,
            "--host", host,
            "--port", str(port),
            "--dtype", e.dtype,
            "--kv-cache-dtype", e.kv_cache_dtype,
            "--max-model-len", str(selection.max_model_len),
            "--gpu-memory-utilization", str(e.gpu_memory_utilization),
            "--max-num-seqs", str(e.max_num_seqs),
            "--tensor-parallel-size", str(selection.tensor_parallel_size)]


def lora_limits(consts: LoraConstants, max_loras: int | None = None,
                max_rank: int | None = None) -> tuple[int, int, int]:
    """(--max-loras, --max-lora-rank, --max-cpu-loras): the table's, the given ones over them; never the number of
    adapters (adding one must not change the engine's arguments: that restarts it)."""
    loras = max_loras or consts.max_loras
    return loras, max_rank or consts.max_lora_rank, max(consts.max_cpu_loras, loras)


def lora_args(limits: tuple[int, int, int]) -> list[str]:
    """The LoRA flags: adapters themselves are loaded at runtime (RUNTIME_LORA_ENV), none is named here."""
    max_loras, max_rank, max_cpu = limits
    return ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_rank),
            "--max-cpu-loras", str(max_cpu)]
