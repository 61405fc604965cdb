"""Status (pure): what the engines, the cache and the decision say → the ModelDeployment's status and conditions."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cxygpt_profiles import NoFit, ProfileTable, Selection

from .cache import CacheKey, CacheState, cache_status
from .manifests import Owner, selector_labels
from .resolve import ModelSpec


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int, previous: list[dict],
               now: str) -> dict:
    status = "True" if ok else "False"
    before = next((c for c in previous if c.get("type") == type_), None)
    # lastTransitionTime moves only when the status flips (Kubernetes API conventions)
    since = before["lastTransitionTime"] if before and before.get("status") == status and \
        before.get("lastTransitionTime") else now
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since}


# What an engine prints when it exits for a cause no restart fixes: (Degraded reason, what it means, what it prints:
# vLLM 0.33's own words, those of huggingface_hub that it passes on, and the simulator's). Gated before not found:
# vLLM wraps a gated repository's error in its "Invalid repository ID" one.
PERMANENT_EXITS = (
    ("ModelAccessDenied", "the repository is gated or private, and the engine has no token that may read it "
     "(spec.engine.env HF_TOKEN from a Secret, or spec.model.cache.tokenSecretRef)",
     ("GatedRepoError", "Cannot access gated repo", "Access to model", "Invalid credentials in Authorization header")),
    ("ModelNotFound", "the model's repository or revision does not exist (spec.model.source)",
     ("RepositoryNotFoundError", "Repository Not Found", "RevisionNotFoundError", "Revision Not Found",
      "Invalid rev id", "Invalid repository ID or local directory specified",
      "is not a local folder and is not a valid model identifier")),
    ("ModelDoesNotFit", "the weights and the KV cache do not fit the GPUs (spec.engine.args, or a larger profile)",
     ("CUDA out of memory", "OutOfMemoryError", "No available memory for the cache blocks",
      "KV cache is needed, which is larger than the available KV cache memory",
      "is larger than the maximum number of tokens that can be stored in KV cache",
      "cannot hold one sequence of max-model-len")),
    ("EngineArgumentRefused", "the engine refuses an argument (spec.engine.args)",
     ("error: unrecognized arguments", "error: argument ", "error: the following arguments are required",
      "invalid choice:", "validation error for", "User-specified max_model_len")),
)
QUOTED_LINE_CHARS = 300

# Degraded reasons that are failures (an Event and a metric each time one appears)
FAILURE_REASONS = ("EngineCrashLoop", "EngineCannotStart", "DeploymentRejected", "ModelNameConflict",
                   "InsufficientGPUs", "InsufficientGPUMemory", "InvalidSpec", "ResourceConflict", "EngineFailure",
                   "UnknownProfile", "MissingWeightVariant", "NoProfileForMode",
                   "CacheDownloadFailed", "CacheClaimFailed", "CacheSizeUnknown",
                   *(reason for reason, _, _ in PERMANENT_EXITS))
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


def exit_cause(terminated: dict) -> tuple[str, str] | None:
    """(reason, message) when an engine's exit says no restart can fix it (its terminated state's message: the last
    lines of its log), else None."""
    if not terminated.get("exitCode"):
        return None
    lines = [line.strip() for line in (terminated.get("message") or "").splitlines() if line.strip()]
    for reason, meaning, marks in PERMANENT_EXITS:
        line = next((line for line in reversed(lines) if any(mark in line for mark in marks)), None)
        if line is not None:
            quoted = line if len(line) <= QUOTED_LINE_CHARS else line[:QUOTED_LINE_CHARS] + "..."
            return reason, f"{meaning}: {quoted}"
    return None


def pod_failure(pod: dict) -> tuple[str, str] | None:
    """(reason, message) when the pod's engine exited for a cause no restart fixes (at its first exit), crash-loops
    or cannot start; None while it runs or loads."""
    status = pod.get("status") or {}
    engine = next((c for c in status.get("containerStatuses") or [] if c.get("name") == "engine"), None)
    if engine is None:
        return None
    name = pod.get("metadata", {}).get("name", "")
    waiting = (engine.get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in CANNOT_START:
        return "EngineCannotStart", f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    for state in (engine.get("state"), engine.get("lastState")):
        terminated = (state or {}).get("terminated") or {}
        cause = exit_cause(terminated)
        if cause:
            return cause[0], (f"pod {name}: the engine exited with code {terminated['exitCode']} "
                              f"({engine.get('restartCount', 0)} restarts): {cause[1]}")
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
        unscheduled = cond.get("status") == "False" and cond.get("reason") == "Unschedulable"
        if cond.get("type") == "PodScheduled" and unscheduled:
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
                 pods: Sequence[dict] = (), rejected: str | None = None, schedulable: int | None = None,
                 cache: tuple[CacheKey, CacheState, str | None] | None = None, cache_note: str | None = None) -> dict:
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
                  "phase": phase, "fit": outcome.fit.as_status() if outcome.fit else None,
                  "sizing": outcome.sizing.as_status() if outcome.sizing else None}
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
        gpu_text = f"{sel.gpu_count}x {sel.node.product} ({sel.node.memory_mib} MiB) of node {sel.node.name}"
        notes = "".join(f"; {n}" for n in (*sel.notes, *([f"warning: {warning}"] if warning else [])))
        status = {
            "phase": phase,
            "mode": sel.mode,
            "profile": sel.profile.name,
            "image": image,
            "engineArgs": args,
            "gpu": {"product": sel.node.product, "memoryMiB": sel.node.memory_mib, "count": sel.gpu_count,
                    "resource": sel.node.resource, "node": sel.node.name,
                    "summary": f"{sel.gpu_count}x{sel.node.memory_mib // 1024}GiB"},
            "limits": sel.limits.model_dump(by_alias=True),
            "fit": sel.fit.as_status() if sel.fit else None,
            "sizing": sel.sizing.as_status(),
            "predicted": sel.prediction.as_status() if sel.prediction else None,
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
            status["cache"] = {**cache_status(key, state, size), **({"note": cache_note} if cache_note else {})}
            cache_condition = _condition("CacheReady", state.ready, state.reason,
                                         state.message + (f"; {cache_note}" if cache_note else ""), gen, before, now)
            if not state.ready:
                trouble = cache_failure(state)
                if not ready and desired:
                    status["phase"] = "Failed" if state.phase == "Failed" else "Pending"
                    available = (False, trouble[0] if trouble else "CacheNotReady", state.message)
                waiting = state.phase != "Failed"
                progressing = waiting
                if waiting:
                    progress_reason = "CacheDownloading" if state.phase == "Downloading" else "CachePending"
                else:
                    progress_reason = trouble[0] if trouble else "CacheDownloadFailed"
                progress_message = state.message
                failure = failure or trouble
        conditions = [
            _condition("ProfileSelected", True, "Forced" if sel.forced else "AutoSelected",
                       f"{sel.profile.name} ({how}) on {gpu_text}: {sel.sizing.reason}{notes}", gen, before, now),
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
