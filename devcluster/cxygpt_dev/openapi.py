"""OpenAPI v2/v3 documents of the in-memory API: the built-in kinds' schemas (kubernetes-validate's) and the CRDs'."""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import re

from kubernetes_validate import utils as kv

OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# kubectl asks the v3 document whether a kind's PATCH takes fieldValidation; if it does, kubectl leaves
# validation to the server (which here checks CRs against their schema) instead of validating client-side.
_PARAMETERS = [{"name": n, "in": "query", "schema": {"type": "string"}}
               for n in ("dryRun", "fieldManager", "fieldValidation", "force")]


@functools.cache
def builtin_definitions() -> dict[str, dict]:
    """The Kubernetes API definitions of the newest version kubernetes-validate ships, as OpenAPI schemas."""
    version = kv.latest_version()
    defs = kv.schema_contents(f"kubernetes-json-schema/v{version}-local/_definitions.json", version)["$defs"]
    return {name: _openapi_schema(schema) for name, schema in defs.items()}


def _openapi_schema(node):
    """JSON Schema → OpenAPI: `type: [t, "null"]` becomes `type: t`; $defs references become components."""
    if isinstance(node, list):
        return [_openapi_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "type" and isinstance(value, list):
            types = [t for t in value if t != "null"]
            value = types[0] if len(types) == 1 else types
        elif key == "$ref" and isinstance(value, str):
            value = value.replace("#/$defs/", "#/components/schemas/")
        out[key] = _openapi_schema(value)
    return out


def _gvks(schema: dict) -> list[tuple[str, str, str]]:
    return [(g.get("group", ""), g["version"], g["kind"]) for g in schema.get("x-kubernetes-group-version-kind", [])]


def _refs(node, found: set[str]):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            if name not in found:
                found.add(name)
                _refs(builtin_definitions().get(name), found)
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def crd_schema_name(group: str, version: str, kind: str) -> str:
    """The definition name the API server gives a custom resource: reversed group, version, kind."""
    return ".".join([*reversed(group.split(".")), version, kind])


class Documents:
    """The schemas of the kinds the API serves, grouped by group-version, rendered as OpenAPI v2 and v3."""

    def __init__(self):
        self.crds: dict[tuple[str, str], dict] = {}  # (group/version, definition name) → schema

    def add_crd(self, group: str, version: str, kind: str, schema: dict):
        schema = copy.deepcopy(schema)
        schema["x-kubernetes-group-version-kind"] = [{"group": group, "version": version, "kind": kind}]
        schema.setdefault("properties", {})["metadata"] = {"$ref": f"#/components/schemas/{OBJECT_META}",
                                                          "description": "Standard object's metadata."}
        self.crds[f"{group}/{version}", crd_schema_name(group, version, kind)] = schema
        self.group_version.cache_clear()

    def _served(self, resources) -> dict[str, list[tuple[str, str, bool, str]]]:
        """group/version → [(kind, plural, namespaced, definition name)] for every served kind with a schema."""
        names = {gvk: name for name, schema in builtin_definitions().items() for gvk in _gvks(schema)}
        for (_gv, name), schema in self.crds.items():
            names.update({gvk: name for gvk in _gvks(schema)})
        served: dict[str, list] = {}
        for resource in resources:
            info = resources[resource]
            name = names.get((resource.group, resource.version, info.kind))
            if name and info.kind:
                gv = f"{resource.group}/{resource.version}" if resource.group else resource.version
                served.setdefault(gv, []).append((info.kind, resource.plural, bool(info.namespaced), name))
        return served

    @staticmethod
    def _path(gv: str) -> str:
        return f"api/{gv}" if "/" not in gv else f"apis/{gv}"

    def root(self, resources) -> dict:
        paths = {}
        for gv in sorted(self._served(resources)):
            digest = hashlib.sha256(json.dumps(self._document(resources, gv), sort_keys=True).encode()).hexdigest()
            paths[self._path(gv)] = {"serverRelativeURL": f"/openapi/v3/{self._path(gv)}?hash={digest[:32].upper()}"}
        return {"paths": paths}

    def _document(self, resources, gv: str) -> dict | None:
        kinds = self._served(resources).get(gv)
        if not kinds:
            return None
        return self.group_version(gv, tuple(sorted(kinds)))

    def document(self, resources, path: str) -> dict | None:
        """The v3 document of one `api/v1` or `apis/<group>/<version>` path."""
        gv = re.sub(r"^apis?/", "", path.strip("/"))
        return self._document(resources, gv)

    @functools.cache  # noqa: B019 -- one instance per API server process: what it keeps alive lives as long anyway
    def group_version(self, gv: str, kinds: tuple) -> dict:
        schemas, paths = {}, {}
        group, version = gv.split("/") if "/" in gv else ("", gv)
        for kind, plural, namespaced, name in kinds:
            schema = self.crds.get((gv, name)) or builtin_definitions()[name]
            schemas[name] = schema
            found: set[str] = set()
            _refs(schema, found)
            schemas.update({n: builtin_definitions()[n] for n in found})
            base = f"/{self._path(gv)}" + ("/namespaces/{namespace}" if namespaced else "") + f"/{plural}/{{name}}"
            body = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}
            gvk = {"group": group, "version": version, "kind": kind}
            paths[base] = {
                "get": {"x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk,
                        "responses": {"200": body}},
                "put": {"x-kubernetes-action": "put", "x-kubernetes-group-version-kind": gvk,
                        "parameters": _PARAMETERS, "requestBody": body, "responses": {"200": body}},
                "patch": {"x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk,
                          "parameters": _PARAMETERS, "responses": {"200": body}},
            }
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.37.0"}, "paths": paths,
                "components": {"schemas": schemas}}

    def swagger(self, resources) -> dict:
        """OpenAPI v2 (JSON) with every served kind's definition."""
        definitions = {}
        for gv, kinds in self._served(resources).items():
            doc = self.group_version(gv, tuple(sorted(kinds)))
            definitions.update(doc["components"]["schemas"])
        text = json.dumps(definitions).replace("#/components/schemas/", "#/definitions/")
        return {"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.37.0"}, "paths": {},
                "definitions": json.loads(text)}
