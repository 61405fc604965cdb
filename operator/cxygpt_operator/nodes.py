"""GPU inventory (pure): Kubernetes Node objects → their GPUs of each kind, from GPU Feature Discovery's labels (full
GPUs, and MIG slices under its single and mixed strategies), with the labels and taints that say which pods may go."""
from __future__ import annotations

import re
from dataclasses import dataclass

from cxygpt_profiles import GpuNode

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"      # MiB per GPU (GPU Feature Discovery)
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"                  # the schedulable resource (device plugin)
MEMORY_OVERRIDE_LABEL = "cxygpt.io/gpu-memory-mib"  # for nodes without GFD
# GFD's mixed MIG strategy: per slice profile, nvidia.com/mig-<profile>.{memory,count,product,...} labels and the
# nvidia.com/mig-<profile> resource; under the single strategy the slices are nvidia.com/gpu (product ...-MIG-...)
MIG_MEMORY_LABEL = re.compile(r"^nvidia\.com/mig-(?P<profile>[0-9a-z.+]+)\.memory$")
MIG_PRODUCT_MARK = "-MIG-"


@dataclass(frozen=True, order=True)
class NodeGpus:
    """One kind of GPU on one node, with what decides which pods may go there."""
    gpus: GpuNode
    labels: tuple[tuple[str, str], ...] = ()
    taints: tuple[tuple[str, str, str], ...] = ()   # (key, value, effect)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def taint_maps(self) -> list[dict[str, str]]:
        return [{"key": k, "value": v, "effect": e} for k, v, e in self.taints]


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


def _full_gpus(name: str, labels: dict, allocatable: dict) -> GpuNode | None:
    memory = _int(labels.get(MEMORY_OVERRIDE_LABEL)) or _int(labels.get(GPU_MEMORY_LABEL))
    if not memory or memory <= 0:
        return None
    # Allocatable is what the scheduler honours; the label covers clusters without the device plugin (kind).
    count = _int(allocatable.get(GPU_RESOURCE)) if GPU_RESOURCE in allocatable else _int(labels.get(GPU_COUNT_LABEL))
    if count is None:
        count = 1
    if count <= 0:
        return None
    product = labels.get(GPU_PRODUCT_LABEL, "unknown")
    return GpuNode(memory_mib=memory, count=count, name=name, product=product, mig=MIG_PRODUCT_MARK in product)


def _mig_slices(name: str, labels: dict, allocatable: dict) -> list[GpuNode]:
    slices = []
    for key, value in labels.items():
        match = MIG_MEMORY_LABEL.match(key)
        memory = _int(value) if match else None
        if not match or not memory or memory <= 0:
            continue
        resource = f"nvidia.com/mig-{match['profile']}"
        count = _int(allocatable[resource]) if resource in allocatable else _int(labels.get(f"{resource}.count"))
        if count and count > 0:
            slices.append(GpuNode(memory_mib=memory, count=count, name=name, resource=resource, mig=True,
                                  product=labels.get(f"{resource}.product", f"MIG-{match['profile']}")))
    return sorted(slices)


def node_gpus(node: dict) -> list[NodeGpus]:
    """The node's GPUs of each kind; none when it has none usable (no labels, unschedulable, not ready, 0 GPUs)."""
    meta = node.get("metadata") or {}
    if (node.get("spec") or {}).get("unschedulable") or not _ready(node):
        return []
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    name = meta.get("name", "")
    kinds = [g for g in (_full_gpus(name, labels, allocatable), *_mig_slices(name, labels, allocatable)) if g]
    taints = tuple(sorted((str(t.get("key", "")), str(t.get("value") or ""), str(t.get("effect", "")))
                          for t in (node.get("spec") or {}).get("taints") or []))
    pairs = tuple(sorted(labels.items()))
    return [NodeGpus(gpus, pairs, taints) for gpus in kinds]
