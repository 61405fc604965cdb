"""Volumes of the dev cluster: PersistentVolumeClaims provisioned as local directories (a StorageClass's
provisioner and the PV controller), and a pod's mounts mapped onto them (kubelet's part)."""
from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import aiohttp

from .watching import follow

log = logging.getLogger("cxygpt.pods")
PROVISIONER = "cxygpt.io/local-directory"
DEFAULT_CLASS = "standard"  # as kind names its local-path class
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
RETRY_S = 1.0
# the mount table a container's process is given (JSON, mount path → directory here): it shares this machine's root
# filesystem, so a path it is sent at runtime (an engine's adapter to load) is mapped by the simulator with it
MOUNTS_ENV = "CXYGPT_CONTAINER_MOUNTS"


def default_storage_class() -> dict:
    """The dev cluster's StorageClass: local directories, bound at once, deleted with their claim."""
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": DEFAULT_CLASS, "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
            "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}


class Unbound(Exception):
    """A pod names a claim whose volume is not there yet: it stays Pending (unschedulable), as in a cluster."""


def rewrite(value: str, mapping: dict[str, str]) -> str:
    """A path inside the container as the same path on this machine (the longest mount that contains it)."""
    for mount in sorted(mapping, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return mapping[mount] + value[len(mount.rstrip("/")):]
    return value


def rewrite_all(values, mapping: dict[str, str]) -> list[str]:
    """Arguments as kubelet cannot change them but this machine needs them: every container path made local
    (also inside `--flag=/path`)."""
    out = []
    for value in values:
        flag, eq, rest = value.partition("=")
        out.append(f"{flag}={rewrite(rest, mapping)}" if eq and flag.startswith("-") else rewrite(value, mapping))
    return out


class Volumes:
    """Claim directories under `root`/<namespace>/<claim>; a pod's emptyDirs under `root`/.pods/<namespace>/<pod>."""

    def __init__(self, root: Path, request):
        self.root = Path(root)
        self.request = request  # the pod runner's API call: (method, path, body=None, content_type=...)
        self.events_posted: set[tuple[str, str, str]] = set()

    def claim_dir(self, namespace: str, claim: str) -> Path:
        return self.root / namespace / claim

    def pod_dir(self, namespace: str, pod: str) -> Path:
        return self.root / ".pods" / namespace / pod

    async def mounts(self, namespace: str, pod: str, pod_spec: dict, container: dict) -> dict[str, str]:
        """mountPath → local directory for the container's mounts; Unbound while a claim has no volume. A claim the
        API has no object for (a user's pvc:// or cacheClaim in a demo) is an empty directory here, where a
        cluster would keep the pod Pending."""
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        mapping = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"]) or {}
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                try:
                    pvc = await self.request("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
                except RuntimeError as e:
                    if " 404 " not in str(e):
                        raise
                    pvc = None
                if pvc is not None and (pvc.get("status") or {}).get("phase") != "Bound":
                    raise Unbound(f'pod has unbound immediate PersistentVolumeClaims ("{claim}" is Pending)')
                local = self.claim_dir(namespace, claim)
            else:  # emptyDir and anything else: the pod's own directory
                local = self.pod_dir(namespace, pod) / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            mapping[mount["mountPath"]] = str(local)
        return mapping

    def forget_pod(self, namespace: str, pod: str) -> None:
        shutil.rmtree(self.pod_dir(namespace, pod), ignore_errors=True)

    # --- the provisioner and the PV controller ----------------------------------------------------------------

    async def _classes(self) -> dict[str, dict]:
        listed = await self.request("GET", "/apis/storage.k8s.io/v1/storageclasses")
        return {c["metadata"]["name"]: c for c in listed.get("items") or []}

    async def _event(self, pvc: dict, kind: str, reason: str, message: str) -> None:
        md = pvc["metadata"]
        key = (md["namespace"], md["name"], message)
        if key in self.events_posted:
            return
        self.events_posted.add(key)
        await self.request("POST", f"/api/v1/namespaces/{md['namespace']}/events", {
            "apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{md['name']}.",
                                                              "namespace": md["namespace"]},
            "involvedObject": {"kind": "PersistentVolumeClaim", "namespace": md["namespace"], "name": md["name"],
                               "uid": md.get("uid"), "apiVersion": "v1"},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "source": {"component": "persistentvolume-controller"}, "reportingComponent": "persistentvolume-controller",
            "firstTimestamp": md.get("creationTimestamp"), "lastTimestamp": md.get("creationTimestamp")},
            content_type="application/json")

    async def bind(self, pvc: dict) -> None:
        """A Pending claim of a known class gets a directory and a PersistentVolume and turns Bound; one of an unknown
        class stays Pending with the event the PV controller posts."""
        if (pvc.get("status") or {}).get("phase") == "Bound" or pvc["metadata"].get("deletionTimestamp"):
            return
        md, spec = pvc["metadata"], pvc.get("spec") or {}
        ns, name = md["namespace"], md["name"]
        classes = await self._classes()
        class_name = spec.get("storageClassName")
        if class_name is None:  # the retroactive default StorageClass assignment
            default = next((n for n, c in classes.items()
                            if (c["metadata"].get("annotations") or {}).get(DEFAULT_CLASS_ANNOTATION) == "true"), None)
            if default is None:
                await self._event(pvc, "Normal", "FailedBinding",
                                  "no persistent volumes available for this claim and no storage class is set")
                return
            await self.request("PATCH", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}",
                               {"spec": {"storageClassName": default}})
            class_name = default
        storage_class = classes.get(class_name)
        if storage_class is None:
            await self._event(pvc, "Warning", "ProvisioningFailed",
                              f'storageclass.storage.k8s.io "{class_name}" not found')
            return
        if storage_class.get("provisioner") != PROVISIONER:
            await self._event(pvc, "Normal", "ExternalProvisioning", f"Waiting for a volume to be created either by "
                              f"the external provisioner '{storage_class.get('provisioner')}' or manually by the "
                              "system administrator")
            return
        directory = self.claim_dir(ns, name)
        directory.mkdir(parents=True, exist_ok=True)
        volume = f"pvc-{md.get('uid', name)}"
        size = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        modes = spec.get("accessModes") or ["ReadWriteOnce"]
        try:
            await self.request("POST", "/api/v1/persistentvolumes", {
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": volume, "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {"capacity": {"storage": size}, "accessModes": modes, "storageClassName": class_name,
                         "persistentVolumeReclaimPolicy": storage_class.get("reclaimPolicy", "Delete"),
                         "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                         "claimRef": {"kind": "PersistentVolumeClaim", "namespace": ns, "name": name,
                                      "uid": md.get("uid"), "apiVersion": "v1"}}}, content_type="application/json")
        except RuntimeError as e:
            if " 409 " not in str(e):
                raise
        await self.request("PATCH", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}",
                           {"spec": {"volumeName": volume}})
        await self.request("PATCH", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}/status",
                           {"status": {"phase": "Bound", "accessModes": modes, "capacity": {"storage": size}}})
        log.info("%s/%s: claim bound to %s (%s)", ns, name, volume, directory)

    async def release(self, pvc: dict) -> None:
        """A deleted claim of this provisioner: its volume and directory go too (reclaimPolicy Delete)."""
        md = pvc["metadata"]
        volume = (pvc.get("spec") or {}).get("volumeName")
        if not volume:
            return
        await self.request("DELETE", f"/api/v1/persistentvolumes/{volume}")
        shutil.rmtree(self.claim_dir(md["namespace"], md["name"]), ignore_errors=True)
        log.info("%s/%s: claim deleted, its volume %s removed", md["namespace"], md["name"], volume)

    async def watch(self, session: aiohttp.ClientSession, api_url: str) -> None:
        """List, then watch claims; a watch that breaks is listed again. Storage classes created later are seen
        on the next look: a Pending claim is looked at again every RETRY_S."""
        path = "/api/v1/persistentvolumeclaims"
        pending: dict[tuple[str, str], dict] = {}

        async def retry_pending():
            while True:
                await asyncio.sleep(RETRY_S)
                for key, pvc in list(pending.items()):
                    try:
                        await self.bind(pvc)
                    except (RuntimeError, aiohttp.ClientError) as e:
                        log.warning("%s/%s: claim not bound: %s", *key, e)

        async def handle(kind: str | None, pvc: dict) -> None:
            key = (pvc.get("metadata", {}).get("namespace"), pvc.get("metadata", {}).get("name"))
            if kind == "DELETED":
                pending.pop(key, None)
                await self.release(pvc)
            elif kind in ("ADDED", "MODIFIED"):
                if (pvc.get("status") or {}).get("phase") == "Bound":
                    pending.pop(key, None)
                else:
                    pending[key] = pvc
                    await self.bind(pvc)

        retrier = asyncio.create_task(retry_pending())
        try:
            await follow(session, api_url + path + "?watch=true", handle, "claim", errors=(RuntimeError,))
        finally:
            retrier.cancel()
