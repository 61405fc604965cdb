"""Writes the CRD's schemas of Kubernetes' own types (spec.engine.affinity, spec.engine.tolerations) from the
Kubernetes release the tests run (kubernetes-validate's JSON schemas), as structural schemas; --check only compares."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CRD = REPO / "deploy/crds/modeldeployments.cxygpt.io.yaml"
KUBERNETES = "v1.37.0"
BEGIN = re.compile(r"^(?P<indent> *)# generated: (?P<type>io\.k8s\.[\w.]+) by scripts/crd_pod_schemas\.py\b.*$")
END = "# end generated"


def _definitions() -> dict:
    import kubernetes_validate
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"{KUBERNETES}-local-strict"
    return json.loads((root / "_definitions.json").read_text())["$defs"]


def structural(schema: dict, defs: dict) -> dict:
    """A JSON schema of the release as a CRD's structural schema: references inlined, `null` types and formats
    dropped (the API server checks the objects the operator makes from them), no additionalProperties: false (the
    API server refuses unknown fields by itself)."""
    if "$ref" in schema:
        target = structural(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {**target, **({"description": schema["description"]} if "description" in schema else {})}
    out: dict = {}
    for key, value in schema.items():
        if key in ("$schema", "$id", "format") or (key == "additionalProperties" and value is False):
            continue
        if key == "type":
            kinds = [value] if isinstance(value, str) else [v for v in value if v != "null"]
            out["type"] = kinds[0]
        elif key == "description":
            out["description"] = " ".join(value.split())
        elif key == "properties":
            out["properties"] = {name: structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = structural(value, defs)
        else:
            out[key] = value
    return out


def block(type_name: str, indent: str, defs: dict) -> list[str]:
    schema = structural(defs[type_name], defs)
    schema.pop("description", None)  # the field's own description, beside the marker, says what it is for here
    text = yaml.safe_dump(schema, sort_keys=False, width=10_000, allow_unicode=True)
    return [f"{indent}{line}" for line in text.splitlines()]


def rewrite(text: str, defs: dict) -> str:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        out.append(lines[i])
        begin = BEGIN.match(lines[i])
        i += 1
        if not begin:
            continue
        while i < len(lines) and lines[i].strip() != END:
            i += 1
        out += block(begin["type"], begin["indent"], defs)
        out.append(lines[i])
        i += 1
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    current = CRD.read_text()
    wanted = rewrite(current, _definitions())
    if "--check" in argv:
        if wanted != current:
            print(f"{CRD.relative_to(REPO)}: Kubernetes' schemas are stale: run python scripts/crd_pod_schemas.py",
                  file=sys.stderr)
            return 1
        return 0
    CRD.write_text(wanted)
    print(f"wrote {CRD.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
