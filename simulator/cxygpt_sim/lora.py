"""LoRA in vLLM's engine core (pure): the --max-loras rule of a batch, the adapters the worker keeps in CPU memory
(--max-cpu-loras, least recently used out first) and the GPU memory the adapter slots take."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

# vLLM's MaxLoRARanks: --max-lora-rank takes one of these
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM 0.33's step time grows by this fraction when a batch runs adapters: Qwen2.5-7B-Instruct with a rank-8 adapter
# on vLLM 0.25.1 (vllm-project/vllm#48887, random 2048 in / 256 out at 10 requests/s): TPOT 65.21 ms against 57.91 ms
# for the base model, +12.6%
DEFAULT_STEP_OVERHEAD = 0.13
LORA_DTYPE_BYTES = 2  # --lora-dtype auto: the model's dtype, bf16 for every catalogued model


@dataclass(frozen=True)
class LoraSettings:
    """--enable-lora's engine limits, and the simulator's costs of adapters."""
    max_loras: int                  # distinct adapters in one batch (GPU slots)
    max_lora_rank: int
    max_cpu_loras: int              # adapters held in CPU memory; a batch needing another reads it from disk again
    step_overhead: float = DEFAULT_STEP_OVERHEAD   # a step that runs adapters takes this fraction longer
    load_gib_per_s: float = 2.0     # reading an adapter's weights; 0 = instant

    def load_s(self, weight_bytes: int) -> float:
        return weight_bytes / 2**30 / self.load_gib_per_s if self.load_gib_per_s > 0 else 0.0


@dataclass(frozen=True)
class Lora:
    """An adapter as a request carries it (vLLM's LoRARequest): its engine id (a name loaded again gets a new one),
    its served name, and the seconds reading its weights takes."""
    id: int
    name: str
    load_s: float


def admissible(lora_id: int | None, active: set[int], max_loras: int) -> bool:
    """vLLM's rule for a waiting request (Scheduler.schedule): the running requests use at most max_loras distinct
    adapters; one whose adapter is not among them waits while max_loras are. A base request never waits for it."""
    return lora_id is None or lora_id in active or len(active) < max_loras


class LoraCache:
    """The worker's adapters in CPU memory (vLLM's LRUCacheWorkerLoRAManager): at most `capacity`; loading one more
    evicts the least recently used. A step's batch touches its adapters and reads the evicted ones from disk again,
    which that step waits for."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._held: OrderedDict[int, Lora] = OrderedDict()

    @property
    def held(self) -> list[int]:
        """Adapter ids, least recently used first."""
        return list(self._held)

    def load(self, lora: Lora, inplace: bool = False) -> float:
        """add_adapter: seconds spent reading it (0 if held and not reloaded in place)."""
        if lora.id in self._held and not inplace:
            self._held.move_to_end(lora.id)
            return 0.0
        self._held.pop(lora.id, None)  # an in-place reload replaces it without evicting another
        if len(self._held) + 1 > self.capacity:
            self._held.popitem(last=False)
        self._held[lora.id] = lora
        return lora.load_s

    def use(self, loras: Iterable[Lora]) -> float:
        """A batch's adapters made active: seconds reading those no longer held."""
        return sum(self.load(lora) for lora in loras)


@dataclass(frozen=True)
class BaseLayers:
    """A dense decoder's LoRA-able layers (vLLM packs q/k/v and gate/up): in and out features of each module."""
    layers: int
    hidden: int
    q_out: int          # attention heads x head dim
    kv_out: int         # KV heads x head dim
    intermediate: int

    MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def dims(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a module."""
        return {"q_proj": (self.hidden, self.q_out), "k_proj": (self.hidden, self.kv_out),
                "v_proj": (self.hidden, self.kv_out), "o_proj": (self.q_out, self.hidden),
                "gate_proj": (self.hidden, self.intermediate), "up_proj": (self.hidden, self.intermediate),
                "down_proj": (self.intermediate, self.hidden)}[module]

    def slot_bytes(self, max_lora_rank: int, tensor_parallel: int = 1) -> int:
        """GPU memory of one adapter slot over all GPUs (vLLM's lora_a_stacked and lora_b_stacked at
        --max-lora-rank): a column-parallel layer's A and a row-parallel layer's B are on every GPU."""
        replicated = sum(self.dims(m)[0] for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) \
            + sum(self.dims(m)[1] for m in ("o_proj", "down_proj"))
        sharded = sum(self.dims(m)[1] for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) \
            + sum(self.dims(m)[0] for m in ("o_proj", "down_proj"))
        return (replicated * tensor_parallel + sharded) * max_lora_rank * self.layers * LORA_DTYPE_BYTES
