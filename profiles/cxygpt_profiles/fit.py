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
    lora_mib: int = 0   # the adapter slots' GPU memory, taken from the KV cache

    def as_status(self) -> dict:
        """camelCase, as the CRD status carries it."""
        return {"fits": self.fits, "weightsMiB": self.weights_mib, "usableMiB": self.usable_mib,
                "kvCacheMiB": self.kv_cache_mib, "kvBytesPerToken": self.kv_bytes_per_token,
                "kvTokenCapacity": self.kv_token_capacity,
                "maxConcurrentSequences": self.max_concurrent_sequences, "message": self.message,
                **({"loraMiB": self.lora_mib} if self.lora_mib else {})}

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


LORA_DTYPE_BYTES = 2  # --lora-dtype auto: the model's dtype, bf16 for every catalogued model


def intermediate_size(facts: ModelFacts) -> int:
    """The MLP's width: config.json's, else what the parameters leave after embeddings and attention (3 matrices)."""
    if facts.intermediate_size:
        return facts.intermediate_size
    q_out, kv_out = facts.attention_heads * facts.head_dim, facts.kv_heads * facts.head_dim
    embedding = facts.vocab_size * facts.hidden_size * (1 if facts.tied_embeddings else 2)
    attention = facts.hidden_size * (2 * q_out + 2 * kv_out)
    return max(max((facts.parameters - embedding) // facts.layers - attention, 0) // (3 * facts.hidden_size), 1)


def lora_slot_bytes(facts: ModelFacts, max_lora_rank: int, tensor_parallel: int = 1) -> int:
    """GPU memory of one adapter slot over all GPUs, as vLLM allocates it (lora_a_stacked and lora_b_stacked at
    --max-lora-rank for q, k, v, o, gate, up and down of every layer): a column-parallel layer's A and a row-parallel
    layer's B are on every GPU, the rest is split."""
    hidden, q_out, kv_out = facts.hidden_size, facts.attention_heads * facts.head_dim, facts.kv_heads * facts.head_dim
    inter = intermediate_size(facts)
    replicated = 5 * hidden + 2 * hidden        # in of q, k, v, gate, up; out of o, down
    sharded = 2 * q_out + 2 * kv_out + 3 * inter    # out of q, k, v, gate, up; in of o, down
    return (replicated * tensor_parallel + sharded) * max_lora_rank * facts.layers * LORA_DTYPE_BYTES


def estimate_fit(facts: ModelFacts, *, weights: str, kv_cache_dtype: str, max_model_len: int,
                 gpu_memory_utilization: float, gpu_memory_mib: int, gpu_count: int,
                 consts: FitConstants, sequences: int = 1, lora_slots: tuple[int, int] | None = None) -> FitEstimate:
    """Fits when the weights, the engine's overhead and the adapter slots of lora_slots = (max_loras,
    max_lora_rank) leave a KV cache of `sequences` sequences of max_model_len."""
    usable = int(gpu_memory_mib * gpu_memory_utilization) * gpu_count
    weights_mib = -(-weight_bytes(facts, weights, consts) // MIB)
    kv_mib = usable - weights_mib - consts.engine_overhead_mib * gpu_count
    per_token = kv_bytes_per_token(facts, kv_cache_dtype, consts)
    capacity = max(kv_mib, 0) * MIB // per_token
    # the slots are allocated before the KV cache takes what is left (vLLM's profiling run); counted in tokens as
    # the simulator counts them
    lora_bytes = lora_slots[0] * lora_slot_bytes(facts, lora_slots[1], gpu_count) if lora_slots else 0
    capacity = max(capacity - -(-lora_bytes // per_token), 0)
    lora_mib = -(-lora_bytes // MIB)
    concurrent = capacity // max_model_len
    if kv_mib <= 0:
        message = (f"{weights} weights need {weights_mib} MiB plus {consts.engine_overhead_mib * gpu_count} MiB "
                   f"engine overhead; only {usable} MiB usable on {gpu_count}x{gpu_memory_mib} MiB "
                   f"at gpu-memory-utilization {gpu_memory_utilization}")
    elif capacity < max_model_len * sequences:
        wanted = f"max-model-len {max_model_len}" if sequences == 1 else \
            f"{sequences} sequences of max-model-len {max_model_len}"
        message = (f"KV cache holds {capacity} tokens, fewer than {wanted} "
                   f"({kv_mib - lora_mib} MiB left after {weights_mib} MiB of {weights} weights)")
    else:
        message = (f"{weights_mib} MiB weights, {kv_mib - lora_mib} MiB KV cache = {capacity} tokens, "
                   f"{concurrent} sequence{'' if concurrent == 1 else 's'} at {max_model_len} tokens")
    if lora_slots:
        message += f"; {lora_slots[0]} LoRA slots of rank {lora_slots[1]} take {lora_mib} MiB"
    return FitEstimate(fits=kv_mib > 0 and capacity >= max_model_len * sequences, weights_mib=weights_mib,
                       usable_mib=usable, kv_cache_mib=max(kv_mib - lora_mib, 0), kv_bytes_per_token=per_token,
                       kv_token_capacity=capacity, max_concurrent_sequences=concurrent, message=message,
                       lora_mib=lora_mib)
