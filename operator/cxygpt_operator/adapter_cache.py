"""The adapters' cache (pure): a claim per ModelDeployment its engines mount, and one download Job per adapter
revision into it, so Hub adapters load offline and at a pinned revision."""
from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from . import GROUP, KIND, MANAGER, VERSION
from .cache import (
    CANNOT_START,
    JOB_MOUNT,
    REVISION_ANNOTATION,
    SOURCE_ANNOTATION,
    CacheKey,
    CacheSpec,
    download_job,
    failed_attempt,
    true_condition,
    waiting_state,
)

ADAPTER_CACHE_MOUNT = "/models/adapter-cache"   # where the engines mount it, read-only
ADAPTER_CACHE_VOLUME = "adapter-cache"          # the engine pod's volume: its claim is the cache (the loop reads it)
ADAPTER_CACHE_LABEL = f"{GROUP}/adapter-cache"  # on the claim, its Jobs and their pods: the claim's name
DOWNLOAD_LABEL = f"{GROUP}/adapter-download"    # on a Job's pods: the Job's name
COMPONENT = "adapter-cache"


@dataclass(frozen=True)
class Loader:
    """How the adapter cache is made and filled: the loader's image, the Hub mirror, the claim's size, the Jobs'
    deadline and retries."""
    image: str
    hf_endpoint: str | None
    size: str
    deadline_s: int
    retries: int


def mounted_claim(template_spec: dict) -> str | None:
    """The adapter cache the engines' pod template mounts (manifests mounts it when the model uses the cache)."""
    return next((v["persistentVolumeClaim"]["claimName"] for v in template_spec.get("volumes") or []
                 if v.get("name") == ADAPTER_CACHE_VOLUME and v.get("persistentVolumeClaim")), None)


def _slug(text: str, length: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].strip("-") or "x"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def claim_name(model: str, uid: str) -> str:
    """The model's adapter cache: a DNS label of at most 63 characters, another for a model made again (its uid)."""
    return f"cxygpt-adapters-{_slug(model, 30)}-{_digest(uid)}"


def job_name(claim: str, key: CacheKey) -> str:
    """One adapter revision's download into `claim` (it names the directory its files go to as well)."""
    return f"cxygpt-adapter-{_slug(key.repo.split('/')[-1], 30)}-{_digest(f'{claim}/{key.describe}')}"


def files_dir(claim: str, key: CacheKey, root: str = ADAPTER_CACHE_MOUNT) -> str:
    """Where the adapter's files are in the claim mounted at `root`: <root>/<job>/<Org>/<Name>."""
    return f"{root}/{job_name(claim, key)}/{key.repo}"


def _labels(claim: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "cxygpt-adapter-cache", "app.kubernetes.io/component": COMPONENT,
            "app.kubernetes.io/part-of": "cxygpt", "app.kubernetes.io/managed-by": MANAGER,
            ADAPTER_CACHE_LABEL: claim}


def _owned_by(model: str, uid: str) -> list[dict]:
    # the model is the claim's and the Jobs' only owner: the garbage collector deletes them with it
    return [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": model, "uid": uid, "controller": True}]


def build_claim(claim: str, namespace: str, model: str, uid: str, cache: CacheSpec, size: str) -> dict:
    """The claim, with spec.model.cache's StorageClass and access mode; its size from the profile table."""
    spec: dict = {"accessModes": [cache.access_mode], "volumeMode": "Filesystem",
                  "resources": {"requests": {"storage": size}}}
    if cache.storage_class:
        spec["storageClassName"] = cache.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace, "labels": _labels(claim),
                         "ownerReferences": _owned_by(model, uid)},
            "spec": spec}


def placement(template_spec: dict, engine_labels: dict[str, str]) -> tuple[dict, list[dict], dict[str, str]]:
    """(affinity, tolerations, nodeSelector) of a download pod: the engines' own, and preferably the node an engine
    runs on (a ReadWriteOnce claim is usable on one node at a time)."""
    affinity = {k: v for k, v in (template_spec.get("affinity") or {}).items() if k == "nodeAffinity"}
    affinity["podAffinity"] = {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100, "podAffinityTerm": {"labelSelector": {"matchLabels": dict(engine_labels)},
                                           "topologyKey": "kubernetes.io/hostname"}}]}
    return affinity, list(template_spec.get("tolerations") or []), dict(template_spec.get("nodeSelector") or {})


def build_job(key: CacheKey, claim: str, namespace: str, model: str, uid: str, cache: CacheSpec, loader: Loader, *,
              template_spec: dict, engine_labels: dict[str, str]) -> dict:
    """The download of one adapter revision into the claim, by the model cache's loader."""
    job = job_name(claim, key)
    affinity, tolerations, node_selector = placement(template_spec, engine_labels)
    metadata = {"labels": _labels(claim), "ownerReferences": _owned_by(model, uid),
                "annotations": {SOURCE_ANNOTATION: key.source, REVISION_ANNOTATION: key.revision}}
    return download_job(key, name=job, namespace=namespace, claim=claim, into=f"{JOB_MOUNT}/{job}", cache=cache,
                         metadata=metadata, pod_labels={**_labels(claim), DOWNLOAD_LABEL: job}, image=loader.image,
                         affinity=affinity, tolerations=tolerations, node_selector=node_selector or None,
                         hf_endpoint=loader.hf_endpoint, deadline_s=loader.deadline_s, retries=loader.retries)


@dataclass(frozen=True)
class Download:
    """An adapter revision's download as its Job and pods show it."""
    phase: str      # Downloading | Ready | Failed
    reason: str
    message: str


def download_state(key: CacheKey, job: dict | None, pods: Sequence[dict]) -> Download:
    """Ready once the Job completed (the loader verified every file), Failed when it failed or its pod cannot
    start (the loader's reason: no such repository or revision, gated, ...), Downloading otherwise."""
    name = (job or {}).get("metadata", {}).get("name", "")
    if job is None:
        return Download("Downloading", "Downloading", f"starting the download of {key.describe}")
    if true_condition(job, "Complete"):
        return Download("Ready", "Downloaded", f"{key.describe} downloaded and verified")
    if failed := true_condition(job, "Failed"):
        reason, message = failed_attempt(list(pods))
        return Download("Failed", reason, f"the download Job {name} failed ({failed.get('reason', 'Failed')}): "
                        f"{message}; delete the Job to retry")
    for pod in pods:
        waiting = waiting_state(pod)
        if waiting.get("reason") in CANNOT_START:
            return Download("Failed", "DownloadCannotStart", f"pod {pod['metadata'].get('name', '')}: "
                            f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": "))
    return Download("Downloading", "Downloading", f"downloading {key.describe} into the adapter cache (Job {name})")
