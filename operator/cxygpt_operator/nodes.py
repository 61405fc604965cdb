"""GPU inventory (pure): Kubernetes Node objects → GpuNode records from GPU Feature Discovery labels."""
from __future__ import annotations

from cxygpt_profiles import GpuNode

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"      # MiB per GPU (GPU Feature Discovery)
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"                  # the schedulable resource (device plugin)
MEMORY_OVERRIDE_LABEL = "cxygpt.io/gpu-memory-mib"  # for nodes without GFD


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _ready(node: dict) -> bool:
    """A node with a Ready condition that is not True takes no new pods; no conditions at all counts as
    ready (test and dev clusters that publish none)."""
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return True


def gpu_node(node: dict) -> GpuNode | None:
    """The node's GPUs, or None when it has none usable (no labels, unschedulable, not ready, 0 GPUs)."""
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    memory = _int(labels.get(MEMORY_OVERRIDE_LABEL)) or _int(labels.get(GPU_MEMORY_LABEL))
    if not memory or memory <= 0:
        return None
    if (node.get("spec") or {}).get("unschedulable") or not _ready(node):
        return None
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    # Allocatable is what the scheduler honours; the label covers clusters without the device plugin (kind).
    count = _int(allocatable.get(GPU_RESOURCE)) if GPU_RESOURCE in allocatable else _int(labels.get(GPU_COUNT_LABEL))
    if count is None:
        count = 1
    if count <= 0:
        return None
    return GpuNode(memory_mib=memory, count=count, name=meta.get("name", ""),
                   product=labels.get(GPU_PRODUCT_LABEL, "unknown"))
