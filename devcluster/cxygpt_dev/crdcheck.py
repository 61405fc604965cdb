"""A CRD's openAPIV3Schema applied as an API server does: defaults, structural checks, CEL rules."""
from __future__ import annotations

import copy

import celpy
import jsonschema

_IMPLICIT = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}


def to_jsonschema(schema: dict) -> dict:
    """OpenAPI v3 structural schema → JSON Schema; unknown fields are errors (kubectl's strict field
    validation), except below x-kubernetes-preserve-unknown-fields."""
    s = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k not in ("default", "nullable")}
    if schema.get("x-kubernetes-int-or-string"):
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    for bound in ("minimum", "maximum"):  # OpenAPI 3.0's boolean exclusive bounds are JSON Schema's numbers
        exclusive = f"exclusive{bound.title()}"
        if isinstance(schema.get(exclusive), bool):
            del s[exclusive]
            if schema[exclusive] and bound in s:
                s[exclusive] = s.pop(bound)
    if "properties" in schema:
        s["properties"] = {k: to_jsonschema(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            s["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        s["additionalProperties"] = to_jsonschema(schema["additionalProperties"])
    if "items" in schema:
        s["items"] = to_jsonschema(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            s[key] = [to_jsonschema(x) for x in schema[key]]
    return s


def apply_defaults(schema: dict, value):
    """Fill `default`s into objects that exist, recursively (the API server's defaulting)."""
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value:
                if name not in (schema.get("properties") or {}):
                    value[name] = apply_defaults(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in value]
    return value


class CrdValidator:
    """Checks objects of one CRD version; `check` returns (defaulted object, error messages)."""

    def __init__(self, schema: dict):
        self.schema = schema
        full = to_jsonschema(schema)
        full.setdefault("properties", {}).update(_IMPLICIT)
        self.validator = jsonschema.Draft7Validator(full)
        self.cel = celpy.Environment()
        self._programs: dict[str, object] = {}

    def check(self, obj: dict) -> tuple[dict, list[str]]:
        obj = apply_defaults(self.schema, copy.deepcopy(obj))
        errors = [f"{_path(e.absolute_path)}: Invalid value: {e.message}"
                  for e in sorted(self.validator.iter_errors(obj), key=lambda e: list(e.absolute_path))]
        if not errors:  # CEL rules assume a structurally valid object, as in the API server
            errors = self._rules(self.schema, obj, [])
        return obj, errors

    def _rules(self, schema: dict, value, path: list) -> list[str]:
        errors = []
        for rule in schema.get("x-kubernetes-validations") or []:
            if "oldSelf" in rule["rule"]:
                continue  # transition rules need the old object; creation and plain updates skip them
            if not self._holds(rule["rule"], value):
                where = ".".join(path + ([rule["fieldPath"].lstrip(".")] if rule.get("fieldPath") else [])) or "<root>"
                errors.append(f"{where}: Invalid value: {rule.get('message') or 'failed rule: ' + rule['rule']}")
        if isinstance(value, dict):
            for name, sub in (schema.get("properties") or {}).items():
                if name in value:
                    errors += self._rules(sub, value[name], path + [name])
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errors += self._rules(schema["items"], item, path[:-1] + [f"{path[-1] if path else ''}[{i}]"])
        return errors

    def _holds(self, rule: str, value) -> bool:
        if rule not in self._programs:
            self._programs[rule] = self.cel.program(self.cel.compile(rule))
        try:
            return bool(self._programs[rule].evaluate({"self": celpy.json_to_cel(value)}))
        except celpy.CELEvalError:
            return False


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"
