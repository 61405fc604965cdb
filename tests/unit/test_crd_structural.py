"""Every CRD under deploy/crds/ as a real API server checks it: JSONSchemaProps fields only, structural schemas."""
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = sorted((REPO / "deploy/crds").glob("*.yaml"))

# apiextensions.k8s.io/v1 JSONSchemaProps, less what v1 CRDs forbid ($ref, definitions, id, $schema,
# patternProperties, dependencies, additionalItems)
SCHEMA_FIELDS = {
    "description", "type", "format", "title", "default", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "multipleOf", "enum",
    "maxProperties", "minProperties", "required", "items", "allOf", "oneOf", "anyOf", "not", "properties",
    "additionalProperties", "externalDocs", "example", "nullable", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource", "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys",
    "x-kubernetes-list-type", "x-kubernetes-map-type", "x-kubernetes-validations"}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}
RULE_FIELDS = {"rule", "message", "messageExpression", "reason", "fieldPath", "optionalOldSelf"}
# inside allOf/anyOf/oneOf/not: no description, type, default, additionalProperties, nullable
JUNCTOR_FORBIDDEN = {"description", "type", "default", "additionalProperties", "nullable"}
CRD_FIELDS = {"apiVersion", "kind", "metadata", "spec"}
SPEC_FIELDS = {"group", "names", "scope", "versions", "conversion", "preserveUnknownFields"}
NAMES_FIELDS = {"plural", "singular", "kind", "listKind", "shortNames", "categories"}
VERSION_FIELDS = {"name", "served", "storage", "deprecated", "deprecationWarning", "schema", "subresources",
                  "additionalPrinterColumns", "selectableFields"}
COLUMN_FIELDS = {"name", "type", "format", "description", "priority", "jsonPath"}


def schema_errors(schema: dict, path: str, *, in_junctor: bool = False, typed_required: bool = True) -> list[str]:
    """Kubernetes' structural-schema rules and allowed fields, for one node and everything below it."""
    errors = [f"{path}: {key!r} is not a JSONSchemaProps field" for key in schema if key not in SCHEMA_FIELDS]
    exempt = schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields")
    if in_junctor:
        errors += [f"{path}: {key} must not be set inside allOf/anyOf/oneOf/not" for key in JUNCTOR_FORBIDDEN & set(schema)
                   if not schema.get("x-kubernetes-int-or-string")]
    elif typed_required and not exempt and schema.get("type") not in TYPES:
        errors.append(f"{path}: every node needs a type (got {schema.get('type')!r})")
    if schema.get("uniqueItems"):
        errors.append(f"{path}: uniqueItems: true is forbidden (quadratic)")
    if schema.get("x-kubernetes-preserve-unknown-fields") is False:
        errors.append(f"{path}: x-kubernetes-preserve-unknown-fields must be true or absent")
    if "properties" in schema and "additionalProperties" in schema:
        errors.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if schema.get("additionalProperties") is False:
        errors.append(f"{path}: additionalProperties: false is forbidden (pruning drops unknown fields)")
    if schema.get("type") in ("object", "array") and "enum" in schema:
        errors.append(f"{path}: enum on an {schema['type']}")
    for i, rule in enumerate(schema.get("x-kubernetes-validations") or []):
        errors += [f"{path}: x-kubernetes-validations[{i}]: {key!r} is not a rule field" for key in rule
                   if key not in RULE_FIELDS]
        if "rule" not in rule or not (rule.get("message") or rule.get("messageExpression")):
            errors.append(f"{path}: x-kubernetes-validations[{i}] needs a rule and a human message")
    if schema.get("x-kubernetes-list-type") not in (None, "atomic", "set", "map"):
        errors.append(f"{path}: x-kubernetes-list-type {schema['x-kubernetes-list-type']!r}")
    if schema.get("x-kubernetes-list-type") == "map":
        items = schema.get("items") or {}
        keys = schema.get("x-kubernetes-list-map-keys") or []
        if items.get("type") != "object" or not keys:
            errors.append(f"{path}: a map list needs object items and x-kubernetes-list-map-keys")
        errors += [f"{path}: map key {k!r} must be required or defaulted" for k in keys
                   if k not in (items.get("required") or []) and "default" not in (items.get("properties") or {}).get(k, {})]
    for name, sub in (schema.get("properties") or {}).items():
        errors += schema_errors(sub, f"{path}.{name}", in_junctor=in_junctor)
    if isinstance(schema.get("additionalProperties"), dict):
        errors += schema_errors(schema["additionalProperties"], f"{path}.*", in_junctor=in_junctor)
    if "items" in schema:
        if not isinstance(schema["items"], dict):
            errors.append(f"{path}: items must be one schema")
        else:
            errors += schema_errors(schema["items"], f"{path}[]", in_junctor=in_junctor)
    for junctor in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(schema.get(junctor) or []):
            errors += schema_errors(sub, f"{path}.{junctor}[{i}]", in_junctor=True)
    if "not" in schema:
        errors += schema_errors(schema["not"], f"{path}.not", in_junctor=True)
    return errors


def metadata_errors(schema: dict) -> list[str]:
    """Only metadata.name and metadata.generateName may be restricted, and only with type string."""
    meta = (schema.get("properties") or {}).get("metadata")
    if meta is None:
        return []
    errors = [f"metadata: {key!r} is not allowed" for key in meta if key not in ("type", "properties")]
    for name, sub in (meta.get("properties") or {}).items():
        if name not in ("name", "generateName"):
            errors.append(f"metadata.{name}: only name and generateName may be restricted")
    return errors


def crd_errors(crd: dict) -> list[str]:
    errors = [f"{k!r} is not a CustomResourceDefinition field" for k in crd if k not in CRD_FIELDS]
    spec = crd.get("spec") or {}
    errors += [f"spec: {k!r} is not a field" for k in spec if k not in SPEC_FIELDS]
    errors += [f"spec.names: {k!r} is not a field" for k in spec.get("names") or {} if k not in NAMES_FIELDS]
    for version in spec.get("versions") or []:
        where = f"versions[{version.get('name')}]"
        errors += [f"{where}: {k!r} is not a field" for k in version if k not in VERSION_FIELDS]
        for column in version.get("additionalPrinterColumns") or []:
            errors += [f"{where}.additionalPrinterColumns: {k!r} is not a field" for k in column if k not in COLUMN_FIELDS]
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            errors.append(f"{where}: no openAPIV3Schema")
            continue
        if schema.get("type") != "object":
            errors.append(f"{where}: the root must be type object")
        errors += schema_errors(schema, f"{where}.openAPIV3Schema") + metadata_errors(schema)
    return errors


@pytest.mark.parametrize("path", CRDS, ids=lambda p: p.name)
def test_crd_is_structural_with_known_fields_only(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs and all(d.get("kind") == "CustomResourceDefinition" for d in docs)
    for crd in docs:
        assert crd_errors(crd) == []


def _crd():
    return yaml.safe_load(CRDS[0].read_text())


def _spec_props(crd):
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


@pytest.mark.parametrize("breakage, message", [
    (lambda c: _spec_props(c)["engine"]["properties"]["args"]["items"].update({"e.g. --x.": None}),
     "'e.g. --x.' is not a JSONSchemaProps field"),
    (lambda c: _spec_props(c)["replicas"].pop("type"), "every node needs a type"),
    (lambda c: _spec_props(c)["mode"].update(uniqueItems=True), "uniqueItems"),
    (lambda c: _spec_props(c)["model"].update(additionalProperties=False), "additionalProperties: false"),
    (lambda c: _spec_props(c)["mode"].update(anyOf=[{"type": "string", "description": "x"}]), "inside allOf"),
    (lambda c: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"].update(
        metadata={"type": "object", "properties": {"labels": {"type": "object"}}}), "only name and generateName"),
    (lambda c: _spec_props(c)["replicas"]["x-kubernetes-validations"][0].pop("message"), "human message"),
    (lambda c: c["spec"]["versions"][0].update(printerColumns=[]), "'printerColumns' is not a field"),
])
def test_the_walk_catches_what_a_server_refuses(breakage, message):
    crd = _crd()
    breakage(crd)
    assert any(message in e for e in crd_errors(crd)), crd_errors(crd)
