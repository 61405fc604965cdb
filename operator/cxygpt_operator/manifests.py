"""Manifests (pure): a decision → the engine Deployment, Service, NetworkPolicy and the cache's download Job."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cxygpt_profiles import ProfileTable, Selection, engine_args

from . import GROUP, KIND, MANAGER, VERSION
from .cache import CacheKey, build_job, cache_key, hf_source, weights_path
from .nodes import GPU_COUNT_LABEL, GPU_MEMORY_LABEL, GPU_RESOURCE, MEMORY_OVERRIDE_LABEL
from .resolve import ModelSpec

CONFIG_HASH = f"{GROUP}/config-hash"
MODEL_DEPLOYMENT_LABEL = f"{GROUP}/model-deployment"
CACHE_MOUNT = "/models/cache"
WEIGHTS_MOUNT = "/models/weights"
HOME_MOUNT = "/home/engine"
ENGINE_ACCESS_LABEL = f"{GROUP}/engine-access"
# vLLM's image has no user of its own: any uid runs it once HOME (its libraries' caches) is writable
ENGINE_UID = 1000
MAX_DRAIN_S = 600
# per GPU, for a vLLM engine whose profile names none: the API server, the engine core and its tokenizer
# processes, and the host memory that loading safetensors passes through
VLLM_CPU_PER_GPU = 4
VLLM_MEMORY_GIB_PER_GPU = 16
ROLLING_UPDATES = {
    # a new pod is ready before an old one goes: needs one replica's GPUs free during the rollout
    "Surge": {"maxSurge": 1, "maxUnavailable": 0},
    # an old pod goes first, its GPUs take the new one: no spare GPUs needed, one replica fewer meanwhile
    "InPlace": {"maxSurge": 0, "maxUnavailable": 1},
}


@dataclass(frozen=True)
class Owner:
    """The ModelDeployment the objects belong to."""
    name: str
    namespace: str
    uid: str
    generation: int = 1


DEFAULT_LOADER_IMAGE = "cxygpt/cxygpt-operator:0.1.0"  # the operator's image runs the cache's download Job
GPU_TOLERATIONS = ({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},)


@dataclass(frozen=True)
class EngineImages:
    vllm: str
    sim: str
    loader: str = DEFAULT_LOADER_IMAGE


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


def engine_cache(spec: ModelSpec, sel: Selection) -> CacheKey | None:
    """The managed cache the engines read their weights from, or None (no cache, or a pvc:// source)."""
    return cache_key(spec.source_for(sel.profile.weights)) if spec.cache.enabled else None


def _storage(spec: ModelSpec, weights: str) -> tuple[str, list[dict], list[dict], list[dict]]:
    """Model argument, volumes, mounts and env for the weights' source."""
    uri = spec.source_for(weights)
    scheme, _, rest = uri.partition("://")
    key = cache_key(uri) if spec.cache.enabled else None
    cache = ({"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.cache_claim}} if spec.cache_claim
             else {"name": "model-cache", "emptyDir": {}})
    volumes, mounts = [cache], [{"name": "model-cache", "mountPath": CACHE_MOUNT}]
    env = [{"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"}]
    if spec.engine_kind == "vllm":
        # HOME holds the caches vLLM's libraries write (compile, Triton, FlashInfer), so a non-root uid can run it
        volumes.append({"name": "engine-home", "emptyDir": {}})
        mounts.append({"name": "engine-home", "mountPath": HOME_MOUNT})
        env.append({"name": "HOME", "value": HOME_MOUNT})
    if key is not None:
        # the managed cache: downloaded once by its Job, mounted read-only; the engine never downloads
        volumes.append({"name": "model-weights", "persistentVolumeClaim": {"claimName": key.claim, "readOnly": True}})
        mounts.append({"name": "model-weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True})
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
        return weights_path(key, WEIGHTS_MOUNT), volumes, mounts, env
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        volumes.append({"name": "model-weights", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model-weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True})
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})  # the weights are local: never reach for the Hub
        return f"{WEIGHTS_MOUNT}/{path}", volumes, mounts, env
    return hf_source(uri)[0] if hf_source(uri) else rest, volumes, mounts, env


def _revision(spec: ModelSpec, weights: str) -> str | None:
    """The revision a hub download by the engine itself pins (hf://Org/Name@revision), else None."""
    found = hf_source(spec.source_for(weights))
    return found[1] if found and not spec.cache.enabled else None


# an engine is Ready within this long of answering /health (kubelet runs the readiness probe only once the startup
# probe passed): a request held while a model starts from zero waits for it, so it is short; the budget stays
STARTUP_PERIOD_S = 2
# scheduling and an image pull (vLLM's image is ~10 GB) come before the startup probe's budget
PULL_MARGIN_S = 600


def _startup_failures(kind: str) -> int:
    # vLLM answers /health only once weights are loaded: a long startup budget (downloads, 30 min); 5 min for the
    # simulator
    return (1800 if kind == "vllm" else 300) // STARTUP_PERIOD_S


def _probes(kind: str) -> dict:
    """A long startup budget, then quick readiness and a patient liveness so a busy engine is not restarted."""
    def probe(period: int, failures: int, timeout: int) -> dict:
        return {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period,
                "failureThreshold": failures, "timeoutSeconds": timeout}
    return {"startupProbe": probe(STARTUP_PERIOD_S, _startup_failures(kind), 5), "readinessProbe": probe(5, 3, 3),
            "livenessProbe": probe(15, 4, 10)}


def progress_deadline_s(kind: str) -> int:
    """The Deployment's progress deadline: past the startup budget, so a model still loading is never reported
    as a stalled rollout (Kubernetes' default, 600 s, is shorter than vLLM's 30 min of loading)."""
    return STARTUP_PERIOD_S * _startup_failures(kind) + PULL_MARGIN_S


def _affinity(sel: Selection) -> dict:
    """Nodes whose GPUs meet the profile: GFD labels or the override label (terms are ORed)."""
    gpu = sel.profile.gpu
    def term(memory_label: str) -> dict:
        expressions = [{"key": memory_label, "operator": "Gt", "values": [str(gpu.min_memory_mib - 1)]}]
        if sel.gpu_count > 1:
            expressions.append({"key": GPU_COUNT_LABEL, "operator": "Gt", "values": [str(sel.gpu_count - 1)]})
        return {"matchExpressions": expressions}
    terms = [term(GPU_MEMORY_LABEL), term(MEMORY_OVERRIDE_LABEL)]
    # preferred: nodes like the one the engine was sized for (its GPU memory and count), so a small engine does not
    # take a GPU of a larger node that another model needs whole (the scheduler otherwise spreads pods)
    sized = sel.node
    preferred = [{"weight": 100, "preference": {"matchExpressions": [
        {"key": label, "operator": "In", "values": [str(sized.memory_mib)]},
        {"key": GPU_COUNT_LABEL, "operator": "In", "values": [str(sized.count)]}]}}
        for label in (GPU_MEMORY_LABEL, MEMORY_OVERRIDE_LABEL)]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms},
                             "preferredDuringSchedulingIgnoredDuringExecution": preferred}}


def build_cache_job(key: CacheKey, namespace: str, spec: ModelSpec, sel: Selection, size: str, users: list,
                    table: ProfileTable, images: EngineImages, hf_endpoint: str | None = None, *,
                    claim_uid: str) -> dict:
    """The cache's download Job, placed like the engines (see cache.build_job)."""
    return build_job(key, namespace, spec.cache, size, users, image=images.loader, affinity=_affinity(sel),
                     tolerations=[dict(t) for t in GPU_TOLERATIONS], consts=table.cache, hf_endpoint=hf_endpoint,
                     claim_uid=claim_uid)


def claims_of(deployment: dict | None) -> set[str]:
    """The PersistentVolumeClaims a Deployment's pods mount."""
    volumes = ((((deployment or {}).get("spec") or {}).get("template") or {}).get("spec") or {}).get("volumes") or []
    return {v["persistentVolumeClaim"]["claimName"] for v in volumes if v.get("persistentVolumeClaim")}


def engine_command(spec: ModelSpec, table: ProfileTable) -> list[str]:
    return list(table.vllm.command) if spec.engine_kind == "vllm" else ["cxygpt-sim", "serve"]


def drain_seconds(sel: Selection) -> int:
    """How long a terminating engine keeps serving its requests in flight: the longest request the gateway allows."""
    return min(int(sel.limits.timeouts.total_s), MAX_DRAIN_S)


def _resources(spec: ModelSpec, sel: Selection) -> dict:
    if spec.engine_kind == "sim":
        return {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    gpus = sel.gpu_count
    # no CPU limit: throttling an engine shows up as latency; memory is requested, not capped (loading peaks)
    return {"requests": {GPU_RESOURCE: str(gpus), "cpu": str(VLLM_CPU_PER_GPU * gpus),
                         "memory": f"{VLLM_MEMORY_GIB_PER_GPU * gpus}Gi"},
            "limits": {GPU_RESOURCE: str(gpus)}}


def build_deployment(owner: Owner, spec: ModelSpec, sel: Selection, table: ProfileTable, images: EngineImages,
                     hf_endpoint: str | None = None) -> dict:
    """`hf_endpoint`: the Hub (mirror) an engine downloads from when it downloads its weights itself."""
    port = table.vllm.port
    model, volumes, mounts, env = _storage(spec, sel.profile.weights)
    if hf_endpoint and not any(e["name"] == "HF_HUB_OFFLINE" for e in env):
        env.append({"name": "HF_ENDPOINT", "value": hf_endpoint})
    args = engine_args(sel, model=model, served_name=spec.served_name, port=port)
    if revision := _revision(spec, sel.profile.weights):
        args += ["--revision", revision]
    if spec.task == "embed":
        args += ["--runner", "pooling"]
    if spec.trust_remote_code:
        args.append("--trust-remote-code")
    args += list(spec.extra_args)
    if spec.engine_kind == "sim":
        # the simulator sizes its KV budget like the GPU it stands in for
        env.append({"name": "CXYGPT_SIM_GPU_MEMORY_MIB", "value": str(sel.node.memory_mib)})
    env += [{"name": n, "value": v} for n, v in spec.env]
    if sel.gpu_count > 1:
        # tensor parallel workers exchange tensors through shared memory
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": table.vllm.shm_size}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    labels = object_labels(owner, spec, sel)
    hardening = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}
    pod_security = {"seccompProfile": {"type": "RuntimeDefault"}}
    if spec.engine_kind == "sim":
        # the simulator's image has its own user and writes nothing
        hardening["readOnlyRootFilesystem"] = True
    else:
        # vLLM's image runs as root unless told otherwise; it writes compile caches outside HOME too (/tmp).
        # fsGroup makes the cache volume (a PVC too) writable by that uid.
        hardening.update(runAsUser=ENGINE_UID, runAsGroup=ENGINE_UID)
        pod_security.update(fsGroup=ENGINE_UID, fsGroupChangePolicy="OnRootMismatch")
    drain = drain_seconds(sel)
    container = {
        "name": "engine",
        "image": spec.image or (images.vllm if spec.engine_kind == "vllm" else images.sim),
        "command": engine_command(spec, table),
        "args": args,
        "env": sorted(env, key=lambda e: e["name"]),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "resources": _resources(spec, sel),
        "volumeMounts": mounts,
        "securityContext": hardening,
        # the engine's last output lines become lastState.terminated.message: status shows why it crashed
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # the endpoint turns not-ready at once; the engine keeps serving its requests in flight meanwhile
        "lifecycle": {"preStop": {"sleep": {"seconds": drain}}},
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
            "tolerations": [dict(t) for t in GPU_TOLERATIONS],
            "securityContext": pod_security,
            "terminationGracePeriodSeconds": drain + 30,
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
            "strategy": {"type": "RollingUpdate", "rollingUpdate": dict(ROLLING_UPDATES[spec.rollout])},
            "progressDeadlineSeconds": progress_deadline_s(spec.engine_kind),
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


def build_network_policy(owner: Owner, spec: ModelSpec, sel: Selection, table: ProfileTable,
                         metrics_namespaces: tuple[str, ...], gateway_namespaces: tuple[str, ...] = ()) -> dict:
    """Engine ports open only to pods labelled for engine access (the gateway's) in the gateway's namespaces, and
    to the namespaces given for metrics scraping: nothing else gets around the gateway's keys and limits. Without
    gateway namespaces the label is trusted in any namespace, so anyone who may label a pod gets in."""
    gateway_pods = {"podSelector": {"matchLabels": {ENGINE_ACCESS_LABEL: "true"}}}
    sources = ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}, **gateway_pods}
                for ns in sorted(set(gateway_namespaces))] if gateway_namespaces
               else [{"namespaceSelector": {}, **gateway_pods}])
    sources += [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
                for ns in sorted(set(metrics_namespaces))]
    body = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": object_labels(owner, spec, sel),
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {"podSelector": {"matchLabels": selector_labels(owner)}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": sources, "ports": [{"port": table.vllm.port, "protocol": "TCP"}]}]},
    }
    body["metadata"]["annotations"] = {CONFIG_HASH: config_hash(body["spec"])}
    return body
