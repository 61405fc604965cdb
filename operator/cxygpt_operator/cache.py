"""The model cache (pure): one PersistentVolumeClaim per (source, revision), its download Job, and its state."""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cxygpt_profiles.table import CacheConstants

from . import GROUP, KIND, MANAGER, VERSION

CACHE_LABEL = f"{GROUP}/cache"                # on the claim, its Job and the Job's pods: the claim's name
SOURCE_ANNOTATION = f"{GROUP}/source"         # hf://Org/Name
REVISION_ANNOTATION = f"{GROUP}/revision"     # as requested: a branch, a tag or a commit
USERS_ANNOTATION = f"{GROUP}/users"           # the ModelDeployments that use it, comma-separated
RETAIN_ANNOTATION = f"{GROUP}/retain"         # "true": kept when its last user goes (it has no owners then)
STATE_ANNOTATION = f"{GROUP}/cache-state"     # written once the download was verified: revision, bytes, files
CLAIM_UID_ANNOTATION = f"{GROUP}/claim-uid"   # on a Job: the uid of the claim it fills (a claim made again is another)
MADE_FOR_ANNOTATION = f"{GROUP}/made-for"     # on a claim: the model whose spec.model.cache it was made with
DEFAULT_REVISION = "main"                     # the Hub's default branch
ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany")
JOB_MOUNT = "/cache"
TERMINATION_LOG = "/dev/termination-log"
LOADER = "cxygpt-cache-load"
CONTAINER = "download"
PERMANENT_EXIT = 2        # the loader's exit code for what no retry can fix (no such repository, ...)
LOADER_UID = 10001        # the operator image's user, which runs the loader
MIB, GIB = 2**20, 2**30
MAX_CACHE_BYTES = 2**50   # 1 PiB: no model's weights come near it
PHASES = ("Pending", "Downloading", "Ready", "Failed")
# waiting reasons of a download container that will not start however long it waits
CANNOT_START = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                "CreateContainerError")
HF_SOURCE = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)"
                       r"(@(?P<revision>[A-Za-z0-9][A-Za-z0-9._-]*))?$")
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(\.[0-9]+)?)(?P<unit>Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


@dataclass(frozen=True)
class CacheSpec:
    """spec.model.cache, with the CRD's defaults."""
    enabled: bool = False
    storage_class: str | None = None   # None: the cluster's default StorageClass
    size: str | None = None            # None: from the weight estimate
    access_mode: str = "ReadWriteOnce"
    retain: bool = False
    token_secret: str | None = None
    token_key: str = "token"


def parse_cache(raw: dict | None) -> CacheSpec:
    """spec.model.cache → CacheSpec; ValueError names a field the schema should have refused."""
    raw = raw or {}
    mode = raw.get("accessMode") or "ReadWriteOnce"
    if mode not in ACCESS_MODES:
        raise ValueError(f"spec.model.cache.accessMode must be one of {', '.join(ACCESS_MODES)}, not {mode!r}")
    size = raw.get("size")
    if size is not None and quantity_bytes(str(size)) is None:
        raise ValueError(f"spec.model.cache.size {str(size)[:40]!r} is not a storage quantity of at most 1Pi "
                         "(e.g. 40Gi)")
    token = raw.get("tokenSecretRef") or {}
    if token.get("name") and not _SECRET_NAME.match(str(token["name"])):
        raise ValueError(f"spec.model.cache.tokenSecretRef.name {str(token['name'])[:40]!r} is not a Secret's name in "
                         "this namespace (a lower case DNS subdomain, no namespace/ prefix)")
    return CacheSpec(enabled=raw.get("enabled") is True, storage_class=raw.get("storageClassName") or None,
                     size=str(size) if size is not None else None, access_mode=mode, retain=raw.get("retain") is True,
                     token_secret=token.get("name") or None, token_key=token.get("key") or "token")


def quantity_bytes(text: str) -> int | None:
    """A Kubernetes storage quantity (40Gi, 500M, 1.5Ti) in bytes; None when it is not one, not positive, or beyond
    any volume (past MAX_CACHE_BYTES: a size that would overflow the Job's deadline)."""
    match = _QUANTITY.match(text.strip())
    if not match or len(match["number"]) > 24:
        return None
    value = int(float(match["number"]) * _UNITS[match["unit"]])
    return value if 0 < value <= MAX_CACHE_BYTES else None


def hf_source(uri: str) -> tuple[str, str | None] | None:
    """hf://Org/Name[@revision] → (Org/Name, revision or None); None for another scheme."""
    match = HF_SOURCE.match(uri)
    return (match["repo"], match["revision"]) if match else None


@dataclass(frozen=True)
class CacheKey:
    """What a cache holds: one repository at one requested revision (in one namespace)."""
    repo: str
    revision: str

    @property
    def source(self) -> str:
        return f"hf://{self.repo}"

    @property
    def claim(self) -> str:
        """Deterministic, a DNS label of at most 63 characters (it names the Job too, whose pods' job-name label
        must fit in a label value): the repository's name for people, a digest of repository and revision."""
        digest = hashlib.sha256(f"{self.repo}@{self.revision}".encode()).hexdigest()[:10]
        slug = re.sub(r"[^a-z0-9]+", "-", self.repo.split("/")[-1].lower()).strip("-")[:30].strip("-") or "model"
        return f"cxygpt-cache-{slug}-{digest}"

    @property
    def describe(self) -> str:
        return f"{self.repo}@{self.revision}"


def cache_key(uri: str) -> CacheKey | None:
    """The cache of an hf:// source (the Hub's default branch when it names no revision); None for pvc://."""
    found = hf_source(uri)
    return CacheKey(found[0], found[1] or DEFAULT_REVISION) if found else None


def default_size(weights_mib: int | None, consts: CacheConstants) -> str | None:
    """The weight estimate plus the table's margin, in whole GiB; None without an estimate."""
    if not weights_mib:
        return None
    mib = weights_mib * (1 + consts.size_margin) + consts.size_extra_mib
    return f"{math.ceil(mib / 1024)}Gi"


def download_deadline_s(size: str, consts: CacheConstants) -> int:
    """The Job's activeDeadlineSeconds: the base plus the whole claim at a slow link's rate."""
    size_bytes = quantity_bytes(size) or 0
    return consts.download_deadline_base_s + math.ceil(size_bytes / MIB / consts.download_min_mib_per_s)


@dataclass(frozen=True, order=True)
class CacheUser:
    """A ModelDeployment that uses a cache."""
    name: str
    uid: str
    retain: bool = False


def owner_references(users: list[CacheUser]) -> list[dict]:
    """Every user owns the cache, none as its controller: Kubernetes' garbage collector deletes it (and its Job)
    once the last owner is gone. A user that asks to retain it leaves it with no owners at all, so no deletion
    ever takes it (it is then deleted by hand)."""
    if any(u.retain for u in users):
        return []
    return [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": u.name, "uid": u.uid}
            for u in sorted(set(users))]


def _labels(key: CacheKey) -> dict[str, str]:
    return {"app.kubernetes.io/name": "cxygpt-model-cache", "app.kubernetes.io/component": "model-cache",
            "app.kubernetes.io/part-of": "cxygpt", "app.kubernetes.io/managed-by": MANAGER, CACHE_LABEL: key.claim}


def claim_metadata(key: CacheKey, users: list[CacheUser]) -> dict:
    """The metadata the operator keeps up to date on a cache's claim and Job (their specs never change)."""
    annotations: dict[str, str | None] = {SOURCE_ANNOTATION: key.source, REVISION_ANNOTATION: key.revision,
                   USERS_ANNOTATION: ",".join(sorted({u.name for u in users}))}
    annotations[RETAIN_ANNOTATION] = "true" if any(u.retain for u in users) else None
    return {"labels": _labels(key), "annotations": annotations, "ownerReferences": owner_references(users)}


def _present(metadata: dict) -> dict:
    """Metadata as it is sent on create (a None annotation is a merge patch's removal)."""
    return {**metadata, "annotations": {k: v for k, v in metadata["annotations"].items() if v is not None}}


def build_claim(key: CacheKey, namespace: str, cache: CacheSpec, size: str, users: list[CacheUser],
                made_for: str) -> dict:
    """The claim, with the settings of `made_for`'s spec.model.cache (the model that needed it first)."""
    spec: dict = {"accessModes": [cache.access_mode], "volumeMode": "Filesystem",
                  "resources": {"requests": {"storage": size}}}
    if cache.storage_class:
        spec["storageClassName"] = cache.storage_class
    metadata = _present(claim_metadata(key, users))
    metadata["annotations"][MADE_FOR_ANNOTATION] = made_for
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": key.claim, "namespace": namespace, **metadata}, "spec": spec}


def claim_size(pvc: dict) -> str:
    """The storage a claim requests (the API server requires it)."""
    return str(pvc["spec"]["resources"]["requests"]["storage"])


def claim_differences(pvc: dict, cache: CacheSpec) -> list[str]:
    """What spec.model.cache asks that the claim was not made with: its StorageClass (when the spec names one: a
    claim made without one has the default's), its access mode, its size (when the spec sets one)."""
    spec = pvc.get("spec") or {}
    differences = []
    have_class = spec.get("storageClassName")
    if cache.storage_class and have_class != cache.storage_class:
        differences.append(f"storageClassName {have_class or '(none)'}, not {cache.storage_class}")
    have_mode = (spec.get("accessModes") or [""])[0]
    if have_mode != cache.access_mode:
        differences.append(f"accessMode {have_mode or '(none)'}, not {cache.access_mode}")
    have_size = ((spec.get("resources") or {}).get("requests") or {}).get("storage") or ""
    if cache.size and quantity_bytes(str(have_size)) != quantity_bytes(cache.size):
        differences.append(f"size {have_size or '(none)'}, not {cache.size}")
    return differences


def metadata_differs(obj: dict, desired: dict) -> bool:
    """Whether the users, retention or owners recorded on a claim or Job are not the desired ones."""
    md = obj.get("metadata") or {}
    have = md.get("annotations") or {}
    if any(have.get(k) != v for k, v in desired["annotations"].items()):
        return True
    def refs(items: list[dict] | None) -> list[tuple[str, str]]:
        return sorted((r.get("uid") or "", r.get("name") or "") for r in items or [])
    return refs(md.get("ownerReferences")) != refs(desired["ownerReferences"])


def weights_path(key: CacheKey, root: str) -> str:
    """Where the repository's files are in a claim mounted at `root`: <root>/<Org>/<Name>."""
    return f"{root}/{key.repo}"


def build_job(key: CacheKey, namespace: str, cache: CacheSpec, size: str, users: list[CacheUser], *, image: str,
              affinity: dict, tolerations: list[dict], consts: CacheConstants, hf_endpoint: str | None,
              claim_uid: str, node_selector: dict[str, str] | None = None) -> dict:
    """The download: huggingface_hub's snapshot_download into the claim (the loader), verified, retried with
    resume. It runs where the engines will (their node affinity, no GPU requested), so a zonal or node-local
    volume is provisioned where the engines can mount it."""
    metadata = _present(claim_metadata(key, users))
    metadata["annotations"][CLAIM_UID_ANNOTATION] = claim_uid  # what it fills: this claim, not one of its name
    return download_job(key, name=key.claim, namespace=namespace, claim=key.claim, into=JOB_MOUNT, cache=cache,
                        metadata=metadata, pod_labels=_labels(key), image=image, affinity=affinity,
                        tolerations=tolerations, node_selector=node_selector, hf_endpoint=hf_endpoint,
                        deadline_s=download_deadline_s(size, consts), retries=consts.download_retries)


def download_job(key: CacheKey, *, name: str, namespace: str, claim: str, into: str, cache: CacheSpec, metadata: dict,
                 pod_labels: dict[str, str], image: str, affinity: dict, tolerations: list[dict],
                 node_selector: dict[str, str] | None, hf_endpoint: str | None, deadline_s: int, retries: int) -> dict:
    """A Job that downloads `key` with the loader into `into` (a directory of `claim`, mounted at JOB_MOUNT): its
    files go to <into>/<Org>/<Name>."""
    env: list[dict] = [{"name": "HF_HOME", "value": f"{JOB_MOUNT}/.hf-home"},  # the root filesystem is read-only
           {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
           {"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"},  # the loader prints its own progress lines
           # the HTTP download path: partial files resume with Range requests and progress is bytes on disk
           {"name": "HF_HUB_DISABLE_XET", "value": "1"}]
    if hf_endpoint:
        env.append({"name": "HF_ENDPOINT", "value": hf_endpoint})
    if cache.token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": cache.token_secret,
                                                                       "key": cache.token_key}}})
    container = {
        "name": CONTAINER, "image": image, "command": [LOADER],
        "args": ["--repo", key.repo, "--revision", key.revision, "--dir", into,
                 "--termination-log", TERMINATION_LOG],
        "env": sorted(env, key=lambda e: e["name"]),
        "volumeMounts": [{"name": "cache", "mountPath": JOB_MOUNT}],
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "runAsNonRoot": True, "readOnlyRootFilesystem": True},
        # the loader writes its result (revision, bytes, files) or its failure (reason, message) here
        "terminationMessagePath": TERMINATION_LOG, "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec = {
        "restartPolicy": "Never", "containers": [container],
        "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": claim}}],
        "automountServiceAccountToken": False,  # the loader never calls the Kubernetes API
        "securityContext": {"runAsUser": LOADER_UID, "runAsGroup": LOADER_UID, "fsGroup": LOADER_UID,
                            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}},
        "affinity": affinity, "tolerations": tolerations, **({"nodeSelector": node_selector} if node_selector else {}),
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "spec": {
            "backoffLimit": retries,
            "activeDeadlineSeconds": deadline_s,
            # what no retry can fix (no such repository or revision, no access) fails the Job at once
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                "containerName": CONTAINER, "operator": "In", "values": [PERMANENT_EXIT]}}]},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


# --- state ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheState:
    phase: str           # Pending | Downloading | Ready | Failed
    reason: str
    message: str
    revision: str | None = None       # the commit the download resolved the requested revision to
    bytes_done: int | None = None
    bytes_total: int | None = None
    files: int | None = None

    @property
    def ready(self) -> bool:
        return self.phase == "Ready"


def fills(job: dict | None, pvc: dict | None) -> bool:
    """Whether `job` downloads into this very claim (not an earlier claim of the same name, deleted and made again):
    the claim's uid it records; a Job from before that record counts when it is not older than the claim."""
    if job is None or pvc is None:
        return False
    job_md, pvc_md = job.get("metadata") or {}, pvc.get("metadata") or {}
    uid = (job_md.get("annotations") or {}).get(CLAIM_UID_ANNOTATION)
    if uid is not None:
        return bool(uid == pvc_md.get("uid"))
    return (job_md.get("creationTimestamp") or "") >= (pvc_md.get("creationTimestamp") or "")


def recorded(pvc: dict | None) -> dict | None:
    """The verified download the claim records (STATE_ANNOTATION), or None."""
    raw = ((pvc or {}).get("metadata", {}).get("annotations") or {}).get(STATE_ANNOTATION)
    try:
        state = json.loads(raw) if raw else None
    except ValueError:
        return None
    return state if isinstance(state, dict) and state.get("phase") == "Ready" else None


def record(result: dict) -> str:
    """STATE_ANNOTATION's value for a verified download."""
    keep = {k: result[k] for k in ("revision", "bytes", "files") if k in result}
    return json.dumps({"phase": "Ready", **keep}, sort_keys=True, separators=(",", ":"))


def _json(text: str | None, accept: Callable[[dict], bool] = lambda value: True) -> dict | None:
    """The last line of `text` that is a JSON object `accept` takes."""
    for line in reversed((text or "").strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and accept(value):
            return value
    return None


def progress_from_log(text: str | None) -> dict | None:
    """The last progress line the loader printed ({"event": "progress", "bytesDone", "bytesTotal", ...})."""
    return _json(text, lambda value: value.get("event") == "progress")


def _terminated(pod: dict) -> dict | None:
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        if c.get("name") == CONTAINER:
            return (c.get("state") or {}).get("terminated") or (c.get("lastState") or {}).get("terminated")
    return None


def waiting_state(pod: dict) -> dict:
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        if c.get("name") == CONTAINER:
            return (c.get("state") or {}).get("waiting") or {}
    return {}


def true_condition(obj: dict, type_: str) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c.get("type") == type_ and c.get("status") == "True"), None)


def _by_age(pods: list[dict]) -> list[dict]:
    return sorted(pods, key=lambda p: (p.get("metadata", {}).get("creationTimestamp") or "",
                                       p.get("metadata", {}).get("name") or ""))


def job_result(pods: list[dict]) -> dict | None:
    """What the succeeded download pod wrote to its termination log: revision, bytes, files."""
    for pod in reversed(_by_age(pods)):
        if (pod.get("status") or {}).get("phase") == "Succeeded":
            return _json((_terminated(pod) or {}).get("message")) or {}
    return None


def failed_attempt(pods: list[dict]) -> tuple[str, str]:
    """The newest failed attempt's reason and message, from the loader's termination log."""
    for pod in reversed(_by_age(pods)):
        terminated = _terminated(pod)
        if terminated and terminated.get("exitCode", 0) != 0:
            found = _json(terminated.get("message")) or {}
            last = (terminated.get("message") or "").strip().splitlines()[-1:] or [""]
            return (found.get("reason") or terminated.get("reason") or "Error",
                    found.get("message") or f"exit code {terminated.get('exitCode')}: {last[0]}".rstrip(": "))
    return "Error", "no attempt left a message"


def gib(n: int | None) -> str:
    return f"{(n or 0) / GIB:.2f} GiB"


def cache_state(key: CacheKey, pvc: dict | None, job: dict | None, pods: list[dict], *,
                storage_problem: tuple[str, str] | None = None, claim_events: Sequence[dict] = (),
                progress: dict | None = None) -> CacheState:
    """The cache's phase from its claim, Job and the Job's pods: Ready once verified, Failed when only a change
    (a fixed spec, a Secret, a deleted Job to retry) helps, Pending while waiting for a volume or a node,
    Downloading with the bytes on disk."""
    done = recorded(pvc)
    if done:
        return CacheState("Ready", "Downloaded", f"{key.describe} downloaded and verified: {gib(done.get('bytes'))} "
                          f"in {done.get('files', '?')} files", done.get("revision"), done.get("bytes"),
                          done.get("bytes"), done.get("files"))
    if pvc is None:
        return CacheState("Pending", "CreatingClaim", f"creating the claim {key.claim}")
    if (pvc.get("metadata") or {}).get("deletionTimestamp"):
        return CacheState("Pending", "ClaimDeleting", f"claim {key.claim} is being deleted (its engines still mount "
                          "it); a new one is made and filled once it is gone")
    if job is not None and not fills(job, pvc):
        return CacheState("Pending", "ReplacingJob", f"claim {key.claim} was made again: the download Job of the "
                          "claim before it is replaced, to fill this one")
    job = job or {}
    if true_condition(job, "Complete"):
        result = job_result(pods) or {}
        return CacheState("Ready", "Downloaded", f"{key.describe} downloaded and verified: "
                          f"{gib(result.get('bytes'))} in {result.get('files', '?')} files",
                          result.get("revision"), result.get("bytes"), result.get("bytes"), result.get("files"))
    failed = true_condition(job, "Failed")
    if failed:
        reason, message = failed_attempt(pods)
        attempts = (job.get("status") or {}).get("failed") or 0
        return CacheState("Failed", reason, f"the download Job {key.claim} failed ({failed.get('reason', 'Failed')}"
                          f" after {attempts} attempt{'s' * (attempts != 1)}): {message}; delete the Job to retry")
    bound = (pvc.get("status") or {}).get("phase") == "Bound"
    if not bound:
        if storage_problem:
            return CacheState("Pending", *storage_problem)
        warning = next((e for e in sorted(claim_events, key=lambda e: e.get("lastTimestamp") or "", reverse=True)
                        if e.get("type") == "Warning"), None)
        if warning:
            return CacheState("Pending", warning.get("reason") or "ProvisioningFailed",
                              f"claim {key.claim} is Pending: {warning.get('message', '')}")
    live = [p for p in _by_age(pods) if not p.get("metadata", {}).get("deletionTimestamp")
            and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
    pod = live[-1] if live else None
    if pod is not None:
        waiting = waiting_state(pod)
        name = pod["metadata"].get("name", "")
        if waiting.get("reason") in CANNOT_START:
            return CacheState("Failed", "DownloadCannotStart",
                              f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": "))
        if (pod.get("status") or {}).get("phase") == "Running":
            progress = progress or {}
            done_bytes, total = progress.get("bytesDone"), progress.get("bytesTotal")
            of = f"{gib(done_bytes)} of {gib(total)}" if total else "starting"
            return CacheState("Downloading", "Downloading", f"downloading {key.describe} into {key.claim}: {of}",
                              progress.get("revision"), done_bytes, total, progress.get("filesTotal"))
        unscheduled = next((c for c in (pod.get("status") or {}).get("conditions") or []
                            if c.get("type") == "PodScheduled" and c.get("status") == "False"), None)
        if unscheduled:
            return CacheState("Pending", "DownloadUnschedulable",
                              f"pod {name} is not scheduled: {unscheduled.get('message') or unscheduled.get('reason')}")
    if not bound:
        return CacheState("Pending", "WaitingForVolume", f"claim {key.claim} is Pending: waiting for its volume (a "
                          "WaitForFirstConsumer class binds it when the download pod is scheduled)")
    retries = (job.get("status") or {}).get("failed") or 0
    return CacheState("Pending", "DownloadStarting", f"starting the download of {key.describe}"
                      + (f" (attempt {retries + 1}, resuming)" if retries else ""))


def cache_status(key: CacheKey, state: CacheState, size: str | None) -> dict:
    """status.cache of a ModelDeployment."""
    status = {"phase": state.phase, "claimName": key.claim, "source": key.source, "requestedRevision": key.revision,
              "revision": state.revision, "size": size, "bytesDone": state.bytes_done,
              "bytesTotal": state.bytes_total, "files": state.files, "reason": state.reason, "message": state.message}
    return {k: v for k, v in status.items() if v is not None}
