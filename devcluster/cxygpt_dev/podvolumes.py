"""A pod's volumes as kubelet makes them, each a directory of this machine: emptyDir, configMap, secret, projected
(service-account token, configMap, downwardAPI), downwardAPI, and persistentVolumeClaim/hostPath (the bound
PersistentVolume's directory); and the container environment they and the API give (env, envFrom)."""
from __future__ import annotations

import base64
import shutil
from pathlib import Path

# the projected token's lifetime kubelet asks for (the API server extends the admission-injected ones)
TOKEN_EXPIRATION_S = 3607
KEYED = ("configMap", "secret")  # sources whose items pick keys (the others' items are already the files)


class CannotStart(Exception):
    """What kubelet waits on before it can start a container (a Secret or a key missing, a claim not bound): the
    container stays Waiting with this reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _field(pod: dict, path: str) -> str:
    """A downward API field of the pod (metadata.name, metadata.labels['x'], status.podIP, spec.nodeName, ...)."""
    if path.startswith(("metadata.labels['", "metadata.annotations['")):
        kind, key = path.split("['", 1)
        return ((pod["metadata"].get(kind.split(".")[1]) or {}).get(key.rstrip("']")) or "")
    value = pod
    for part in path.split("."):
        value = (value or {}).get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


class PodVolumes:
    """`request(method, path, body=None)` is the kubelet's API call (its node's credentials); `root` holds the pods'
    directories."""

    def __init__(self, request, root: Path):
        self.request, self.root = request, Path(root)

    def pod_dir(self, pod: dict) -> Path:
        return self.root / pod["metadata"]["uid"]

    async def _get(self, path: str, what: str, optional: bool = False) -> dict | None:
        try:
            return await self.request("GET", path)
        except LookupError:
            if optional:
                return None
            raise CannotStart("CreateContainerConfigError", f"{what} not found") from None

    async def _configmap(self, namespace: str, name: str, optional: bool = False) -> dict | None:
        return await self._get(f"/api/v1/namespaces/{namespace}/configmaps/{name}", f'configmap "{name}"', optional)

    async def _secret(self, namespace: str, name: str, optional: bool = False) -> dict | None:
        return await self._get(f"/api/v1/namespaces/{namespace}/secrets/{name}", f'secret "{name}"', optional)

    @staticmethod
    def _write_items(directory: Path, data: dict[str, bytes], items: list | None) -> None:
        chosen = {i["key"]: i.get("path", i["key"]) for i in items} if items else {k: k for k in data}
        for key, path in chosen.items():
            if key not in data:
                raise CannotStart("CreateContainerConfigError", f"couldn't find key {key} in the volume's source")
            target = directory / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[key])

    async def _source_data(self, pod: dict, source: dict) -> dict[str, bytes] | None:
        namespace = pod["metadata"]["namespace"]
        if "configMap" in source:
            ref = source["configMap"]
            cm = await self._configmap(namespace, ref["name"], ref.get("optional", False))
            return None if cm is None else {**{k: v.encode() for k, v in (cm.get("data") or {}).items()},
                                            **{k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()}}
        if "secret" in source:
            ref = source["secret"]
            secret = await self._secret(namespace, ref.get("secretName") or ref["name"], ref.get("optional", False))
            return None if secret is None else {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
        if "downwardAPI" in source:
            return {i["path"]: _field(pod, i["fieldRef"]["fieldPath"]).encode()
                    for i in source["downwardAPI"].get("items") or [] if "fieldRef" in i}
        if "serviceAccountToken" in source:
            ref = source["serviceAccountToken"]
            body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
                "expirationSeconds": ref.get("expirationSeconds", TOKEN_EXPIRATION_S),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                                   "uid": pod["metadata"]["uid"]},
                **({"audiences": [ref["audience"]]} if ref.get("audience") else {})}}
            account = pod["spec"].get("serviceAccountName") or "default"
            token = await self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", body)
            return {ref["path"]: token["status"]["token"].encode()}
        raise CannotStart("CreateContainerConfigError", f"volume source {sorted(source)} is not supported here")

    async def prepare(self, pod: dict) -> dict[str, Path]:
        """Every volume of the pod as a directory (or, for a claim or a hostPath, the directory it names)."""
        pod_dir, namespace = self.pod_dir(pod), pod["metadata"]["namespace"]
        made = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            local = pod_dir / "volumes" / name
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                pvc = await self._get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}",
                                      f'persistentvolumeclaim "{claim}"')
                bound = (pvc.get("spec") or {}).get("volumeName")
                if not bound or (pvc.get("status") or {}).get("phase") != "Bound":
                    raise CannotStart("ContainerCreating", f'persistentvolumeclaim "{claim}" is not bound')
                pv = await self._get(f"/api/v1/persistentvolumes/{bound}", f'persistentvolume "{bound}"')
                spec = pv.get("spec") or {}
                path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
                if not path:
                    raise CannotStart("ContainerCreating", f'persistentvolume "{bound}" has no local path')
                made[name] = Path(path)
                made[name].mkdir(parents=True, exist_ok=True)
                continue
            if "hostPath" in volume:
                made[name] = Path(volume["hostPath"]["path"])
                continue
            local.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in volume:
                pass
            elif "projected" in volume:
                for source in volume["projected"].get("sources") or []:
                    data = await self._source_data(pod, source)
                    if data is not None:
                        kind = next(iter(source))
                        self._write_items(local, data, source[kind].get("items") if kind in KEYED else None)
            else:
                kind = next((k for k in ("configMap", "secret", "downwardAPI") if k in volume), None)
                if kind is None:
                    raise CannotStart("CreateContainerConfigError",
                                      f"volume {name!r}: {sorted(set(volume) - {'name'})} is not supported here")
                data = await self._source_data(pod, {kind: volume[kind]})
                if data is not None:
                    self._write_items(local, data, volume[kind].get("items") if kind in KEYED else None)
            made[name] = local
        return made

    @staticmethod
    def mounts(container: dict, volumes: dict[str, Path]) -> dict[str, str]:
        """mountPath → directory of this machine for one container (subPath within its volume)."""
        mapping = {}
        for mount in container.get("volumeMounts") or []:
            local = volumes[mount["name"]]
            if mount.get("subPath"):
                local = local / mount["subPath"]
                local.parent.mkdir(parents=True, exist_ok=True)
            mapping[mount["mountPath"]] = str(local)
        return mapping

    async def env(self, pod: dict, container: dict) -> dict[str, str]:
        """The container's environment from its spec: envFrom, then env (values, and refs to Secrets, ConfigMaps and
        the pod's own fields)."""
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                data = await self._source_data(pod, {"configMap": source["configMapRef"]})
            else:
                ref = source["secretRef"]
                data = await self._source_data(pod, {"secret": {**ref, "secretName": ref["name"]}})
            for key, value in (data or {}).items():
                env[source.get("prefix", "") + key] = value.decode()
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item.get("valueFrom") or {}
            if "fieldRef" in ref:
                env[item["name"]] = _field(pod, ref["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
                key_ref = ref.get("secretKeyRef") or ref["configMapKeyRef"]
                kind = "secret" if "secretKeyRef" in ref else "configmap"
                fetch = self._secret if kind == "secret" else self._configmap
                obj = await fetch(namespace, key_ref["name"], key_ref.get("optional", False))
                if obj is None:
                    continue
                data = obj.get("data") or {}
                if key_ref["key"] in data:
                    value = data[key_ref["key"]]
                    env[item["name"]] = base64.b64decode(value).decode() if kind == "secret" else value
                elif not key_ref.get("optional"):
                    where = f"{kind.title()} {namespace}/{key_ref['name']}"
                    raise CannotStart("CreateContainerConfigError", f"couldn't find key {key_ref['key']} in {where}")
        return env

    def forget(self, pod: dict) -> None:
        shutil.rmtree(self.pod_dir(pod), ignore_errors=True)
