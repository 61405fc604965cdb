"""Operator metrics: reconciles, models by phase and profile, failures by reason, GPU nodes, time to Ready, calls to
the engines' LoRA endpoints."""
from __future__ import annotations

import datetime
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from .cache import PHASES as CACHE_PHASES
from .status import FAILURE_REASONS

RESULTS = ("ok", "waiting", "failed", "error")
PHASES = ("Pending", "Starting", "PartiallyReady", "Ready", "ScaledToZero", "Failed")


@dataclass
class Observed:
    """What the reconcile loops last saw, read at scrape time (gauges derive from it, never drift)."""
    models: dict = field(default_factory=dict)   # (namespace, name) -> (phase, profile)
    profiles: set = field(default_factory=set)   # every profile seen: its phases are reported, zeros too
    gpu_nodes: list = field(default_factory=list)
    caches: dict = field(default_factory=dict)   # (namespace, name) -> ((namespace, claim), status.cache)


def memory_class(memory_mib: int) -> str:
    """Bounded label values: whole GiB of the per-GPU memory (e.g. 31GiB for an RTX 5090, 79GiB for an H100)."""
    return f"{memory_mib // 1024}GiB"


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.observed = Observed()
        self.reconciles = Counter("cxygpt_operator_reconciles_total", "ModelDeployment reconciles by result",
                                  ["result"], registry=self.registry)
        for result in RESULTS:
            self.reconciles.labels(result)
        self.failures = Counter("cxygpt_operator_model_failures_total",
                                "ModelDeployment failures by reason (each time a model turns Degraded for it)",
                                ["reason"], registry=self.registry)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        self.duration = Histogram("cxygpt_operator_reconcile_duration_seconds", "Time of one reconcile",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                  registry=self.registry)
        self.time_to_ready = Histogram("cxygpt_operator_time_to_ready_seconds",
                                       "From ModelDeployment creation to its first Ready",
                                       buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600),
                                       registry=self.registry)
        self.adapter_calls = Counter("cxygpt_operator_adapter_calls_total",
                                     "Calls to the engines' runtime LoRA endpoints by action (load, unload) and result "
                                     "(ok, failed: refused or no answer in time)", ["action", "result"],
                                     registry=self.registry)
        for action in ("load", "unload"):
            for result in ("ok", "failed"):
                self.adapter_calls.labels(action, result)
        self.registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        phases = GaugeMetricFamily("cxygpt_operator_model_deployments", "ModelDeployments by phase and profile",
                                   labels=["phase", "profile"])
        counts = Tally(self.observed.models.values())
        for profile in sorted(self.observed.profiles):
            for phase in PHASES:
                phases.add_metric([phase, profile], counts[phase, profile])
        yield phases
        nodes = GaugeMetricFamily("cxygpt_operator_gpu_nodes", "Schedulable GPU nodes by memory per GPU",
                                  labels=["memory_class"])
        gpus = GaugeMetricFamily("cxygpt_operator_gpus", "GPUs on schedulable nodes by memory per GPU",
                                 labels=["memory_class"])
        by_class: dict[str, list[int]] = {}
        for node in self.observed.gpu_nodes:
            by_class.setdefault(memory_class(node.memory_mib), []).append(node.count)
        for cls, per_node in sorted(by_class.items()):
            nodes.add_metric([cls], len(per_node))
            gpus.add_metric([cls], sum(per_node))
        yield nodes
        yield gpus
        caches = GaugeMetricFamily("cxygpt_operator_model_caches", "Model caches (claims) by phase",
                                   labels=["phase"])
        done = GaugeMetricFamily("cxygpt_operator_model_cache_bytes", "Bytes of each model cache: downloaded so far "
                                 "(done) and in the repository (total)", labels=["namespace", "claim", "kind"])
        by_claim = {claim: cache for claim, cache in self.observed.caches.values()}
        phases_seen = Tally(cache.get("phase") for cache in by_claim.values())
        for phase in CACHE_PHASES:
            caches.add_metric([phase], phases_seen[phase])
        for (namespace, claim), cache in sorted(by_claim.items()):
            for kind, field_name in (("done", "bytesDone"), ("total", "bytesTotal")):
                if cache.get(field_name) is not None:
                    done.add_metric([namespace, claim, kind], cache[field_name])
        yield caches
        yield done

    def describe(self):
        return []  # collected at scrape time only

    def model_seen(self, key, body: dict, status: dict | None):
        """Record a reconciled model; `body` is the object as it was before this reconcile."""
        status = status or {}
        phase, profile = status.get("phase", "Pending"), status.get("profile", "none")
        self.observed.models[key] = (phase, profile)
        self.observed.profiles.add(profile)
        if status.get("cache", {}).get("claimName"):
            self.observed.caches[key] = ((key[0], status["cache"]["claimName"]), status["cache"])
        else:
            self.observed.caches.pop(key, None)
        before = (body.get("status") or {}).get("phase")
        # the first Ready of the first spec: decided from the stored status, so restarts never re-time
        if phase == "Ready" and before != "Ready" and body["metadata"].get("generation", 1) == 1:
            created = body["metadata"].get("creationTimestamp")
            if created:
                start = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
                self.time_to_ready.observe(max((datetime.datetime.now(datetime.UTC) - start).total_seconds(), 0))

    def model_gone(self, key):
        self.observed.models.pop(key, None)
        self.observed.caches.pop(key, None)
