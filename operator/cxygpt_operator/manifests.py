"""Manifests (pure): a decision → the engine Deployment, Service, NetworkPolicy and the cache's download Job."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cxygpt_profiles import ProfileTable, Selection, engine_args
from cxygpt_profiles.engine import RUNTIME_LORA_ENV, lora_args

from . import GROUP, KIND, MANAGER, VERSION
from .adapter_cache import ADAPTER_CACHE_MOUNT, ADAPTER_CACHE_VOLUME
from .adapters import ADAPTERS_GATE, claim_mount
from .cache import CacheKey, build_job, cache_key, hf_source, weights_path
from .nodes import GPU_COUNT_LABEL, GPU_MEMORY_LABEL, GPU_PRODUCT_LABEL, GPU_RESOURCE, MEMORY_OVERRIDE_LABEL
from .resolve import ModelSpec, lora_slots

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
PREFERRED_SIZE_WEIGHT = 100     # nodes like the one the engine was sized for
PREFERRED_PRODUCT_WEIGHT = 50   # spec.gpu.products with productPolicy Prefer


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
    volumes: list[dict] = [cache]
    mounts: list[dict] = [{"name": "model-cache", "mountPath": CACHE_MOUNT}]
    env: list[dict] = [{"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"}]
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
    hub = hf_source(uri)
    return hub[0] if hub else rest, volumes, mounts, env


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


def _gpu_terms(spec: ModelSpec, sel: Selection) -> list[dict]:
    """The operator's required node selector terms (ORed): nodes whose GPUs meet the profile and spec.gpu, by GPU
    Feature Discovery's labels or the override label; for MIG slices of the mixed strategy, their kind's labels."""
    node, least = sel.node, max(sel.profile.gpu.min_memory_mib, spec.gpu.min_memory_mib or 0)
    labels: list[tuple[str, str, str | None]]
    if node.resource != GPU_RESOURCE:
        labels = [(f"{node.resource}.memory", f"{node.resource}.product", None)]
    else:
        labels = [(GPU_MEMORY_LABEL, GPU_PRODUCT_LABEL, GPU_COUNT_LABEL),
                  (MEMORY_OVERRIDE_LABEL, GPU_PRODUCT_LABEL, GPU_COUNT_LABEL)]
    terms = []
    for memory, product, count in labels:
        expressions = [{"key": memory, "operator": "Gt", "values": [str(least - 1)]}]
        if sel.gpu_count > 1 and count:
            expressions.append({"key": count, "operator": "Gt", "values": [str(sel.gpu_count - 1)]})
        if spec.gpu.require:
            expressions.append({"key": product, "operator": "In", "values": sorted(spec.gpu.products)})
        terms.append({"matchExpressions": expressions})
    return terms


def _joined(ours: list[dict], theirs: list[dict]) -> list[dict]:
    """Both sets of ORed terms must hold: each of theirs joined to each of ours."""
    if not theirs:
        return ours
    return [{"matchExpressions": [*mine["matchExpressions"], *(other.get("matchExpressions") or [])],
             **({"matchFields": other["matchFields"]} if other.get("matchFields") else {})}
            for other in theirs for mine in ours]


def node_affinity(spec: ModelSpec, sel: Selection) -> dict:
    """The operator's node affinity joined with spec.engine's: required, the GPUs sizing chose (and spec.gpu's);
    preferred, nodes like the one it was sized for (its GPU memory and count, so a small engine does not take a GPU
    of a larger node that another model needs whole: the scheduler otherwise spreads pods), preferred products."""
    node = sel.node
    memory_labels = [f"{node.resource}.memory"] if node.resource != GPU_RESOURCE else [GPU_MEMORY_LABEL,
                                                                                        MEMORY_OVERRIDE_LABEL]
    preferred = [{"weight": PREFERRED_SIZE_WEIGHT, "preference": {"matchExpressions": [
        {"key": label, "operator": "In", "values": [str(node.memory_mib)]},
        *([{"key": GPU_COUNT_LABEL, "operator": "In", "values": [str(node.count)]}] if not node.mig else [])]}}
        for label in memory_labels]
    if spec.gpu.preferred:
        product = f"{node.resource}.product" if node.resource != GPU_RESOURCE else GPU_PRODUCT_LABEL
        preferred.append({"weight": PREFERRED_PRODUCT_WEIGHT, "preference": {"matchExpressions": [
            {"key": product, "operator": "In", "values": sorted(spec.gpu.preferred)}]}})
    terms = _joined(_gpu_terms(spec, sel), spec.pod.required_node_terms)
    return {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms},
            "preferredDuringSchedulingIgnoredDuringExecution": [*preferred, *spec.pod.preferred_node_terms]}


def build_cache_job(key: CacheKey, namespace: str, spec: ModelSpec, sel: Selection, size: str, users: list,
                    table: ProfileTable, images: EngineImages, hf_endpoint: str | None = None, *,
                    claim_uid: str) -> dict:
    """The cache's download Job, placed like the engines (see cache.build_job): their node affinity, node selector
    and tolerations."""
    return build_job(key, namespace, spec.cache, size, users, image=images.loader,
                     affinity={"nodeAffinity": node_affinity(spec, sel)}, tolerations=spec.tolerations,
                     consts=table.cache, hf_endpoint=hf_endpoint, claim_uid=claim_uid,
                     node_selector=dict(spec.pod.node_selector))


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
    """The operator's requests and limits, spec.engine.resources' over them key by key (never the GPUs)."""
    if spec.engine_kind == "sim":
        requests, limits = {"cpu": "100m", "memory": "128Mi"}, {"memory": "512Mi"}
    else:
        gpus, resource = sel.gpu_count, sel.node.resource
        # no CPU limit: throttling an engine shows up as latency; memory is requested, not capped (loading peaks)
        requests = {resource: str(gpus), "cpu": str(VLLM_CPU_PER_GPU * gpus),
                    "memory": f"{VLLM_MEMORY_GIB_PER_GPU * gpus}Gi"}
        limits = {resource: str(gpus)}
    requests.update({k: str(v) for k, v in spec.pod.requests.items()})
    limits.update({k: str(v) for k, v in spec.pod.limits.items()})
    return {"requests": requests, "limits": limits}


def build_deployment(owner: Owner, spec: ModelSpec, sel: Selection, table: ProfileTable, images: EngineImages,
                     hf_endpoint: str | None = None, adapter_cache: str | None = None) -> dict:
    """`hf_endpoint`: the Hub (mirror) an engine downloads from when it downloads its weights itself;
    `adapter_cache`: the claim of the model's adapter cache, which the engines mount when they have adapters."""
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
    if slots := lora_slots(spec, table):
        # the adapters themselves are loaded at runtime (the operator's adapter loop): none of them is named here,
        # so adding or removing one never changes the pod template
        args += lora_args(slots)
        env.append({"name": RUNTIME_LORA_ENV, "value": "True"})
        for claim in sorted({a.claim for a in spec.adapters if a.claim}):
            volume = f"adapters-{hashlib.sha256(claim.encode()).hexdigest()[:12]}"
            volumes.append({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
            mounts.append({"name": volume, "mountPath": claim_mount(claim), "readOnly": True})
        if adapter_cache is not None:
            # the engines run offline: Hub adapters are downloaded into the model's adapter cache (the adapter
            # loop fills it, one Job per adapter revision), mounted whatever the adapters are, so adding one never
            # changes the pod template
            volumes.append({"name": ADAPTER_CACHE_VOLUME, "persistentVolumeClaim": {
                "claimName": adapter_cache, "readOnly": True}})
            mounts.append({"name": ADAPTER_CACHE_VOLUME, "mountPath": ADAPTER_CACHE_MOUNT, "readOnly": True})
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
    hardening: dict[str, object] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                    "runAsNonRoot": True}
    pod_security: dict[str, object] = {"seccompProfile": {"type": "RuntimeDefault"}}
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
    pod = spec.pod
    # vLLM's metrics (the simulator's too), for annotation-based scraping (the chart's PodMonitor otherwise); the
    # spec's annotations may turn it off
    annotations: dict[str, str] = {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                                   "prometheus.io/path": "/metrics", **pod.annotations}
    template = {
        "metadata": {"labels": {**pod.labels, **labels}, "annotations": annotations},
        "spec": {
            "containers": [container],
            "volumes": sorted(volumes, key=lambda v: v["name"]),
            "affinity": {"nodeAffinity": node_affinity(spec, sel), **{
                part: value for part, value in pod.affinity.items() if part != "nodeAffinity"}},
            "tolerations": spec.tolerations,
            "securityContext": pod_security,
            "terminationGracePeriodSeconds": drain + 30,
            **({"nodeSelector": dict(pod.node_selector)} if pod.node_selector else {}),
            **({"runtimeClassName": pod.runtime_class} if pod.runtime_class else {}),
            **({"priorityClassName": pod.priority_class} if pod.priority_class else {}),
            # with adapters: Ready only once the operator loaded them into this pod's engine
            **({"readinessGates": [{"conditionType": ADAPTERS_GATE}]} if spec.adapters else {}),
        },
    }
    digest = config_hash(template)
    annotations[CONFIG_HASH] = digest
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
    body: dict = {
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
    body: dict = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": owner.name, "namespace": owner.namespace, "labels": object_labels(owner, spec, sel),
                     "ownerReferences": [owner_reference(owner)]},
        "spec": {"podSelector": {"matchLabels": selector_labels(owner)}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": sources, "ports": [{"port": table.vllm.port, "protocol": "TCP"}]}]},
    }
    body["metadata"]["annotations"] = {CONFIG_HASH: config_hash(body["spec"])}
    return body
