"""The dev cluster's storage: the `standard` StorageClass (the default) and its external provisioner, as
sig-storage's provisioner library does it: a claim the PV controller hands to us (volume.kubernetes.io/storage-
provisioner) gets a local directory and a PersistentVolume naming it, which the PV controller binds; a released
volume of ours (reclaimPolicy Delete) goes with its directory."""
from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import aiohttp

from .watching import follow

log = logging.getLogger("cxygpt.provisioner")
PROVISIONER = "cxygpt.io/local-directory"
DEFAULT_CLASS = "standard"  # as kind names its local-path class
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
HANDED_TO = "volume.kubernetes.io/storage-provisioner"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
USER = "system:cxygpt-dev:local-directory-provisioner"


def storage_class() -> dict:
    """Local directories, bound at once, deleted with their claim."""
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": DEFAULT_CLASS, "annotations": {DEFAULT_CLASS_ANNOTATION: "true"}},
            "provisioner": PROVISIONER, "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate"}


def rbac() -> list[dict]:
    """What the provisioner may do (external-provisioner's ClusterRole), bound to its user."""
    rules = [{"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["get", "list", "watch", "create",
                                                                               "delete", "patch"]},
             {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "list", "watch", "update"]},
             {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses"], "verbs": ["get", "list", "watch"]},
             {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "update", "patch"]}]
    name = "cxygpt-dev:local-directory-provisioner"
    return [{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
             "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}]}]


def volume_for(pvc: dict, klass: dict, directory: Path) -> dict:
    """The PersistentVolume for a claim: its size and modes, our class's reclaim policy, the directory."""
    md, spec = pvc["metadata"], pvc.get("spec") or {}
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"pvc-{md['uid']}", "annotations": {PROVISIONED_BY: PROVISIONER},
                         "finalizers": [FINALIZER]},
            "spec": {"capacity": {"storage": ((spec.get("resources") or {}).get("requests") or {}).get("storage",
                                                                                                        "1Gi")},
                     "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                     "storageClassName": klass["metadata"]["name"], "volumeMode": spec.get("volumeMode", "Filesystem"),
                     "persistentVolumeReclaimPolicy": klass.get("reclaimPolicy", "Delete"),
                     "hostPath": {"path": str(directory), "type": "DirectoryOrCreate"},
                     "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": md["namespace"],
                                  "name": md["name"], "uid": md["uid"]}}}


class Provisioner:
    """`request(method, path, body=None, content_type=...)` is the API call with the provisioner's identity."""

    def __init__(self, request, root: Path):
        self.request, self.root = request, Path(root)

    async def provision(self, pvc: dict) -> None:
        md = pvc["metadata"]
        if (md.get("annotations") or {}).get(HANDED_TO) != PROVISIONER or (pvc.get("spec") or {}).get("volumeName") \
                or md.get("deletionTimestamp"):
            return
        klass = await self.request("GET", f"/apis/storage.k8s.io/v1/storageclasses/{pvc['spec']['storageClassName']}")
        directory = self.root / md["namespace"] / f"{md['name']}-{md['uid'][:8]}"
        directory.mkdir(parents=True, exist_ok=True)
        try:
            await self.request("POST", "/api/v1/persistentvolumes", volume_for(pvc, klass, directory))
        except RuntimeError as e:
            if " 409 " not in str(e):
                raise
            return
        log.info("%s/%s: provisioned %s", md["namespace"], md["name"], directory)

    async def reclaim(self, pv: dict) -> None:
        md, spec = pv["metadata"], pv.get("spec") or {}
        if (md.get("annotations") or {}).get(PROVISIONED_BY) != PROVISIONER:
            return
        released = (pv.get("status") or {}).get("phase") in ("Released", "Failed")
        if released and spec.get("persistentVolumeReclaimPolicy") == "Delete" and not md.get("deletionTimestamp"):
            shutil.rmtree(spec["hostPath"]["path"], ignore_errors=True)
            await self.request("DELETE", f"/api/v1/persistentvolumes/{md['name']}")
            log.info("%s: released, deleted with its directory", md["name"])
        elif md.get("deletionTimestamp") and FINALIZER in (md.get("finalizers") or []):
            shutil.rmtree(spec["hostPath"]["path"], ignore_errors=True)
            await self.request("PATCH", f"/api/v1/persistentvolumes/{md['name']}",
                               {"metadata": {"finalizers": [f for f in md["finalizers"] if f != FINALIZER]}},
                               "application/merge-patch+json")

    async def run(self, session: aiohttp.ClientSession, server: str) -> None:
        async def on_claim(kind, pvc):
            if kind in ("ADDED", "MODIFIED"):
                await self.provision(pvc)

        async def on_volume(kind, pv):
            if kind in ("ADDED", "MODIFIED"):
                await self.reclaim(pv)

        await asyncio.gather(
            follow(session, f"{server}/api/v1/persistentvolumeclaims?watch=true", on_claim, "claims",
                   errors=(RuntimeError, LookupError)),
            follow(session, f"{server}/api/v1/persistentvolumes?watch=true", on_volume, "volumes",
                   errors=(RuntimeError, LookupError)))
