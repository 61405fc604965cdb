"""Manifests and status (pure): a decision → engine Deployment, Service, NetworkPolicy and ModelDeployment status."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cxygpt_profiles import NoFit, ProfileTable, Selection, engine_args

from . import GROUP, KIND, MANAGER, VERSION
from .cache import CacheKey, CacheState, build_job, cache_key, cache_status, hf_source, weights_path
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
                    table: ProfileTable, images: EngineImages, hf_endpoint: str | None = None) -> dict:
    """The cache's download Job, placed like the engines (see cache.build_job)."""
    return build_job(key, namespace, spec.cache, size, users, image=images.loader, affinity=_affinity(sel),
                     tolerations=[dict(t) for t in GPU_TOLERATIONS], consts=table.cache, hf_endpoint=hf_endpoint)


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


# --- status ---------------------------------------------------------------------------------------------------

def _condition(type_: str, ok: bool, reason: str, message: str, generation: int, previous: list[dict], now: str) -> dict:
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    # lastTransitionTime moves only when the status flips (Kubernetes API conventions)
    since = before["lastTransitionTime"] if before and before.get("status") == status and before.get("lastTransitionTime") else now
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since}


# Degraded reasons that are failures (an Event and a metric each time one appears)
FAILURE_REASONS = ("EngineCrashLoop", "EngineCannotStart", "DeploymentRejected", "ModelNameConflict",
                   "InsufficientGPUs", "InsufficientGPUMemory", "InvalidSpec", "ResourceConflict", "EngineFailure",
                   "UnknownProfile", "MissingWeightVariant", "NoProfileForMode",
                   "CacheDownloadFailed", "CacheClaimFailed", "CacheSizeUnknown")
# a cache whose claim cannot get a volume: Pending (the cluster may still provide one) but a failure to report
CLAIM_PROBLEMS = ("StorageClassNotFound", "NoDefaultStorageClass", "ProvisioningFailed")
# waiting reasons of a container that will not start however long it waits
CANNOT_START = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                "CreateContainerError")


@dataclass(frozen=True)
class EngineState:
    """What the engine Deployment and its Pods say, reduced to what status needs."""
    replicas: int
    ready: int
    rolling: bool
    failure: tuple[str, str] | None  # (reason, message) of the first failing pod, oldest first
    unscheduled: str | None = None   # why the scheduler has no node for the oldest pod without one


def _pod_ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def pod_failure(pod: dict) -> tuple[str, str] | None:
    """(reason, message) when the pod's engine crash-loops or cannot start; None while it runs or loads."""
    status = pod.get("status") or {}
    engine = next((c for c in status.get("containerStatuses") or [] if c.get("name") == "engine"), None)
    if engine is None:
        return None
    name = pod.get("metadata", {}).get("name", "")
    waiting = (engine.get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in CANNOT_START:
        return "EngineCannotStart", f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    if waiting.get("reason") == "CrashLoopBackOff" or status.get("phase") == "Failed":
        last = ((engine.get("lastState") or {}).get("terminated") or (engine.get("state") or {}).get("terminated")
                or {})
        message = (f"pod {name}: engine exited with code {last.get('exitCode', '?')} ({last.get('reason', 'Error')}), "
                   f"{engine.get('restartCount', 0)} restarts")
        if line := _last_line(last.get("message")):
            message += f"; last log line: {line}"
        return "EngineCrashLoop", message
    return None


def pod_unscheduled(pod: dict) -> str | None:
    """The scheduler's reason when it found no node for the pod (its PodScheduled condition), else None."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return f"pod {pod.get('metadata', {}).get('name', '')}: {cond.get('message') or 'no node fits'}"
    return None


def engine_state(deployment: dict | None, pods: list[dict]) -> EngineState:
    """Counts from the Pods when there are any (fresher than the Deployment's status), else the Deployment's."""
    status = (deployment or {}).get("status") or {}
    live = [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")]
    hashes = {p.get("metadata", {}).get("labels", {}).get("pod-template-hash") for p in pods}
    generation = (deployment or {}).get("metadata", {}).get("generation")
    updated = status.get("updatedReplicas")
    rolling = (len(hashes) > 1
               or (updated is not None and updated < (status.get("replicas") or 0))
               or (generation is not None and status.get("observedGeneration", generation) < generation))
    oldest_first = sorted(live, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")
    failures = [f for p in oldest_first if (f := pod_failure(p))]
    unscheduled = next((u for p in oldest_first if (u := pod_unscheduled(p))), None)
    if pods:
        replicas, ready = len(live), sum(_pod_ready(p) for p in live)
    else:
        replicas, ready = status.get("replicas") or 0, status.get("readyReplicas") or 0
    if failures:
        return EngineState(replicas, ready, rolling, failures[0], unscheduled)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            return EngineState(replicas, ready, rolling, ("EngineFailure", cond.get("message") or "replica failure"),
                               unscheduled)
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return EngineState(replicas, ready, rolling,
                               ("EngineFailure", cond.get("message") or cond.get("reason") or "rollout stalled"),
                               unscheduled)
    return EngineState(replicas, ready, rolling, None, unscheduled)


def zero_message(spec: ModelSpec) -> str:
    if spec.autoscaling is None:
        return "spec.replicas is 0"
    return (f"scaled to zero by the autoscaler after {spec.autoscaling.scale_down_delay_s} s without requests; "
            "the next request starts it")


def _progress(engines: EngineState, desired: int, zero_why: str = "spec.replicas is 0") -> tuple[bool, str, str]:
    counts = f"{engines.ready}/{desired} engine replicas ready"
    if engines.rolling:
        return True, "RollingUpdate", f"replacing engine pods; {counts}"
    if engines.replicas > desired:
        return True, "ScalingDown", f"{engines.replicas} engine pods, {desired} wanted; {counts}"
    if desired == 0:
        return False, "ScaledToZero", zero_why
    if engines.unscheduled:  # waits for a node (one added, or GPUs freed)
        return True, "Unschedulable", f"{counts}; no node for an engine pod yet: {engines.unscheduled}"
    if engines.ready == 0:
        return True, "EnginesStarting", f"{counts} (loading the model)"
    if engines.ready < desired:
        return True, "ScalingUp", counts
    return False, "RolloutComplete", counts


def cache_failure(state: CacheState) -> tuple[str, str] | None:
    """The ModelDeployment's failure (Degraded reason, message) for a cache that cannot become Ready by itself."""
    if state.phase == "Failed":
        reason = {"CacheSizeUnknown": "CacheSizeUnknown", "ClaimRejected": "CacheClaimFailed"}.get(
            state.reason, "CacheDownloadFailed")
        return reason, f"model cache: {state.reason}: {state.message}"
    if state.reason in CLAIM_PROBLEMS:
        return "CacheClaimFailed", f"model cache: {state.reason}: {state.message}"
    return None


def capacity_warning(sel: Selection, replicas: int, schedulable: int | None) -> str | None:
    """A message when the nodes that fit the profile cannot hold every replica at once; None when they can
    (or the engine requests no GPUs)."""
    if schedulable is None or replicas <= schedulable:
        return None
    return (f"spec.replicas {replicas} x {sel.gpu_count} GPU(s) = {replicas * sel.gpu_count} GPUs requested; "
            f"the schedulable nodes that fit {sel.profile.name} hold {schedulable} replica(s) "
            f"({schedulable * sel.gpu_count} GPUs)")


def build_status(owner: Owner, spec: ModelSpec, outcome: Selection | NoFit, *, table: ProfileTable,
                 deployment: dict | None, image: str | None, args: list[str] | None, previous: dict, now: str,
                 pods: list[dict] = (), rejected: str | None = None, schedulable: int | None = None,
                 cache: tuple[CacheKey, CacheState, str | None] | None = None) -> dict:
    """The whole status for this reconcile; written only when it differs from `previous`.
    `rejected` is the API server's answer to the Deployment, `schedulable` the replicas the fitting nodes hold,
    `cache` the managed cache's key, state and claim size (engines start only once it is Ready)."""
    gen, before = owner.generation, previous.get("conditions") or []
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(owner).items())
    engines = engine_state(deployment, list(pods))
    if isinstance(outcome, NoFit):
        phase = "Failed" if outcome.permanent else "Pending"
        status = {**{k: previous[k] for k in ("profile", "mode", "gpu", "limits", "endpoint", "image", "engineArgs")
                     if k in previous and deployment is not None},
                  **({"cache": previous["cache"]} if "cache" in previous else {}),
                  "phase": phase, "fit": outcome.fit.as_status() if outcome.fit else None}
        ready = engines.ready
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
        desired, ready = spec.replicas, engines.ready
        failure = ("DeploymentRejected", f"the API server rejected the engine Deployment: {rejected}") if rejected \
            else engines.failure
        warning = capacity_warning(sel, desired, schedulable)
        progressing, progress_reason, progress_message = _progress(engines, desired, zero_message(spec))
        if desired == 0:
            phase = "ScaledToZero"
        elif rejected or (failure and not ready):
            phase = "Failed"
        elif not ready:
            phase = "Pending" if engines.unscheduled else "Starting"
        elif ready < desired or progressing:
            phase = "PartiallyReady"
        else:
            phase = "Ready"
        how = "forced by spec.profile" if sel.forced else f"auto for mode {spec.mode}"
        gpu_text = f"{sel.gpu_count}x {sel.node.product} ({sel.node.memory_mib} MiB)"
        notes = "".join(f"; {n}" for n in (*sel.notes, *([f"warning: {warning}"] if warning else [])))
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
            available = (False, "ScaledToZero", zero_message(spec))
        elif ready:
            available = (True, "MinimumReplicasAvailable", f"{ready}/{desired} engine replicas ready")
        elif failure:
            available = (False, failure[0], failure[1])
        elif engines.unscheduled:
            available = (False, "Unschedulable", f"0/{desired} engine replicas ready; no node for an engine pod yet: "
                         f"{engines.unscheduled}")
        else:
            available = (False, "EnginesStarting", f"0/{desired} engine replicas ready (loading the model)")
        if warning and not failure and ready < desired:
            failure = ("InsufficientGPUs", warning)
        if warning and progressing:
            progress_message += f"; warning: {warning}"
        cache_condition = None
        if cache is not None:
            key, state, size = cache
            status["cache"] = cache_status(key, state, size)
            cache_condition = _condition("CacheReady", state.ready, state.reason, state.message, gen, before, now)
            if not state.ready:
                trouble = cache_failure(state)
                if not ready and desired:
                    status["phase"] = "Failed" if state.phase == "Failed" else "Pending"
                    available = (False, trouble[0] if trouble else "CacheNotReady", state.message)
                waiting = state.phase != "Failed"
                progressing = waiting
                progress_reason = ("CacheDownloading" if state.phase == "Downloading" else "CachePending") if waiting \
                    else trouble[0]
                progress_message = state.message
                failure = failure or trouble
        conditions = [
            _condition("ProfileSelected", True, "Forced" if sel.forced else "AutoSelected",
                       f"{sel.profile.name} ({how}) on {gpu_text}{notes}", gen, before, now),
            _condition("Available", *available, gen, before, now),
            _condition("Progressing", progressing, progress_reason, progress_message, gen, before, now),
            _condition("Degraded", failure is not None, failure[0] if failure else "AsExpected",
                       failure[1] if failure else "", gen, before, now),
        ] + ([cache_condition] if cache_condition else [])
    status.update({"observedGeneration": gen, "replicas": engines.replicas, "readyReplicas": engines.ready,
                   "ready": f"{engines.ready}/{spec.replicas}", "selector": selector, "conditions": conditions})
    return {k: v for k, v in status.items() if v is not None}


def build_failed_status(owner: Owner, previous: dict, reason: str, message: str, *, now: str,
                        engines_removed: bool = False) -> dict:
    """Failed before any decision (a spec the schema should have refused, a name owned by someone else):
    the rest of the previous status stays as it was, but what described removed engines."""
    gen, before = owner.generation, previous.get("conditions") or []
    gone = ("endpoint", "limits", "replicas", "readyReplicas", "ready", "nameClaim") if engines_removed else ()
    kept = {k: v for k, v in previous.items() if k not in gone}
    return {**kept, "phase": "Failed", "observedGeneration": gen, "conditions": [
        _condition("ProfileSelected", False, reason, message, gen, before, now),
        _condition("Available", False, reason, message, gen, before, now),
        _condition("Progressing", False, reason, message, gen, before, now),
        _condition("Degraded", True, reason, message, gen, before, now)]}


def failure_of(status: dict) -> tuple[str, str] | None:
    """(reason, message) of the failure a status shows (Degraded with a failure reason), else None."""
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Degraded"), None)
    if cond and cond.get("status") == "True" and cond.get("reason") in FAILURE_REASONS:
        return cond["reason"], cond.get("message", "")
    return None
