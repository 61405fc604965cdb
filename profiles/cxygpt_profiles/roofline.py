"""What one engine step must read and compute (pure), and so the time no GPU can beat: the speed floors."""
from __future__ import annotations

from dataclasses import dataclass

from .fit import kv_bytes_per_token, weight_bytes
from .gpus import ComputeDtype, Gpu
from .table import FitConstants, ModelFacts


@dataclass(frozen=True)
class StepShape:
    """One forward pass of the engine: the sequences in prefill, each as (tokens computed in this step, tokens
    computed before it), and the decoding ones, one token each, with the KV tokens they attend to summed."""
    prefill: tuple[tuple[int, int], ...] = ()
    decode_count: int = 0
    decode_context: int = 0

    @property
    def prefill_tokens(self) -> int:
        return sum(tokens for tokens, _ in self.prefill)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_count

    @property
    def sequences(self) -> int:
        return len(self.prefill) + self.decode_count

    @property
    def context_tokens(self) -> int:
        """KV tokens the step's sequences hold once it is done (each decoding one's context includes its new token)."""
        return sum(tokens + before for tokens, before in self.prefill) + self.decode_context


def decode_step(batch: int, context: int) -> StepShape:
    """`batch` sequences decoding one token each, every one attending to `context` tokens."""
    return StepShape(decode_count=batch, decode_context=batch * context)


def prefill_step(tokens: int, before: int = 0) -> StepShape:
    return StepShape(prefill=((tokens, before),))


@dataclass(frozen=True)
class Workload:
    """A model on a GPU set: what a step reads and computes follows from these."""
    facts: ModelFacts
    weights: str          # the fit's weight format: bf16, int4
    kv_cache_dtype: str   # vLLM's --kv-cache-dtype (a key of the fit's kv_bytes_per_element)
    tp: int
    consts: FitConstants

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.facts, self.weights, self.consts)

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.facts, self.kv_cache_dtype, self.consts)

    @property
    def compute_dtype(self) -> ComputeDtype:
        """4-bit weights are widened to bf16 for the matrix products (vLLM's W4A16 kernels)."""
        return "bf16"


def step_bytes(w: Workload, shape: StepShape) -> float:
    """Bytes one GPU must move at least: its shard of the weights once, and the KV each sequence touches (a decoding
    one reads its context, a prefill chunk reads what came before it and writes its own)."""
    kv_shards = min(w.tp, w.facts.kv_heads)
    return w.weight_bytes / w.tp + shape.context_tokens * w.kv_bytes_per_token / kv_shards


def step_flops(w: Workload, shape: StepShape) -> float:
    """FLOPs one GPU must do at least: 2 per weight per token through the layers, the LM head for each decoding
    sequence (a prefill chunk that ends no prompt samples nothing), and causal attention, 4 x head_dim per
    (query, key) pair per head and layer."""
    f = w.facts
    embedding = f.vocab_size * f.hidden_size
    layers = f.parameters - embedding * (1 if f.tied_embeddings else 2)
    matmul = 2 * layers * shape.tokens + 2 * embedding * shape.decode_count
    pairs = shape.decode_context + sum(t * before + t * (t + 1) // 2 for t, before in shape.prefill)
    attention = 4 * f.layers * f.attention_heads * f.head_dim * pairs
    return (matmul + attention) / w.tp


def floor_ms(gpu: Gpu, w: Workload, shape: StepShape) -> float:
    """The step can be no faster than its bytes at the GPU's memory bandwidth, nor than its FLOPs at its peak."""
    if not shape.sequences:
        return 0.0
    return max(step_bytes(w, shape) / gpu.bytes_per_ms, step_flops(w, shape) / gpu.flops_per_ms(w.compute_dtype))
