"""The vLLM server command line for a selection: one builder for the operator and `cxygpt-profile`."""
from __future__ import annotations

from .select import Selection


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
