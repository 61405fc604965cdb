"""What each page shows, from the cluster's objects and the gateway's view (pure: objects and `now` in, plain data
out)."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime

import yaml

GPU_MEMORY_LABELS = ("cxygpt.io/gpu-memory-mib", "nvidia.com/gpu.memory")   # the operator reads them in this order
GPU_COUNT_LABEL, GPU_PRODUCT_LABEL, GPU_RESOURCE = "nvidia.com/gpu.count", "nvidia.com/gpu.product", "nvidia.com/gpu"
CONDITION_ORDER = ("Available", "Progressing", "Degraded", "ProfileSelected", "CacheReady")

PHASES = {
    "Pending": "waiting: no GPU node fits yet, or the model cache is not ready",
    "Starting": "starting: no replica is ready yet (loading the model)",
    "PartiallyReady": "serving with fewer replicas than wanted (a rollout, a scale-up or a crash)",
    "Ready": "serving with every replica ready",
    "ScaledToZero": "at zero replicas: no GPU held",
    "Failed": "failed: the conditions say why",
}
# a condition in words: (type, status) → what it means for the model
CONDITION_WORDS = {
    ("Available", "True"): "serving requests", ("Available", "False"): "not serving requests",
    ("Progressing", "True"): "changing (a rollout, a scale or a download)", ("Progressing", "False"): "settled",
    ("Degraded", "True"): "in trouble", ("Degraded", "False"): "no trouble",
    ("ProfileSelected", "True"): "profile chosen", ("ProfileSelected", "False"): "no profile fits yet",
    ("CacheReady", "True"): "weights cached", ("CacheReady", "False"): "weights not cached yet",
}
GATEWAY_STATES = {"ready": "routable", "starting": "starting", "scaled_to_zero": "at zero: a request wakes it",
                  "unavailable": "no ready replica"}


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def ago(value: str | None, now: datetime) -> str:
    """'3 min ago' for a Kubernetes timestamp; '' when there is none."""
    at = parse_time(value)
    if at is None:
        return ""
    seconds = max(0, int((now - at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def _key(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


@dataclass(frozen=True)
class Condition:
    type: str
    ok: bool                 # True when the condition reads as good news (Degraded False, the others True)
    status: str
    words: str
    reason: str
    message: str
    since: str
    at: str


def conditions_of(md: dict, now: datetime) -> list[Condition]:
    out = []
    conditions = {c.get("type"): c for c in (md.get("status") or {}).get("conditions") or []}
    for type_ in sorted(conditions, key=lambda t: CONDITION_ORDER.index(t) if t in CONDITION_ORDER else 99):
        c = conditions[type_]
        status = c.get("status", "Unknown")
        ok = (status == "False") if type_ in ("Degraded", "Progressing") else (status == "True")
        out.append(Condition(type_, ok, status, CONDITION_WORDS.get((type_, status), f"{type_} is {status}"),
                             c.get("reason") or "", c.get("message") or "", ago(c.get("lastTransitionTime"), now),
                             c.get("lastTransitionTime") or ""))
    return out


def _num(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def limits_of(md: dict, gateway: dict | None) -> dict:
    """The limits in force: the gateway's (what it enforces) when it could be read, else the operator's status."""
    if gateway:
        return {"max_input_tokens": gateway.get("max_input_tokens"),
                "max_output_tokens": gateway.get("max_output_tokens"),
                "output_cap_now": gateway.get("output_cap_now"), "rate_qps": gateway.get("rate_qps"),
                "rate_tpm": gateway.get("rate_tpm"), "queue_size": gateway.get("queue_size"),
                "max_concurrency": gateway.get("max_concurrency"), "source": "gateway"}
    lim = (md.get("status") or {}).get("limits") or {}
    single = (md.get("status") or {}).get("mode") == "single"
    return {"max_input_tokens": lim.get("maxInputTokens"), "max_output_tokens": lim.get("maxOutputTokens"),
            "output_cap_now": None, "rate_qps": None if single else lim.get("rateQps"),
            "rate_tpm": None if single else lim.get("rateTpm"), "queue_size": lim.get("queueSize"),
            "max_concurrency": lim.get("maxConcurrency"), "source": "status"}


def limits_words(limits: dict) -> str:
    parts = [f"input {_num(limits['max_input_tokens'])} tokens", f"output {_num(limits['max_output_tokens'])}"]
    if limits.get("output_cap_now") not in (None, limits["max_output_tokens"]):
        parts[-1] += f" (now {_num(limits['output_cap_now'])})"
    parts.append("no rate limit" if limits["rate_qps"] is None and limits["rate_tpm"] is None else
                 f"{_num(limits['rate_qps'])} req/s, {_num(limits['rate_tpm'])} tokens/min")
    parts.append(f"queue {_num(limits['queue_size'])}")
    return ", ".join(parts)


@dataclass
class ModelRow:
    namespace: str
    name: str
    served: str
    phase: str
    phase_words: str
    conditions: list[Condition]
    ready: int
    desired: int
    profile: str
    mode: str
    gpus: str
    fit: str
    fits: bool | None
    autoscaling: dict | None
    cache: dict | None
    routing: str
    limits: dict
    limits_words: str
    gateway_state: str
    degraded: bool | None            # the gateway's load degradation; None: the gateway could not be read
    degraded_reason: str
    metrics: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def trouble(self) -> Condition | None:
        return next((c for c in self.conditions if not c.ok and c.type in ("Available", "Degraded") and c.message),
                    None)


def _autoscaling(status: dict, now: datetime) -> dict | None:
    a = status.get("autoscaling")
    if not a:
        return None
    return {"demand": a.get("demand"), "desired": a.get("desiredReplicas"), "target": a.get("target"),
            "scaler": a.get("scaler") or "Operator", "reason": a.get("reason") or "",
            "message": a.get("message") or "", "last_change": a.get("lastScaleMessage") or "",
            "last_change_ago": ago(a.get("lastScaleTime"), now)}


def _cache(status: dict) -> dict | None:
    c = status.get("cache")
    if not c:
        return None
    done, total = c.get("bytesDone"), c.get("bytesTotal")
    percent = int(100 * done / total) if isinstance(done, int) and isinstance(total, int) and total > 0 else None
    return {"phase": c.get("phase") or "", "percent": percent, "message": c.get("message") or "",
            "claim": c.get("claimName") or "", "revision": (c.get("revision") or "")[:12]}


def model_row(md: dict, gateway: dict | None, metrics: dict | None, now: datetime) -> ModelRow:
    """One ModelDeployment as the fleet page shows it. `gateway` is the model's entry of the gateway's /v1/limits
    (None when it has none or could not be read), `metrics` its latest chart values."""
    spec, status = md.get("spec") or {}, md.get("status") or {}
    namespace, name = _key(md)
    served = (spec.get("model") or {}).get("name") or name
    phase = status.get("phase") or "New"
    gpu = status.get("gpu") or {}
    fit = status.get("fit") or {}
    routing = (gateway or {}).get("routing", {}).get("policy") or (spec.get("routing") or {}).get("policy") \
        or "the gateway's default"
    limits = limits_of(md, gateway)
    return ModelRow(
        namespace=namespace, name=name, served=served, phase=phase,
        phase_words=PHASES.get(phase, "not reconciled yet" if phase == "New" else phase),
        conditions=conditions_of(md, now), ready=int(status.get("readyReplicas") or 0),
        desired=int(spec.get("replicas", 1)), profile=status.get("profile") or "", mode=status.get("mode") or
        spec.get("mode") or "", gpus=(f"{gpu.get('count')} × {gpu.get('product')} ({_num(gpu.get('memoryMiB'))} MiB)"
                                      if gpu else ""),
        fit=fit.get("message") or "", fits=fit.get("fits"), autoscaling=_autoscaling(status, now),
        cache=_cache(status), routing=routing, limits=limits, limits_words=limits_words(limits),
        gateway_state=GATEWAY_STATES.get(str((gateway or {}).get("state")), "not routed by the gateway")
        if gateway is not None else "unknown (the gateway could not be read)",
        degraded=None if gateway is None else bool(gateway.get("degraded")),
        degraded_reason=(gateway or {}).get("degraded_reason") or "", metrics=metrics or {})


def fleet_rows(mds: list[dict], limits: dict | None, latest: dict, now: datetime) -> list[ModelRow]:
    """Every model, sorted by namespace and name. `limits` is the gateway's /v1/limits answer (None: unreadable)."""
    per_model = (limits or {}).get("models") or {}
    rows = []
    for md in sorted(mds, key=_key):
        served = ((md.get("spec") or {}).get("model") or {}).get("name") or _key(md)[1]
        gateway = None if limits is None else per_model.get(served, {})
        rows.append(model_row(md, gateway, latest.get(served), now))
    return rows


def owns_pod(md: dict, pod: dict) -> bool:
    """The model's own engine pods, by the selector its status publishes (the Deployment's, immutable)."""
    if _key(pod)[0] != _key(md)[0]:
        return False
    selector = (md.get("status") or {}).get("selector") or ""
    wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


@dataclass(frozen=True)
class Replica:
    name: str
    phase: str
    ready: bool
    restarts: int
    state: str
    last_state: str
    node: str
    age: str


def _container_state(state: dict) -> str:
    if "running" in state:
        return "running"
    if "waiting" in state:
        w = state["waiting"]
        return f"waiting: {w.get('reason') or ''}{': ' + w['message'] if w.get('message') else ''}"
    if "terminated" in state:
        t = state["terminated"]
        message = (t.get("message") or "").strip().splitlines()
        return (f"terminated: {t.get('reason') or 'exited'} (exit code {t.get('exitCode')})"
                + (f": {message[-1][:200]}" if message else ""))
    return ""


def replicas_of(md: dict, pods: list[dict], now: datetime) -> list[Replica]:
    out = []
    for pod in sorted((p for p in pods if owns_pod(md, p)), key=lambda p: _key(p)[1]):
        status = pod.get("status") or {}
        container: dict = next(iter(status.get("containerStatuses") or []), {})
        out.append(Replica(
            name=_key(pod)[1], phase=status.get("phase") or "Pending", ready=bool(container.get("ready")),
            restarts=int(container.get("restartCount") or 0), state=_container_state(container.get("state") or {}),
            last_state=_container_state(container.get("lastState") or {}),
            node=(pod.get("spec") or {}).get("nodeName") or "", age=ago(pod["metadata"].get("creationTimestamp"), now)))
    return out


@dataclass(frozen=True)
class TimelineEntry:
    at: str
    ago: str
    kind: str        # "condition" or the Event's type (Normal, Warning)
    subject: str     # what it is about: the model, or one of its pods
    reason: str
    message: str
    count: int = 1


def _pod_of(md_name: str, pod_name: str) -> bool:
    """A pod name of this model's engines (<model>-<template hash>-<suffix>), including pods already gone."""
    return re.fullmatch(rf"{re.escape(md_name)}-[0-9a-z]+-[0-9a-z]+", pod_name) is not None


def timeline_of(md: dict, events: list[dict], now: datetime, limit: int = 100) -> list[TimelineEntry]:
    """The model's conditions (when each last changed) and the Events about it and its pods, newest first."""
    namespace, name = _key(md)
    entries = [TimelineEntry(c.at, c.since, "condition", "ModelDeployment", c.reason, f"{c.type} {c.status}: {c.words}"
                             + (f" — {c.message}" if c.message else ""))
               for c in conditions_of(md, now) if c.at]
    for e in events:
        involved = e.get("involvedObject") or {}
        if _key(e)[0] != namespace:
            continue
        about_model = involved.get("kind") == "ModelDeployment" and involved.get("name") == name
        about_pod = involved.get("kind") == "Pod" and _pod_of(name, involved.get("name") or "")
        if not (about_model or about_pod):
            continue
        at = e.get("lastTimestamp") or e.get("eventTime") or e.get("firstTimestamp") or \
            (e.get("metadata") or {}).get("creationTimestamp") or ""
        entries.append(TimelineEntry(at, ago(at, now), e.get("type") or "Normal",
                                     "ModelDeployment" if about_model else f"Pod {involved.get('name')}",
                                     e.get("reason") or "", e.get("message") or "", int(e.get("count") or 1)))
    entries.sort(key=lambda entry: parse_time(entry.at) or datetime.min.replace(tzinfo=UTC), reverse=True)
    return entries[:limit]


def vllm_command(md: dict) -> str:
    """The engine command the operator derived (what `cxygpt-profile` prints for the same choice)."""
    args = (md.get("status") or {}).get("engineArgs")
    return "vllm serve " + shlex.join(str(a) for a in args) if args else ""


def run_command(md: dict, pods: list[dict]) -> str:
    """What a replica actually runs (the simulator for `spec.engine.kind: sim`)."""
    for pod in pods:
        if owns_pod(md, pod):
            container: dict = next(iter((pod.get("spec") or {}).get("containers") or []), {})
            return shlex.join([*(container.get("command") or []), *(container.get("args") or [])])
    return ""


def as_yaml(obj: dict) -> str:
    """The object as `kubectl get -o yaml` shows it, without managedFields."""
    shown = {**obj, "metadata": {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}}
    return yaml.safe_dump(shown, sort_keys=False, width=120)


@dataclass
class GpuNode:
    name: str
    ready: bool
    product: str
    memory_mib: int | None
    count: int | None
    allocatable: str
    running: list[tuple[str, int]]       # (namespace/model, GPUs its pods here request)
    sized_for: list[str]                 # models whose profile the operator chose for this node's GPUs


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _gpu_request(pod: dict) -> int:
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        total += _int((resources.get("limits") or {}).get(GPU_RESOURCE)) or \
            _int((resources.get("requests") or {}).get(GPU_RESOURCE)) or 0
    return total


def gpu_nodes(nodes: list[dict], mds: list[dict], pods: list[dict]) -> list[GpuNode]:
    """Every node with GPUs (by GPU Feature Discovery's labels, the operator's override label, or an allocatable
    nvidia.com/gpu), what runs there and which models were sized for it."""
    out = []
    for node in sorted(nodes, key=lambda n: _key(n)[1]):
        name = _key(node)[1]
        labels = (node.get("metadata") or {}).get("labels") or {}
        status = node.get("status") or {}
        allocatable = (status.get("allocatable") or {}).get(GPU_RESOURCE)
        memory = next((_int(labels[k]) for k in GPU_MEMORY_LABELS if _int(labels.get(k))), None)
        if memory is None and allocatable is None and GPU_PRODUCT_LABEL not in labels:
            continue
        running: dict[str, int] = {}
        for pod in pods:
            if (pod.get("spec") or {}).get("nodeName") == name:
                owner = next((f"{_key(md)[0]}/{_key(md)[1]}" for md in mds if owns_pod(md, pod)), None)
                if owner:
                    running[owner] = running.get(owner, 0) + _gpu_request(pod)
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        out.append(GpuNode(
            name=name, ready=ready, product=labels.get(GPU_PRODUCT_LABEL, "unknown"), memory_mib=memory,
            count=_int(labels.get(GPU_COUNT_LABEL)) or _int(allocatable),
            allocatable=str(allocatable or "not advertised"),
            running=sorted(running.items()),
            sized_for=sorted(f"{_key(md)[0]}/{_key(md)[1]}" for md in mds
                             if ((md.get("status") or {}).get("gpu") or {}).get("node") == name)))
    return out
