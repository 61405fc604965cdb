"""All Kubernetes API I/O of the operator: reads as plain dicts, server-side apply, deletes, status patches, the
scale subresource."""
from __future__ import annotations

import json
import os

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from . import GROUP, MANAGER, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (given, $KUBECONFIG or ~/.kube/config).
    $KUBECONFIG is read here, not at import time (the client library reads it when imported)."""
    if kubeconfig is None and not os.environ.get("KUBECONFIG") and os.environ.get("KUBERNETES_SERVICE_HOST"):
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    return config.new_client_from_config(config_file=path)


def api_message(error: ApiException) -> str:
    """What the API server said when it refused a call."""
    try:
        return json.loads(error.body or "").get("message") or str(error.reason)
    except (TypeError, ValueError, AttributeError):
        return str(error.body or error.reason)


def _raw(response) -> dict:
    return json.loads(response.data)


class Kube:
    """Blocking calls (run them in a thread); objects in and out are the API's own JSON as dicts."""

    def __init__(self, api: client.ApiClient):
        self.apps = client.AppsV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.networking = client.NetworkingV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.storage = client.StorageV1Api(api)

    @staticmethod
    def _read(read, namespace: str, name: str) -> dict | None:
        try:
            return _raw(read(name, namespace, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def get_deployment(self, namespace: str, name: str) -> dict | None:
        return self._read(self.apps.read_namespaced_deployment, namespace, name)

    def get_service(self, namespace: str, name: str) -> dict | None:
        return self._read(self.core.read_namespaced_service, namespace, name)

    def get_network_policy(self, namespace: str, name: str) -> dict | None:
        return self._read(self.networking.read_namespaced_network_policy, namespace, name)

    def get_claim(self, namespace: str, name: str) -> dict | None:
        return self._read(self.core.read_namespaced_persistent_volume_claim, namespace, name)

    def list_claims(self, namespace: str, selector: dict[str, str]) -> list[dict]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return _raw(self.core.list_namespaced_persistent_volume_claim(
            namespace, label_selector=label_selector, _preload_content=False)).get("items") or []

    def get_job(self, namespace: str, name: str) -> dict | None:
        return self._read(self.batch.read_namespaced_job, namespace, name)

    def list_jobs(self, namespace: str, selector: dict[str, str]) -> list[dict]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return _raw(self.batch.list_namespaced_job(namespace, label_selector=label_selector,
                                                   _preload_content=False)).get("items") or []

    def create_claim(self, body: dict, dry_run: bool = False) -> dict:
        """Created once: a claim's spec is (but for its size) immutable, and the first user's settings make it.
        `dry_run`: admitted (quotas, policies) but not made."""
        # the client serializes a dict as it does its models (its type hints name only the models)
        return _raw(self.core.create_namespaced_persistent_volume_claim(
            body["metadata"]["namespace"], body, field_manager=MANAGER, _preload_content=False,  # type: ignore[arg-type]
            dry_run="All" if dry_run else None))

    def create_job(self, body: dict) -> dict:
        return _raw(self.batch.create_namespaced_job(
            body["metadata"]["namespace"], body, field_manager=MANAGER, _preload_content=False))  # type: ignore[arg-type]

    def patch_metadata(self, kind: str, namespace: str, name: str, metadata: dict) -> dict:
        """A merge patch of a claim's or Job's metadata (users, owners, the recorded download)."""
        patch = {"PersistentVolumeClaim": self.core.patch_namespaced_persistent_volume_claim,
                 "Job": self.batch.patch_namespaced_job}[kind]
        return _raw(patch(name, namespace, {"metadata": metadata}, field_manager=MANAGER,
                          _content_type=MERGE_PATCH, _preload_content=False))

    def storage_class(self, name: str) -> dict | None:
        try:
            return _raw(self.storage.read_storage_class(name, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def storage_classes(self) -> list[dict]:
        return _raw(self.storage.list_storage_class(_preload_content=False)).get("items") or []

    def events_of(self, namespace: str, kind: str, name: str) -> list[dict]:
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        return _raw(self.core.list_namespaced_event(namespace, field_selector=selector,
                                                    _preload_content=False)).get("items") or []

    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        """The last lines of a container's log ("" when there is none yet)."""
        try:
            response = self.core.read_namespaced_pod_log(name, namespace, container=container, tail_lines=tail_lines,
                                                         limit_bytes=16384, _preload_content=False)
        except ApiException as e:
            if e.status in (400, 404):  # not started yet, or gone
                return ""
            raise
        # _preload_content=False answers the raw HTTP response (the client's hints name the decoded str)
        return response.data.decode(errors="replace")  # type: ignore[attr-defined]

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        return _raw(self.core.list_namespaced_pod(namespace, label_selector=label_selector,
                                                  _preload_content=False)).get("items") or []

    def set_pod_condition(self, namespace: str, name: str, condition: dict) -> None:
        """One condition of a pod's status (a readiness gate's), the others kept: conditions merge by type."""
        self.core.patch_namespaced_pod_status(name, namespace, {"status": {"conditions": [condition]}},
                                              _content_type=STRATEGIC_PATCH, _preload_content=False)

    def apply_deployment(self, body: dict) -> dict:
        md = body["metadata"]
        return _raw(self.apps.patch_namespaced_deployment(
            md["name"], md["namespace"], body, field_manager=MANAGER, force=True,
            _content_type=APPLY_PATCH, _preload_content=False))

    def apply_service(self, body: dict) -> dict:
        md = body["metadata"]
        return _raw(self.core.patch_namespaced_service(
            md["name"], md["namespace"], body, field_manager=MANAGER, force=True,
            _content_type=APPLY_PATCH, _preload_content=False))

    def apply_network_policy(self, body: dict) -> dict:
        md = body["metadata"]
        return _raw(self.networking.patch_namespaced_network_policy(
            md["name"], md["namespace"], body, field_manager=MANAGER, force=True,
            _content_type=APPLY_PATCH, _preload_content=False))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Deletes a Deployment, Service, NetworkPolicy, claim or Job (with its pods); one gone already is fine."""
        delete = {"Deployment": self.apps.delete_namespaced_deployment, "Service": self.core.delete_namespaced_service,
                  "NetworkPolicy": self.networking.delete_namespaced_network_policy,
                  "PersistentVolumeClaim": self.core.delete_namespaced_persistent_volume_claim,
                  "Job": self.batch.delete_namespaced_job}[kind]
        try:
            # a Job's pods go with it (its default, orphan, would leave them running)
            delete(name, namespace, propagation_policy="Background", _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise

    def patch_status(self, namespace: str, name: str, patch: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": patch},
            _content_type=MERGE_PATCH, _preload_content=False)

    def scale(self, namespace: str, name: str, replicas: int, expected: int) -> bool:
        """spec.replicas through the scale subresource, from `expected` only: False when someone changed it
        meanwhile (the next decision sees their count)."""
        patch = [{"op": "test", "path": "/spec/replicas", "value": expected},
                 {"op": "replace", "path": "/spec/replicas", "value": replicas}]
        try:
            self.custom.patch_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, name, patch,
                                                             _content_type=JSON_PATCH, _preload_content=False)
        except ApiException as e:
            if e.status in (409, 422):
                return False
            raise
        return True

    def list_endpoint_slices(self, namespace: str, service: str) -> list[dict]:
        return _raw(self.discovery.list_namespaced_endpoint_slice(
            namespace, label_selector=f"kubernetes.io/service-name={service}",
            _preload_content=False)).get("items") or []
