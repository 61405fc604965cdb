"""Manifests and status (pure): a decision → engine Deployment, Service and ModelDeployment status."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cxygpt_profiles import NoFit, ProfileTable, Selection, engine_args

from . import GROUP, KIND, MANAGER, VERSION
from .nodes import GPU_COUNT_LABEL, GPU_MEMORY_LABEL, GPU_RESOURCE, MEMORY_OVERRIDE_LABEL
from .resolve import ModelSpec

CONFIG_HASH = f"{GROUP}/config-hash"
MODEL_DEPLOYMENT_LABEL = f"{GROUP}/model-deployment"
CACHE_MOUNT = "/models/cache"
WEIGHTS_MOUNT = "/models/weights"


@dataclass(frozen=True)
class Owner:
    """The ModelDeployment the objects belong to."""
    name: str
    namespace: str
    uid: str
    generation: int = 1


@dataclass(frozen=True)
class EngineImages:
    vllm: str
    sim: str


def selector_labels(owner: Owner) -> dict[str, str]:
    """Never changes for an object's life (a Deployment's selector is immutable)."""
    return {"app.kubernetes.io/name": "cxygpt-engine", "app.kubernetes.io/instance": owner.name}


def object_labels(owner: Owner, spec: ModelSpec, sel: Selection) -> dict[str, str]:
    return {**selector_labels(owner),
            "app.kubernetes.io/component": "engine",
            "app.kubernetes.io/part-of": "cxygpt",
            "app.kubernetes.io/managed-by": MANAGER,
            MODEL_DEPLOYMENT_LABEL: owner.name,
            f"{GROUP}/profile": sel.profile.name,
            f"{GROUP}/engine": spec.engine_kind}


def owner_reference(owner: Owner) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": owner.name, "uid": owner.uid,
            "controller": True, "blockOwnerDeletion": True}


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _storage(spec: ModelSpec, weights: str) -> tuple[str, list[dict], list[dict], list[dict]]:
    """Model argument, volumes, mounts and env for the weights' source."""
    uri = spec.source_for(weights)
    scheme, _, rest = uri.partition("://")
    cache = ({"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.cache_claim}} if spec.cache_claim
             else {"name": "model-cache", "emptyDir": {}})
    volumes, mounts = [cache], [{"name": "model-cache", "mountPath": CACHE_MOUNT}]
    env = [{"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"}]
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        volumes.append({"name": "model-weights", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model-weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True})
        return f"{WEIGHTS_MOUNT}/{path}", volumes, mounts, env
    return rest, volumes, mounts, env


def _probes(kind: str) -> dict:
    # vLLM answers /health only once weights are loaded: a long startup budget (downloads, 30 min),
    # then quick readiness and a patient liveness so a busy engine is not restarted.
    startup_failures = 180 if kind == "vllm" else 30
    def probe(period: int, failures: int, timeout: int) -> dict:
        return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
                "failureThreshold": failures, "timeoutSeconds": timeout}
    return {"startupProbe": probe(10, startup_failures, 5), "readinessProbe": probe(5, 3, 3),
            "livenessProbe": probe(15, 4, 10)}


def _affinity(sel: Selection) -> dict:
    """Nodes whose GPUs meet the profile: GFD labels or the override label (terms are ORed)."""
    gpu = sel.profile.gpu
    def term(memory_label: str) -> dict:
        expressions = [{"key": memory_label, "operator": "Gt", "values": [str(gpu.min_memory_mib - 1)]}]
        if sel.gpu_count > 1:
            expressions.append({"key": GPU_COUNT_LABEL, "operator": "Gt", "values": [str(sel.gpu_count - 1)]})
        return {"matchExpressions": expressions}
    terms = [term(GPU_MEMORY_LABEL), term(MEMORY_OVERRIDE_LABEL)]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def engine_command(spec: ModelSpec, table: ProfileTable) -> list[str]:
    return list(table.vllm.command) if spec.engine_kind == "vllm" else ["cxygpt-sim", "serve"]


def build_deployment(owner: Owner, spec: ModelSpec, sel: Selection, table: ProfileTable, images: EngineImages) -> dict:
    port = table.vllm.port
    model, volumes, mounts, env = _storage(spec, sel.profile.weights)
    args = engine_args(sel, model=model, served_name=spec.served_name, port=port) + list(spec.extra_args)
    if spec.engine_kind == "sim":
        # the simulator sizes its KV budget like the GPU it stands in for
        env.append({"name": "CXYGPT_SIM_GPU_MEMORY_MIB", "value": str(sel.node.memory_mib)})
        resources = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    else:
        resources = {"requests": {GPU_RESOURCE: str(sel.gpu_count)}, "limits": {GPU_RESOURCE: str(sel.gpu_count)}}
    env += [{"name": n, "value": v} for n, v in spec.env]
    if sel.gpu_count > 1:
        # tensor parallel workers exchange tensors through shared memory
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": table.vllm.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    labels = object_labels(owner, spec, sel)
    hardening = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if spec.engine_kind == "sim":
        # the simulator writes nothing; vLLM's image runs as root and writes its caches, so it keeps those
        hardening.update(runAsNonRoot=True, readOnlyRootFilesystem=True)
    container = {
        "name": "engine",
        "image": spec.image or (images.vllm if spec.engine_kind == "vllm" else images.sim),
        "command": engine_command(spec, table),
        "args": args,
        "env": sorted(env, key=lambda e: e["name"]),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": hardening,
        **_probes(spec.engine_kind),
    }
    template = {
        # vLLM's metrics (the simulator's too), for annotation-based scraping; the chart's PodMonitor otherwise
        "metadata": {"labels": dict(labels), "annotations": {"prometheus.io/scrape": "true",
                                                              "prometheus.io/port": str(port),
                                                              "prometheus.io/path": "/metrics"}},
        "spec": {
            "containers": [container],
            "volumes": sorted(volumes, key=lambda v: v["name"]),
            "affinity": _affinity(sel),
            "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": 60,
        },
    }
    digest = config_hash(template)
    template["metadata"]["annotations"][CONFIG_HASH] = digest
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": labels,
                     "annotations": {CONFIG_HASH: digest}, "ownerReferences": [owner_reference(owner)]},
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(owner)},
            # GPUs are usually all taken: replace pods in place rather than surging an extra one
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": template,
        },
    }


def build_service(owner: Owner, spec: ModelSpec, sel: Selection, table: ProfileTable) -> dict:
    labels = object_labels(owner, spec, sel)
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": labels,
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {"type": "ClusterIP", "selector": selector_labels(owner),
                 "ports": [{"name": "http", "port": table.vllm.port, "targetPort": "http", "protocol": "TCP"}]},
    }
    body["metadata"]["annotations"] = {CONFIG_HASH: config_hash(body["spec"])}
    return body


# --- status ---------------------------------------------------------------------------------------------------

def _condition(type_: str, ok: bool, reason: str, message: str, generation: int, previous: list[dict], now: str) -> dict:
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    # lastTransitionTime moves only when the status flips (Kubernetes API conventions)
    since = before["lastTransitionTime"] if before and before.get("status") == status and before.get("lastTransitionTime") else now
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since}


def _deployment_counts(deployment: dict | None) -> tuple[int, int]:
    status = (deployment or {}).get("status") or {}
    return status.get("replicas") or 0, status.get("readyReplicas") or 0


def _deployment_failure(deployment: dict | None) -> str | None:
    for cond in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return cond.get("message") or "replica failure"
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return cond.get("message") or cond.get("reason") or "rollout stalled"
    return None


def build_status(owner: Owner, spec: ModelSpec, outcome: Selection | NoFit, *, table: ProfileTable,
                 deployment: dict | None, image: str | None, args: list[str] | None, previous: dict, now: str) -> dict:
    """The whole status for this reconcile; written only when it differs from `previous`."""
    gen, before = owner.generation, previous.get("conditions") or []
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(owner).items())
    if isinstance(outcome, NoFit):
        phase = "Failed" if outcome.permanent else "Pending"
        status = {**{k: previous[k] for k in ("profile", "mode", "gpu", "limits", "endpoint", "image", "engineArgs")
                     if k in previous and deployment is not None},
                  "phase": phase, "fit": outcome.fit.as_status() if outcome.fit else None}
        replicas, ready = _deployment_counts(deployment)
        conditions = [
            _condition("ProfileSelected", False, outcome.reason, outcome.message, gen, before, now),
            _condition("Available", ready > 0, "MinimumReplicasAvailable" if ready else outcome.reason,
                       f"{ready} engine replicas ready" if ready else outcome.message, gen, before, now),
            _condition("Progressing", False, outcome.reason, outcome.message, gen, before, now),
            _condition("Degraded", outcome.permanent, outcome.reason if outcome.permanent else "AsExpected",
                       outcome.message if outcome.permanent else "", gen, before, now),
        ]
    else:
        sel = outcome
        replicas, ready = _deployment_counts(deployment)
        desired = spec.replicas
        failure = _deployment_failure(deployment)
        phase = "Ready" if deployment is not None and ready >= desired else "Starting"
        how = "forced by spec.profile" if sel.forced else f"auto for mode {spec.mode}"
        gpu_text = f"{sel.gpu_count}x {sel.node.product} ({sel.node.memory_mib} MiB)"
        notes = "".join(f"; {n}" for n in sel.notes)
        status = {
            "phase": phase,
            "mode": sel.mode,
            "profile": sel.profile.name,
            "image": image,
            "engineArgs": args,
            "gpu": {"product": sel.node.product, "memoryMiB": sel.node.memory_mib, "count": sel.gpu_count,
                    "node": sel.node.name, "summary": f"{sel.gpu_count}x{sel.node.memory_mib // 1024}GiB"},
            "limits": sel.limits.model_dump(by_alias=True),
            "fit": sel.fit.as_status() if sel.fit else None,
            "endpoint": f"http://{owner.name}.{owner.namespace}.svc:{table.vllm.port}",
        }
        if desired == 0:
            available = (False, "ScaledToZero", "spec.replicas is 0")
        elif ready:
            available = (True, "MinimumReplicasAvailable", f"{ready}/{desired} engine replicas ready")
        else:
            available = (False, "EnginesStarting", f"0/{desired} engine replicas ready (loading the model)")
        conditions = [
            _condition("ProfileSelected", True, "Forced" if sel.forced else "AutoSelected",
                       f"{sel.profile.name} ({how}) on {gpu_text}{notes}", gen, before, now),
            _condition("Available", *available, gen, before, now),
            _condition("Progressing", phase != "Ready", "EnginesStarting" if phase != "Ready" else "RolloutComplete",
                       f"{ready}/{desired} engine replicas ready", gen, before, now),
            _condition("Degraded", failure is not None, "EngineFailure" if failure else "AsExpected",
                       failure or "", gen, before, now),
        ]
    status.update({"observedGeneration": gen, "replicas": replicas, "readyReplicas": ready,
                   "ready": f"{ready}/{spec.replicas}", "selector": selector, "conditions": conditions})
    return {k: v for k, v in status.items() if v is not None}


def build_failed_status(owner: Owner, previous: dict, reason: str, message: str, *, now: str) -> dict:
    """Failed before any decision (a spec the schema should have refused, a name taken by someone else):
    the rest of the previous status stays as it was."""
    gen, before = owner.generation, previous.get("conditions") or []
    kept = [c for c in before if c.get("type") not in ("ProfileSelected", "Degraded")]
    return {**previous, "phase": "Failed", "observedGeneration": gen, "conditions": [
        _condition("ProfileSelected", False, reason, message, gen, before, now),
        *kept,
        _condition("Degraded", True, reason, message, gen, before, now)]}
