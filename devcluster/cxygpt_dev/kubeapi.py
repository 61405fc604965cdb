"""In-memory Kubernetes API over real HTTP (kmock 0.8 plus what kopf, kubectl and client-go need)."""
from __future__ import annotations

import argparse
import asyncio
import contextvars
import copy
import datetime
import itertools
import json
import logging
import signal
import uuid
from pathlib import Path

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import yaml
from kmock._internal import enums, parsing

from .crdcheck import CrdValidator
from .openapi import Documents

log = logging.getLogger("cxygpt.kubeapi")
_handled: contextvars.ContextVar[list] = contextvars.ContextVar("handled")
_resource_versions = itertools.count(1)

# kmock 0.8 crashes on GET /api/v1/namespaces and mis-parses /api/v1/namespaces/<name>:
# treat 'namespaces' as a namespace prefix only when a '<plural>' follows it.
_kmock_parse_path = parsing.parse_path


def _parse_path(path):
    parts = path.strip("/").split("/")
    head = 2 if parts[:1] == ["api"] else 3 if parts[:1] == ["apis"] else None
    if head is not None and parts[head:head + 1] == ["namespaces"] and len(parts) - head <= 2:
        name = parts[head + 1] if len(parts) - head == 2 else None
        return parsing.ParsedPath("" if head == 2 else parts[1], parts[head - 1], "namespaces", None, name, None)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selector_matches(selector: str, labels: dict) -> bool:
    """Equality-based label selectors: k=v, k==v, k!=v, k (exists), !k."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _fields_match(selector: str, obj: dict) -> bool:
    """Field selectors: path=value, path==value, path!=value on dotted paths (metadata.name, status.phase, ...);
    kubectl wait and rollout status name their object this way."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        path, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        found = obj
        for part in path.strip().split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if (str(found if found is not None else "") == value.strip()) == negate:
            return False
    return True


def _selected(request, obj: dict) -> bool:
    """Whether a list or watch with these label and field selectors includes `obj`."""
    return (_selector_matches(request.params.get("labelSelector", ""), obj.get("metadata", {}).get("labels") or {})
            and _fields_match(request.params.get("fieldSelector", ""), obj))


class Invalid(kmock.KubernetesError):
    """422: the object breaks its CRD schema."""


class ApiError(kmock.KubernetesError):
    """An error answered as the API server words it (kind Status with reason, message and details)."""


def _qualified(resource) -> str:
    """`modeldeployments.cxygpt.io`, or `pods` for the core group, as the API server names a resource in errors."""
    return f"{resource.plural}.{resource.group}" if resource.group else resource.plural


def _not_found(resource, name: str) -> ApiError:
    return ApiError(status=404, reason="NotFound", message=f'{_qualified(resource)} "{name}" not found',
                    details={"name": name, "group": resource.group, "kind": resource.plural})


def _check_json_patch(current: dict, patch: list) -> None:
    """A JSON patch that does not apply (kopf's `test` of a stale resourceVersion, a missing path) is a 422, as
    the API server answers it: kopf then re-reads the object and tries again, where a 500 made it resend the
    same stale patch for half a minute."""
    try:
        jsonpatch.apply_patch(current, patch)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
        raise ApiError(status=422, reason="Invalid", message=f"the JSON patch does not apply: {e}") from None


def _scale_of(obj: dict, paths: dict) -> dict:
    """The autoscaling/v1 Scale of an object, by its scale subresource's paths."""
    md = obj["metadata"]
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: md[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in md},
            # autoscaling/v1 leaves spec.replicas out when it is 0 (omitempty), as a real API server shows it
            "spec": {k: v for k, v in {"replicas": _at(obj, paths["specReplicasPath"]) or 0}.items() if v},
            "status": {"replicas": _at(obj, paths.get("statusReplicasPath", "")) or 0,
                       **({"selector": _at(obj, paths["labelSelectorPath"])}
                          if _at(obj, paths.get("labelSelectorPath", "")) else {})}}


def _scale_paths(crd_version: dict) -> dict | None:
    return ((crd_version.get("subresources") or {}).get("scale")) or None


class KubeAPI(kmock.KubernetesEmulator):
    """kmock's emulator with server-set metadata, CRDs that register and validate, generation,
    status subresources, ownerReference garbage collection and client-go-compatible discovery/watches."""

    def __attrs_post_init__(self):
        super().__attrs_post_init__()
        self.resources.load_bundled()
        self.validators: dict[tuple[str, str, str], CrdValidator] = {}
        self.status_subresources: set[tuple[str, str, str]] = set()
        self.printer_columns: dict[tuple[str, str, str], list[dict]] = dict(BUILTIN_COLUMNS)
        # the scale subresource's JSON paths per resource; Deployments' are the built-in ones
        self.scale_paths: dict[tuple[str, str, str], dict] = {("apps", "v1", "deployments"): {
            "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector"}}
        self.openapi = Documents()
        self.pod_logs: Path | None = None  # kubelet's log files, as the pod runner writes them (pods/log)
        # client-go refuses watch streams served as application/octet-stream (kmock's default)
        (self.fallback ** 1)[enums.action.WATCH] << kmock.headers("Content-Type: application/json") << self._serve_watch
        for ns in ("default", "kube-system"):
            self.objects["v1/namespaces", None, ns] = {
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                             "resourceVersion": str(next(_resource_versions))}}

    # --- request handling ---------------------------------------------------------------------------------

    async def __call__(self, raw_request):
        handled = []
        token = _handled.set(handled)
        try:
            return await super().__call__(raw_request)
        finally:
            _handled.reset(token)
            # kmock records every request for test assertions and matches each new request against that
            # history (O(history) per request); a server keeps only the requests still in flight.
            done = {id(r) for r in handled}
            self._requests[:] = [r for r in self._requests if id(r) not in done]
            if self._errors:
                self._errors[-1].clear()

    async def _handle(self, request):
        _handled.get([]).append(request)
        if request.url.path.startswith("/openapi/"):
            return self._serve_openapi(request)
        if "protobuf" in request.headers.get("Content-Type", "") and request.body:
            # client-go sends built-in kinds as protobuf when it may; on a 415 it falls back to JSON
            raise ApiError(status=415, reason="UnsupportedMediaType",
                           message="the body of the request was in an unknown format: accepted media types "
                                   "include: application/json, application/yaml")
        res = request.resource
        key = (res.group, res.version, res.plural) if res is not None else None
        data = request.data if isinstance(request.data, dict) else None
        current = self._current(request) if request.name is not None else None
        if request.subresource == "log" and key == ("", "v1", "pods") and request.action == enums.action.FETCH:
            return self._serve_log(request, current)
        if res is not None and res.plural and res not in self.resources:
            raise ApiError(status=404, reason="NotFound", message="the server could not find the requested resource",
                           details={})
        if request.name is not None and current is None and request.action in (
                enums.action.FETCH, enums.action.DELETE) or (request.subresource and current is None):
            raise _not_found(res, request.name)
        if request.subresource == "scale":
            return await self._serve_scale(request, key, current)
        if request.action == enums.action.CREATE and data is not None:
            name = (data.get("metadata") or {}).get("name")
            if name and self._stored(request, name) is not None and not self._stored(request, name).deleted:
                raise ApiError(status=409, reason="AlreadyExists", message=f'{_qualified(res)} "{name}" already exists',
                               details={"name": name, "group": res.group, "kind": res.plural})
        if (request.action == enums.action.UPDATE and request.subresource is None and data is not None
                and "apply-patch" in request.headers.get("Content-Type", "") and current is None):
            return await self._apply_create(request, key, data)
        if request.action == enums.action.UPDATE and request.name is not None and current is None:
            raise _not_found(res, request.name)
        if request.action == enums.action.CREATE and data is not None:
            self._prepare_create(request, key, data)
        elif request.action == enums.action.UPDATE and data is not None and current is not None:
            self._prepare_update(request, key, data, current)
            if _unchanged(current, data):
                return aiohttp.web.json_response(current)  # a no-op write changes nothing, as in the API server
        if request.action == enums.action.UPDATE and current is not None and isinstance(request.data, list):
            _check_json_patch(current, request.data)
            # every write makes a new version, or a later `test` of the old one would pass
            request.data.append({"op": "add", "path": "/metadata/resourceVersion",
                                 "value": str(next(_resource_versions))})
        # An object is gone after a DELETE, or after the PATCH that removes its last finalizer.
        vanishing = current is not None and request.action in (enums.action.DELETE, enums.action.UPDATE)
        uid = current["metadata"].get("uid") if vanishing else None
        response = await super()._handle(request)
        if request.action == enums.action.CREATE and response.status == 200 and not response.prepared:
            response.set_status(201)  # the kubernetes client returns None for a 200 on create
        if uid and self._current(request) is None:
            await self._collect_garbage(uid)
        return response

    async def _serve_scale(self, request, key, current: dict):
        """autoscaling/v1 Scale of an object, built from (and written through) its scale subresource's paths."""
        paths = self.scale_paths.get(key)
        if paths is None:
            raise ApiError(status=404, reason="NotFound", message="the server could not find the requested resource")
        if request.action == enums.action.UPDATE:
            data = request.data
            if isinstance(data, list):  # a JSON patch of the Scale (a failed `test` is a 422, as for any patch)
                try:
                    data = jsonpatch.apply_patch(_scale_of(current, paths), data)
                except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
                    raise ApiError(status=422, reason="Invalid",
                                   message=f"the JSON patch does not apply: {e}") from None
            spec = (data or {}).get("spec")
            replicas = spec.get("replicas", 0) if isinstance(spec, dict) else None
            if not isinstance(replicas, int) or replicas < 0:
                raise Invalid(status=422, reason="Invalid", message=f'Scale.autoscaling "{request.name}" is invalid: '
                              "spec.replicas: Invalid value: must be an integer >= 0")
            patch: dict = {}
            node = patch
            *parents, leaf = paths["specReplicasPath"].strip(".").split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = replicas
            self._prepare_update(attrs.evolve(request, subresource=None, data=patch), key, patch, current)
            async with self._lock:
                obj = self._objects[request.resource, request.namespace, request.name]
                obj.patch(patch)
                await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})
            current = self._current(request)
        return aiohttp.web.json_response(_scale_of(current, paths))

    def _serve_log(self, request, pod: dict | None):
        """pods/log from the log file the pod runner writes for each container (kubelet's role): tailLines and
        limitBytes as the API server applies them; follow is not streamed (the log so far is answered)."""
        if pod is None:
            raise _not_found(request.resource, request.name)
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = request.params.get("container") or (containers[0] if len(containers) == 1 else None)
        if container is None:
            raise ApiError(status=400, reason="BadRequest", message=f"a container name must be specified for pod "
                           f"{request.name}, choose one of: {containers}")
        path = self.pod_logs / request.namespace / request.name / f"{container}.log" if self.pod_logs else None
        if path is None or not path.exists():
            raise ApiError(status=400, reason="BadRequest", message=f'container "{container}" in pod '
                           f'"{request.name}" is waiting to start: ContainerCreating')
        text = path.read_text(errors="replace")
        tail = request.params.get("tailLines")
        if tail is not None and tail.isdigit():
            text = "".join(text.splitlines(keepends=True)[-int(tail):] if int(tail) else [])
        limit = request.params.get("limitBytes")
        if limit is not None and limit.isdigit():
            text = text.encode()[:int(limit)].decode(errors="ignore")
        return aiohttp.web.Response(text=text, content_type="text/plain")

    def _serve_openapi(self, request):
        path = request.url.path
        if path == "/openapi/v2":
            return aiohttp.web.json_response(self.openapi.swagger(self.resources))
        if path == "/openapi/v3":
            return aiohttp.web.json_response(self.openapi.root(self.resources))
        doc = self.openapi.document(self.resources, path.removeprefix("/openapi/v3/"))
        if doc is None:
            raise ApiError(status=404, reason="NotFound", message="the server could not find the requested resource")
        return aiohttp.web.json_response(doc)

    async def _apply_create(self, request, key, data):
        """Server-side apply of an object that does not exist yet creates it."""
        data.setdefault("metadata", {}).update(name=request.name)
        self._prepare_create(request, key, data)
        async with self._lock:
            object_key = (request.resource, request.namespace, request.name)
            self._objects[object_key] = data
            raw = self._objects[object_key].last.raw
            await self._buses[request.resource].put({"type": "ADDED", "object": raw})
        return aiohttp.web.json_response(dict(raw), status=201)

    def _prepare_create(self, request, key, data):
        md = data.setdefault("metadata", {})
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + uuid.uuid4().hex[:5]
        if not md.get("name"):
            raise Invalid(status=422, reason="Invalid",
                          message="metadata.name: Required value: name or generateName is required")
        if key in self.validators:
            defaulted, errors = self.validators[key].check(data)
            if errors:
                raise self._invalid(data, errors)
            data.clear()
            data.update(defaulted)
            md = data["metadata"]
        md.setdefault("uid", str(uuid.uuid4()))
        md.setdefault("creationTimestamp", _now())
        md["generation"] = 1
        md["resourceVersion"] = str(next(_resource_versions))
        if request.namespace and "namespace" not in md:
            md["namespace"] = request.namespace  # else namespace-filtered watches miss the object
        if request.resource.plural == "customresourcedefinitions":
            self.register_crd(data)
        if key == ("batch", "v1", "jobs") and not (data.get("spec") or {}).get("manualSelector"):
            _default_job_selector(data)
        if key == ("", "v1", "persistentvolumeclaims"):
            data["status"] = {"phase": "Pending"}  # as the API server makes every new claim

    def _prepare_update(self, request, key, data, current: dict):
        status_only = request.subresource == "status"
        if status_only:
            for field in list(data):  # the status subresource changes status only
                if field != "status":
                    del data[field]
            conditions = (data.get("status") or {}).get("conditions")
            if key == ("", "v1", "pods") and isinstance(conditions, list):
                # a pod's conditions merge by type (its strategic merge key), as the API server merges them: a
                # readiness gate's condition set by a controller outlives the pod runner's own writes
                merged = {c.get("type"): c for c in (current.get("status") or {}).get("conditions") or []}
                merged.update({c.get("type"): c for c in conditions if isinstance(c, dict)})
                data["status"]["conditions"] = list(merged.values())
        elif key in self.status_subresources:
            data.pop("status", None)  # ...and the main resource never changes status
        if key in self.validators and not status_only:
            merged = _merge(copy.deepcopy(current), data)
            defaulted, errors = self.validators[key].check(merged)
            if errors:
                raise self._invalid(merged, errors)
            if defaulted.get("spec") != merged.get("spec"):
                data["spec"] = defaulted.get("spec")
        md = data.setdefault("metadata", {})
        spec = current.get("spec", {})
        if "spec" in data and not status_only and _merge(copy.deepcopy(spec), data["spec"]) != spec:
            md["generation"] = current.get("metadata", {}).get("generation", 1) + 1
        md["resourceVersion"] = str(next(_resource_versions))

    def _current(self, request) -> dict | None:
        obj_key = (request.resource, request.namespace, request.name)
        if obj_key not in self.objects or self.objects[obj_key].deleted:
            return None
        return dict(self.objects[obj_key].raw)

    async def _collect_garbage(self, owner_uid: str):
        """Background cascading deletion, as Kubernetes' garbage collector does it: an object whose
        ownerReferences name the deleted uid is deleted once none of its owners exists any more; while one
        does, only the reference to the one gone is removed."""
        doomed = []
        async with self._lock:
            live = {obj.raw.get("metadata", {}).get("uid") for obj in self.objects.values() if not obj.deleted}
            for (resource, namespace, name), obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                refs = obj.raw.get("metadata", {}).get("ownerReferences") or []
                if not any(ref.get("uid") == owner_uid for ref in refs):
                    continue
                remaining = [ref for ref in refs if ref.get("uid") != owner_uid and ref.get("uid") in live]
                if remaining:
                    obj.patch({"metadata": {"ownerReferences": remaining,
                                            "resourceVersion": str(next(_resource_versions))}})
                    await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
                else:
                    doomed.append((resource, namespace, name, obj.raw.get("metadata", {}).get("uid")))
            for resource, namespace, name, _ in doomed:
                obj = self.objects[resource, namespace, name]
                raw = dict(obj.raw)
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})
        for *_, uid in doomed:
            if uid:
                await self._collect_garbage(uid)

    @staticmethod
    def _invalid(obj: dict, errors: list[str]):
        kind, name = obj.get("kind", "object"), obj.get("metadata", {}).get("name", "")
        causes = [dict(zip(("field", "message"), e.split(": ", 1))) for e in errors]
        return Invalid(status=422, reason="Invalid",
                       message=f'{kind}.{obj.get("apiVersion", "").split("/")[0]} "{name}" is invalid: '
                               + ", ".join(errors),
                       details={"name": name, "kind": kind, "causes": causes})

    # --- CRDs -----------------------------------------------------------------------------------------------

    def register_crd(self, crd: dict):
        spec = crd.get("spec", {})
        names = spec.get("names", {})
        for version in spec.get("versions", []):
            key = (spec["group"], version["name"], names["plural"])
            subresources = version.get("subresources", {}) or {}
            self.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                kind=names.get("kind"), singular=names.get("singular"),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                shortnames=set(names.get("shortNames", [])), categories=set(names.get("categories", [])),
                verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
                subresources={s for s in ("status", "scale") if s in subresources})
            if "status" in subresources:
                self.status_subresources.add(key)
            if "scale" in subresources:
                self.scale_paths[key] = subresources["scale"]
            if version.get("additionalPrinterColumns"):
                self.printer_columns[key] = version["additionalPrinterColumns"]
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema:
                self.validators[key] = CrdValidator(schema)
                self.openapi.add_crd(spec["group"], version["name"], names["kind"], schema)

    # --- reads ----------------------------------------------------------------------------------------------

    async def _serve_list(self, request):
        data = await super()._serve_list(request)
        data["items"] = [o for o in data["items"] if _selected(request, o)]
        data["metadata"] = {"resourceVersion": str(next(_resource_versions))}
        res = request.resource
        info = self.resources[res] if res in self.resources else None
        group_version = f"{res.group}/{res.version}" if res.group else res.version
        kind = f"{info.kind}List" if info and info.kind else "List"
        return self._as_table(request, data["items"]) or {"apiVersion": group_version, "kind": kind, **data}

    # kmock finds an object by scanning every stored object; these look it up by key (O(1)).
    def _stored(self, request, name: str | None = None):
        key = (request.resource, request.namespace, name or request.name)
        return self.objects[key] if key in self.objects else None

    async def _serve_fetch(self, request):
        obj = self._stored(request)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return self._as_table(request, [obj.raw]) or obj.raw

    async def _serve_create(self, request):
        return self._stored(request, request.data.get("metadata", {}).get("name")).raw

    async def _serve_update(self, request):
        return self._stored(request).last.raw

    async def _serve_delete(self, request):
        return self._stored(request).last.raw

    def _as_table(self, request, items: list) -> dict | None:
        """Server-side printing (kubectl asks for `as=Table`) with the CRD's additionalPrinterColumns."""
        res = request.resource
        columns = self.printer_columns.get((res.group, res.version, res.plural)) if res else None
        if not columns or "as=Table" not in request.headers.get("Accept", ""):
            return None
        definitions = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
        definitions += [{"name": c["name"], "type": c.get("type", "string"), "format": "",
                         "priority": c.get("priority", 0), "description": c.get("description", "")} for c in columns]
        rows = [{"cells": [o["metadata"]["name"], *(_printed(o, c) for c in columns)],
                 "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}}
                for o in items]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "1"},
                "columnDefinitions": definitions, "rows": rows}

    async def _serve_watch(self, request):
        def matches(obj):
            return _selected(request, obj)

        check = self._KubernetesEmulator__check
        yield b""
        async with self._lock:
            objs = [o for o in self._KubernetesEmulator__get_objs(request, strict=False) if not o.deleted]
            events = [{"type": "ADDED", "object": o.raw} for o in objs if matches(o.raw)]
        for event in events:
            yield event
        if request.params.get("sendInitialEvents") == "true":
            # client-go's watch-list waits for this bookmark before it trusts the initial state
            res = request.resource
            info = self.resources[res] if res in self.resources else None
            yield {"type": "BOOKMARK", "object": {
                "apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
                "kind": info.kind if info and info.kind else "Unknown",
                "metadata": {"resourceVersion": str(next(_resource_versions)),
                             "annotations": {"k8s.io/initial-events-end": "true"}}}}
        async for event in self._buses[request.resource]:
            md = event.get("object", {}).get("metadata", {})
            allowed = check(request, request.resource, md.get("namespace"), md.get("name"), strict=False)
            if allowed and matches(event["object"]):
                yield event

    async def _serve_version(self, request):
        data = await super()._serve_version(request)
        # kmock says '/v1' for the core group; client-go then drops every core kind
        data["groupVersion"] = data["groupVersion"].lstrip("/")
        for r in data["resources"]:
            if "/" in r["name"]:  # subresources carry no short names (kubectl warns otherwise)
                r["shortNames"], r["categories"] = [], []
        return data

    async def _render_error(self, exc):
        """A Status as the API server sends it; errors raised inside kmock get the API server's wording."""
        response = await super()._render_error(exc)
        body = json.loads(response.body)
        if not isinstance(exc, (ApiError, Invalid)):
            body["reason"] = {404: "NotFound", 409: "AlreadyExists"}.get(response.status, "InternalError")
            body["message"] = {404: "the server could not find the requested resource",
                               409: "object already exists"}.get(response.status, str(exc))
            log.warning("request failed: %r", exc, exc_info=exc)
        if not isinstance(exc, (ApiError, Invalid)) or "traceback" in (body.get("details") or {}):
            body.pop("details", None)
        response.body = json.dumps(body).encode()
        return response


def _default_job_selector(job: dict) -> None:
    """What the API server sets on a new Job: a selector of its own uid, and the labels that match it on its pods'
    template (kubectl logs job/NAME finds the pods by it)."""
    uid, name = job["metadata"]["uid"], job["metadata"]["name"]
    spec = job.setdefault("spec", {})
    spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
    labels.update({"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                   "batch.kubernetes.io/job-name": name, "job-name": name})


def _pod_status(pod: dict) -> str:
    """kubectl's STATUS of a pod: Terminating, else a container's waiting or terminated reason, else the phase."""
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        for state in ("waiting", "terminated"):
            reason = (container.get("state") or {}).get(state, {}).get("reason")
            if reason:
                return reason
    return (pod.get("status") or {}).get("phase", "Pending")


def _containers_ready(pod: dict) -> str:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return f"{sum(bool(c.get('ready')) for c in statuses)}/{len(pod.get('spec', {}).get('containers', []))}"


_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
# the columns `kubectl get` shows for the built-in kinds the dev cluster runs (a real server prints them too)
BUILTIN_COLUMNS = {
    ("", "v1", "pods"): [
        {"name": "Ready", "cell": _containers_ready},
        {"name": "Status", "cell": _pod_status},
        {"name": "Restarts", "type": "integer", "cell": lambda p: sum(
            c.get("restartCount", 0) for c in (p.get("status") or {}).get("containerStatuses") or [])},
        _AGE],
    ("apps", "v1", "deployments"): [
        {"name": "Ready", "cell": lambda d: f"{(d.get('status') or {}).get('readyReplicas', 0)}/"
                                            f"{d['spec'].get('replicas', 1)}"},
        {"name": "Up-to-date", "type": "integer", "cell": lambda d: (d.get("status") or {}).get("updatedReplicas", 0)},
        {"name": "Available", "type": "integer", "cell": lambda d: (d.get("status") or {}).get("availableReplicas", 0)},
        _AGE],
}


def _at(obj: dict, path: str):
    """The value at a simple .a.b.c JSONPath, or None."""
    value = obj
    for part in filter(None, path.strip(".").split(".")):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _printed(obj: dict, column: dict):
    """A printer column's cell: a simple .a.b.c JSONPath; dates as ages, like the API server prints them."""
    if "cell" in column:
        return column["cell"](obj)
    value = _at(obj, column["jsonPath"])
    if value is None:
        return None
    if column.get("type") == "date":
        then = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
        seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
        return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"
    return value


def _unchanged(current: dict, patch: dict) -> bool:
    """Whether a merge patch leaves the object as it is (its resourceVersion aside)."""
    def without_version(obj: dict) -> dict:
        return {**obj, "metadata": {k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"}}
    return without_version(_merge(copy.deepcopy(current), patch)) == without_version(current)


def _merge(base: dict, patch: dict) -> dict:
    """JSON merge patch (RFC 7386), as the emulator applies it."""
    for k, v in patch.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def kubeconfig(url: str, context: str = "cxygpt-dev") -> dict:
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": context, "cluster": {"server": url}}],
        "users": [{"name": context, "user": {"token": "dev"}}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": "default"}}],
    }


def write_kubeconfig(path: Path, url: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(kubeconfig(url)))
    return path


def load_manifests(api: KubeAPI, paths: list[Path]):
    """Preload CRDs (and any other objects) from YAML files or folders, as if applied."""
    for path in paths:
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        for file in files:
            for doc in yaml.safe_load_all(file.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    api.register_crd(doc)
                    doc.setdefault("metadata", {}).update(uid=str(uuid.uuid4()), creationTimestamp=_now(),
                                                          resourceVersion=str(next(_resource_versions)), generation=1)
                    crds = "apiextensions.k8s.io/v1/customresourcedefinitions"
                    api.objects[crds, None, doc["metadata"]["name"]] = doc


async def serve(host: str, port: int, preload: list[Path], ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None, pod_logs: Path | None = None):
    api = KubeAPI()
    api.pod_logs = pod_logs
    load_manifests(api, preload)
    async with api, kmock.Server(api, host=host, port=port) as server:
        log.info("kube API listening on %s", server.url)
        print(f"kube API listening on {server.url}", flush=True)
        if ready:
            ready.set()
        await (stop or asyncio.Event()).wait()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m cxygpt_dev.kubeapi", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--preload", type=Path, action="append", default=[], help="CRD YAML file or folder")
    ap.add_argument("--pod-logs", type=Path, help="the pod runner's container logs (<dir>/<namespace>/<pod>/"
                    "<container>.log), served as pods/log")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(a.host, a.port, a.preload, stop=stop, pod_logs=a.pod_logs)

    try:
        asyncio.run(run())
    except BaseExceptionGroup:  # kmock re-raises request errors it recorded; they were answered already
        pass


if __name__ == "__main__":
    main()
