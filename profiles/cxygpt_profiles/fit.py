"""VRAM fit estimate (pure): weights, KV bytes per token, KV capacity and concurrency for a GPU set."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .table import FitConstants, ModelFacts

MIB = 1024 * 1024


@dataclass(frozen=True)
class FitEstimate:
    fits: bool
    weights_mib: int
    usable_mib: int
    kv_cache_mib: int
    kv_bytes_per_token: int
    kv_token_capacity: int
    max_concurrent_sequences: int
    message: str

    def as_status(self) -> dict:
        """camelCase, as the CRD status carries it."""
        return {"fits": self.fits, "weightsMiB": self.weights_mib, "usableMiB": self.usable_mib,
                "kvCacheMiB": self.kv_cache_mib, "kvBytesPerToken": self.kv_bytes_per_token,
                "kvTokenCapacity": self.kv_token_capacity,
                "maxConcurrentSequences": self.max_concurrent_sequences, "message": self.message}

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes(facts: ModelFacts, weights: str, consts: FitConstants) -> int:
    """Weights in bytes; embeddings (and an untied LM head) stay 16-bit in quantized formats."""
    embedding = facts.vocab_size * facts.hidden_size * (1 if facts.tied_embeddings else 2)
    body = max(facts.parameters - embedding, 0)
    return int(body * consts.weight_bytes_per_param[weights] + embedding * 2)


def kv_bytes_per_token(facts: ModelFacts, kv_cache_dtype: str, consts: FitConstants) -> int:
    """K and V, every layer, every KV head."""
    per_element = consts.kv_bytes_per_element[kv_cache_dtype]
    return int(2 * facts.layers * facts.kv_heads * facts.head_dim * per_element)


def estimate_fit(facts: ModelFacts, *, weights: str, kv_cache_dtype: str, max_model_len: int,
                 gpu_memory_utilization: float, gpu_memory_mib: int, gpu_count: int,
                 consts: FitConstants, sequences: int = 1) -> FitEstimate:
    """Fits when the weights and the engine's overhead leave a KV cache of `sequences` sequences of max_model_len."""
    usable = int(gpu_memory_mib * gpu_memory_utilization) * gpu_count
    weights_mib = -(-weight_bytes(facts, weights, consts) // MIB)
    kv_mib = usable - weights_mib - consts.engine_overhead_mib * gpu_count
    per_token = kv_bytes_per_token(facts, kv_cache_dtype, consts)
    capacity = max(kv_mib, 0) * MIB // per_token
    concurrent = capacity // max_model_len
    if kv_mib <= 0:
        message = (f"{weights} weights need {weights_mib} MiB plus {consts.engine_overhead_mib * gpu_count} MiB "
                   f"engine overhead; only {usable} MiB usable on {gpu_count}x{gpu_memory_mib} MiB "
                   f"at gpu-memory-utilization {gpu_memory_utilization}")
    elif capacity < max_model_len * sequences:
        wanted = f"max-model-len {max_model_len}" if sequences == 1 else \
            f"{sequences} sequences of max-model-len {max_model_len}"
        message = (f"KV cache holds {capacity} tokens, fewer than {wanted} "
                   f"({kv_mib} MiB left after {weights_mib} MiB of {weights} weights)")
    else:
        message = (f"{weights_mib} MiB weights, {kv_mib} MiB KV cache = {capacity} tokens, "
                   f"{concurrent} sequence{'' if concurrent == 1 else 's'} at {max_model_len} tokens")
    return FitEstimate(fits=kv_mib > 0 and capacity >= max_model_len * sequences, weights_mib=weights_mib,
                       usable_mib=usable, kv_cache_mib=max(kv_mib, 0), kv_bytes_per_token=per_token,
                       kv_token_capacity=capacity, max_concurrent_sequences=concurrent, message=message)
