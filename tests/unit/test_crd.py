"""The ModelDeployment CRD as a file: it agrees with profiles.yaml, documents every field, prints its columns (what the
API server makes of it: tests/integration/test_kube_crd.py)."""
from pathlib import Path

import yaml

from cxygpt_profiles import default_table

REPO = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((REPO / "deploy/crds/modeldeployments.cxygpt.io.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def test_profile_rule_lists_exactly_the_table():
    rule = SCHEMA["properties"]["spec"]["properties"]["profile"]["x-kubernetes-validations"][0]
    names = ["auto", *default_table().names]
    assert rule["rule"] == "self in [" + ", ".join(f"'{n}'" for n in names) + "]"
    assert rule["message"].endswith(", ".join(default_table().names))


def _walk(schema, path):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


def test_every_spec_field_is_documented():
    # a list of strings is documented by the list's own description (kubectl explain shows no page for its items)
    missing = [p for p, s in _walk(SCHEMA["properties"]["spec"], "spec")
               if not s.get("description") and not (p.endswith("[]") and s.get("type") in ("string", "integer"))]
    assert missing == []


def test_kubernetes_own_types_are_kubernetes_schemas():
    """spec.engine.affinity and .tolerations are Kubernetes' own Affinity and Toleration, as the release the tests
    run has them (scripts/crd_pod_schemas.py writes them)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(REPO / "scripts/crd_pod_schemas.py"), "--check"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    engine = SCHEMA["properties"]["spec"]["properties"]["engine"]["properties"]
    assert set(engine["affinity"]["properties"]) == {"nodeAffinity", "podAffinity", "podAntiAffinity"}
    assert set(engine["tolerations"]["items"]["properties"]) == {"effect", "key", "operator", "tolerationSeconds",
                                                                 "value"}


def test_subresources_printer_columns_and_short_name():
    assert VERSION["subresources"]["status"] == {}
    assert VERSION["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    columns = VERSION["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == ["Model", "Profile", "GPU", "Ready", "Phase", "Age"]
    assert [c["name"] for c in columns if c.get("priority")] == ["Adapters"]  # kubectl get -o wide
    assert CRD["spec"]["names"]["shortNames"] == ["md"]


def test_crd_reference_doc_is_generated_from_the_schema():
    import importlib.util
    spec = importlib.util.spec_from_file_location("crd_reference", REPO / "scripts/crd_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs/crd-reference.md").read_text() == module.render(), \
        "docs/crd-reference.md is stale: run python scripts/crd_reference.py"
