"""Writes docs/crd-reference.md from the CRD schema (a test keeps the committed file in step)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CRD = REPO / "deploy/crds/modeldeployments.cxygpt.io.yaml"
OUT = REPO / "docs/crd-reference.md"
# fields whose schema is Kubernetes' own type (scripts/crd_pod_schemas.py): one row, not one per field of the type
KUBERNETES_TYPES = {"spec.engine.affinity": "core/v1 Affinity", "spec.engine.tolerations": "core/v1 Toleration"}


def _type(schema: dict) -> str:
    if schema.get("type") == "array":
        return f"[]{_type(schema.get('items', {}))}"
    return schema.get("type", "object" if schema.get("properties") else "any")


def _rows(schema: dict, path: str, required: set[str]):
    for name, sub in (schema.get("properties") or {}).items():
        field = f"{path}.{name}" if path else name
        rules = []
        if "enum" in sub:
            rules.append("one of " + ", ".join(f"`{v}`" for v in sub["enum"]))
        if "default" in sub:
            rules.append(f"default `{json.dumps(sub['default'])}`")
        for key, word in (("minimum", "min"), ("maximum", "max"), ("maxLength", "max length"),
                          ("maxItems", "max items"), ("maxProperties", "max entries"), ("pattern", "pattern")):
            if key in sub:
                exclusive = key in ("minimum", "maximum") and sub.get(f"exclusive{key.title()}") is True
                rules.append(f"{word} `{sub[key]}`{' (exclusive)' if exclusive else ''}")
        rules += [rule["message"] for rule in sub.get("x-kubernetes-validations") or []]
        description = " ".join((sub.get("description") or "").split())
        if field in KUBERNETES_TYPES:
            rules.append(f"Kubernetes' {KUBERNETES_TYPES[field]}: `kubectl explain modeldeployment.{field}`")
        yield (f"| `{field}` | {_type(sub)} | {'yes' if name in required else ''} | "
               f"{description}{' — ' + '; '.join(rules) if rules else ''} |")
        if field in KUBERNETES_TYPES:
            continue
        target = sub.get("items") if sub.get("type") == "array" else sub
        if isinstance(target, dict) and target.get("properties"):
            inner = f"{field}[]" if sub.get("type") == "array" else field
            yield from _rows(target, inner, set(target.get("required", [])))


def render() -> str:
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    columns = version["additionalPrinterColumns"]
    lines = [f"# {crd['spec']['names']['kind']} ({crd['spec']['group']}/{version['name']}) reference", "",
             "Generated from `deploy/crds/` by `python scripts/crd_reference.py`; do not edit by hand.", "",
             " ".join(schema["description"].split()), "",
             f"Short name: `{crd['spec']['names']['shortNames'][0]}`. `kubectl get md` columns: "
             + ", ".join(c["name"].upper() for c in columns if not c.get("priority")) + "; with `-o wide` also "
             + ", ".join(c["name"].upper() for c in columns if c.get("priority")) + ".", ""]
    for part in ("spec", "status"):
        sub = schema["properties"][part]
        lines += [f"## {part}", "", " ".join(sub.get("description", "").split()), "",
                  "| field | type | required | description |", "|---|---|---|---|",
                  *_rows(sub, part, set(sub.get("required", []))), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(REPO)}", file=sys.stderr)
