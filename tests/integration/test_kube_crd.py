"""The ModelDeployment CRD as the real API server applies it: defaults, every schema constraint and every CEL rule
(Kubernetes' own CEL, with its cost budget), each with a valid and an invalid object; a broken CRD is refused."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from kube import Kubectl, new_namespace

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "deploy/crds/modeldeployments.cxygpt.io.yaml"
CRD = yaml.safe_load(CRD_PATH.read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
GROUP, VERSION, PLURAL = "cxygpt.io", "v1alpha1", "modeldeployments"
CONSTRAINTS = ("minimum", "maximum", "maxLength", "minLength", "maxItems", "maxProperties", "pattern", "enum", "required",
               "format")
# a valid object where a constraint's field lives: what its required siblings need
PARENTS = {"spec.model": {"name": "m", "source": "hf://Org/Model"}, "spec.model.cache.tokenSecretRef": {"name": "hf"},
           "spec.autoscaling": {"maxReplicas": 64}, "spec.engine.env[]": {"name": "X", "value": "1"},
           "status.conditions[]": {"type": "Ready", "status": "True"},
           "status.autoscaling.recommendations[]": {"at": "2026-12-01T00:00:00Z", "replicas": 1},
           "status.autoscaling.upRecommendations[]": {"at": "2026-12-01T00:00:00Z", "replicas": 1},
           "spec.gpu": {"products": ["NVIDIA-L40S"]},
           "spec.adapters[]": {"name": "sql", "source": "hf://cxygpt-demo/qwen3-0.6b-sql-lora"}}


def _affinity_parents() -> dict:
    """Valid objects where Kubernetes' Affinity (spec.engine.affinity) has required fields."""
    expression = {"key": "a", "operator": "Exists"}
    term = {"topologyKey": "kubernetes.io/hostname"}
    node = "spec.engine.affinity.nodeAffinity"
    parents = {f"{node}.requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [expression]}]},
        f"{node}.preferredDuringSchedulingIgnoredDuringExecution[]": {"weight": 1, "preference": {
            "matchExpressions": [expression]}}}
    for where in (f"{node}.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[]",
                  f"{node}.preferredDuringSchedulingIgnoredDuringExecution[].preference"):
        parents.update({f"{where}.matchExpressions[]": expression, f"{where}.matchFields[]": expression})
    for part in ("podAffinity", "podAntiAffinity"):
        pods = f"spec.engine.affinity.{part}"
        parents.update({f"{pods}.requiredDuringSchedulingIgnoredDuringExecution[]": term,
                        f"{pods}.preferredDuringSchedulingIgnoredDuringExecution[]": {"weight": 1,
                                                                                      "podAffinityTerm": term},
                        f"{pods}.preferredDuringSchedulingIgnoredDuringExecution[].podAffinityTerm": term})
        for where in (f"{pods}.requiredDuringSchedulingIgnoredDuringExecution[]",
                      f"{pods}.preferredDuringSchedulingIgnoredDuringExecution[].podAffinityTerm"):
            parents.update({f"{where}.{selector}.matchExpressions[]": expression
                            for selector in ("labelSelector", "namespaceSelector")})
    return parents


PARENTS.update(_affinity_parents())
# a value that passes a string field's other rules (its pattern, its CEL)
SAMPLES = {"spec.model.name": "qwen3-0.6b", "spec.model.source": "hf://Qwen/Qwen3-0.6B",
           "spec.model.variants.int4": "hf://Qwen/Qwen3-14B-GPTQ-Int4", "spec.model.cache.size": "40Gi",
           "spec.engine.env[].name": "CXYGPT_SIM_ITL_MS", "spec.engine.args[]": "--seed",
           "spec.adapters[].name": "qwen3-sql", "spec.adapters[].source": "pvc://adapters/sql"}


class Server:
    """Creates (dry run, strict field validation) as `kubectl apply` would: the defaulted object, or the errors."""

    def __init__(self, kubeconfig: Path, namespace: str):
        self.api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(kubeconfig)))
        self.namespace = namespace

    def check(self, doc: dict) -> tuple[dict | None, list[str]]:
        try:
            obj = self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, doc, dry_run="All",
                                                           field_validation="Strict")
            return obj, []
        except ApiException as e:
            return None, errors_of(e)

    def check_status(self, name: str, status: dict) -> list[str]:
        try:
            self.api.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, name,
                                                           {"status": status}, dry_run="All")
            return []
        except ApiException as e:
            return errors_of(e)


def errors_of(e: ApiException) -> list[str]:
    body = json.loads(e.body)
    causes = [f"{c.get('field', '')}: {c.get('message', '')}" for c in (body.get("details") or {}).get("causes") or []]
    return causes or [body.get("message", "")]


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    admin = Kubectl(cluster.kubeconfig, cache=tmp_path_factory.mktemp("kubectl"))
    admin("apply", "-f", str(CRD_PATH))
    admin.wait_established(f"{PLURAL}.{GROUP}")
    namespace = new_namespace(admin, "crd")
    yield Server(cluster.kubeconfig, namespace)
    admin("delete", "namespace", namespace, "--wait=false")


def md(**spec) -> dict:
    base = {"model": {"name": "m", "source": "hf://Org/Model"}}
    base.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelDeployment",
            "metadata": {"name": "m"}, "spec": base}


def examples():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ModelDeployment":
                yield pytest.param(doc, id=path.name)


@pytest.mark.parametrize("doc", list(examples()))
def test_every_example_passes(server, doc):
    doc = {**doc, "metadata": {k: v for k, v in doc["metadata"].items() if k != "namespace"}}
    assert server.check(doc)[1] == []


def test_defaults_are_applied(server):
    obj, errors = server.check(md())
    assert errors == []
    spec = obj["spec"]
    assert spec["mode"] == "multi" and spec["profile"] == "auto" and spec["replicas"] == 1
    assert spec["engine"] == {"kind": "vllm", "trustRemoteCode": False} and spec["rollout"] == {"strategy": "Surge"}
    obj, _ = server.check(md(autoscaling={"maxReplicas": 4}))
    assert obj["spec"]["autoscaling"] == {"enabled": True, "minReplicas": 1, "maxReplicas": 4,
                                          "scaleDownDelaySeconds": 300, "scaleUpStabilizationSeconds": 0}
    obj, _ = server.check(md(model={"name": "m", "source": "hf://Org/Model@0123abc",
                                    "cache": {"enabled": True, "tokenSecretRef": {"name": "hf"}}}))
    assert obj["spec"]["model"]["cache"] == {"enabled": True, "accessMode": "ReadWriteOnce", "retain": False,
                                             "tokenSecretRef": {"name": "hf", "key": "token"}}


# --- every schema constraint: an object at its bound (valid) and one past it (invalid) -------------------------------

def constraints(schema: dict, path: str):
    for kind in CONSTRAINTS:
        if kind in schema:
            yield path, kind, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from constraints(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from constraints(schema["items"], f"{path}[]")


def sample(path: str, schema: dict):
    if path in SAMPLES:
        return SAMPLES[path]
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("format") == "date-time":
        return "2026-12-01T00:00:00Z"
    return {"integer": max(1, schema.get("minimum", 1)), "number": 1.5, "boolean": True, "string": "x",
            "array": [sample(f"{path}[]", schema["items"])] if "items" in schema else [],
            "object": copy.deepcopy(PARENTS.get(path, {}))}.get(kind)


def failing(pattern: str) -> str:
    return next(c for c in ("-x", "1x", "x y", "!") if not re.search(pattern, c))


def values(path: str, kind: str, schema: dict) -> tuple[object, object]:
    """(valid, invalid) for one constraint of one field; None as invalid means: leave the required field out."""
    bound = schema.get(kind)
    if kind == "minimum":
        exclusive = schema.get("exclusiveMinimum")
        return (bound + 0.25 if exclusive else bound), (bound if exclusive else bound - 1)
    if kind == "maximum":
        return bound, (bound + 0.5 if schema["type"] == "number" else bound + 1)
    if kind == "maxLength":
        return sample(path, schema), "a" * (bound + 1)
    if kind == "minLength":
        return sample(path, schema), ""
    if kind == "maxProperties":
        return {"k0": "v"}, {f"k{i}": "v" for i in range(bound + 1)}
    if kind == "maxItems":
        item = f"{path}[]"
        many = [copy.deepcopy(PARENTS.get(item)) or sample(item, schema["items"]) for _ in range(bound + 1)]
        for i, each in enumerate(many):  # unique names, so only the count is wrong
            if isinstance(each, dict) and "name" in each:
                each["name"] = f"X{i}"
        return [sample(item, schema["items"])], many
    if kind == "pattern":
        return sample(path, schema), failing(schema["pattern"])
    if kind == "enum":
        return schema["enum"][-1], "not-a-listed-value"
    if kind == "format":
        return "2026-12-01T00:00:00Z", "yesterday"
    return sample(path, schema), None  # required: the object with its required fields, then one left out


def placed(root: dict, path: str, value, kind: str, schema: dict) -> dict:
    """`root` with `value` at `path` (a list's first item for []), valid parents made on the way."""
    doc = copy.deepcopy(root)
    parts = path.replace("[]", ".[]").split(".")
    node, walked = doc, ""
    for i, part in enumerate(parts[:-1]):
        walked = f"{walked}.{part}" if walked and part != "[]" else (f"{walked}[]" if part == "[]" else part)
        nxt = parts[i + 1]
        if part == "[]":
            node = node[0]
            continue
        if part not in node:
            node[part] = [copy.deepcopy(PARENTS.get(walked + "[]", {}))] if nxt == "[]" else copy.deepcopy(
                PARENTS.get(walked, {}))
        node = node[part]
    last = parts[-1]
    if kind == "required":
        target = node[0] if last == "[]" else node.setdefault(last, copy.deepcopy(PARENTS.get(path, {})))
        if value is None:
            target.pop(schema["required"][-1], None)
        return doc
    if last == "[]":
        node[0] = value
    else:
        node[last] = value
    return doc


SPEC_CASES = [pytest.param(p, k, s, id=f"{p}:{k}") for p, k, s in constraints(SCHEMA["properties"]["spec"], "spec")]
STATUS_CASES = [pytest.param(p, k, s, id=f"{p}:{k}") for p, k, s in constraints(SCHEMA["properties"]["status"],
                                                                                 "status")]


def field_named(path: str, kind: str, schema: dict) -> str:
    shown = path.replace("[]", "[0]")
    return f"{shown}.{schema['required'][-1]}" if kind == "required" else shown


@pytest.mark.parametrize("path, kind, schema", SPEC_CASES)
def test_each_spec_constraint_passes_a_valid_object_and_refuses_an_invalid_one(server, path, kind, schema):
    valid, invalid = values(path, kind, schema)
    base = {"spec": md()["spec"]}
    good = {**md(), **placed(base, path, valid, kind, schema)}
    assert server.check(good)[1] == [], good["spec"]
    bad = {**md(), **placed(base, path, invalid, kind, schema)}
    _, errors = server.check(bad)
    assert any(field_named(path, kind, schema) in e for e in errors), (bad["spec"], errors)


@pytest.fixture(scope="module")
def stored(server):
    doc = md()
    doc["metadata"]["name"] = "stored"  # not the dry runs' name
    server.api.create_namespaced_custom_object(GROUP, VERSION, server.namespace, PLURAL, doc)
    return "stored"


@pytest.mark.parametrize("path, kind, schema", STATUS_CASES)
def test_each_status_constraint_passes_a_valid_status_and_refuses_an_invalid_one(server, stored, path, kind, schema):
    valid, invalid = values(path, kind, schema)
    good = placed({"status": {}}, path, valid, kind, schema)["status"]
    assert server.check_status(stored, good) == [], good
    bad = placed({"status": {}}, path, invalid, kind, schema)["status"]
    errors = server.check_status(stored, bad)
    assert any(field_named(path, kind, schema) in e for e in errors), (bad, errors)


# --- every CEL rule: objects it passes and objects it refuses, with its message ---------------------------------------

OWNED = "--port, --host, --served-model-name, --model and --api-key are set by the operator"
LOADERS = "--config, --tool-parser-plugin, --middleware, --worker-extension-cls and --logits-processors load flags"
RULES = {  # the rule's message: (specs it passes, specs it refuses)
    "metadata.name must be a DNS-1035 label": ([{}], ["Qwen3.14B", "a" * 64, "1abc"]),
    "spec.cacheClaim and spec.model.cache.enabled exclude each other": (
        [{"cacheClaim": "c"}, {"model": {"name": "m", "source": "hf://a/b", "cache": {"enabled": True}}}],
        [{"model": {"name": "m", "source": "hf://a/b", "cache": {"enabled": True}}, "cacheClaim": "c"}]),
    "source must be hf://<org>/<repo>[@<revision>] or pvc://<claim>/<path>": (
        [{"model": {"name": "m", "source": s}} for s in ("pvc://models.example/a/b..c/model", "pvc://m/x",
                                                         "hf://a/b@v1.2-rc")],
        [{"model": {"name": "m", "source": s}} for s in ("s3://b/k", "pvc://Bad_Claim/x", "hf://a/b@")]),
    "a pvc:// source names a claim of at most 253 characters and a path inside it with no '..' segment": (
        [{"model": {"name": "m", "source": "pvc://m/a..b"}}, {"adapters": [{"name": "a", "source": "pvc://m/a..b"}]}],
        [{"model": {"name": "m", "source": s}} for s in ("pvc://models/a/../../etc", "pvc://models/..",
                                                         "pvc://" + "a" * 254 + "/x")]
        + [{"adapters": [{"name": "a", "source": "pvc://loras/../x"}]}]),
    "variants.int4 must be hf://<org>/<repo>[@<revision>] or pvc://<claim>/<path>": (
        [{"model": {"name": "m", "source": "hf://a/b", "variants": {"int4": "hf://a/b-int4"}}}],
        [{"model": {"name": "m", "source": "hf://a/b", "variants": {"int4": "ftp://x"}}}]),
    "cache.size must be a storage quantity in Mi, Gi or Ti": (
        [{"model": {"name": "m", "source": "hf://a/b", "cache": {"size": s}}} for s in ("1.5Ti", "40Gi", "999999Mi")],
        [{"model": {"name": "m", "source": "hf://a/b", "cache": {"size": s}}}
         for s in ("lots", "0Gi", "9999999Ti", "99999999999999999999999999999Pi"[:16])]),
    "tokenSecretRef.name must be a Secret's name": (
        [{"model": {"name": "m", "source": "hf://a/b", "cache": {"tokenSecretRef": {"name": "hf-token.v2"}}}}],
        [{"model": {"name": "m", "source": "hf://a/b", "cache": {"tokenSecretRef": {"name": n}}}}
         for n in ("kube-system/hf-token", "HF")]),
    "tokenSecretRef.key must be a Secret key": (
        [{"model": {"name": "m", "source": "hf://a/b", "cache": {"tokenSecretRef": {"name": "t", "key": "hf_t.txt"}}}}],
        [{"model": {"name": "m", "source": "hf://a/b", "cache": {"tokenSecretRef": {"name": "t", "key": "a b"}}}}]),
    "acceptFallbackFrom lists namespace names or *": (
        [{"acceptFallbackFrom": ["*", "team-a"]}], [{"acceptFallbackFrom": ["team-a", "Team_B"]}]),
    "profile must be auto or one of": ([{"profile": "SRV_80G"}, {"profile": "auto"}], [{"profile": "SRV_99G"}]),
    "replicas must be >= 0": ([{"replicas": 0}], [{"replicas": -1}]),
    "autoscaling.minReplicas must be <= autoscaling.maxReplicas": (
        [{"autoscaling": {"minReplicas": 0, "maxReplicas": 1}}], [{"autoscaling": {"minReplicas": 5, "maxReplicas": 4}}]),
    "--trust-remote-code runs code from the model repository": (
        [{"engine": {"args": ["--trust-remote-code"], "trustRemoteCode": True}}, {"engine": {"trustRemoteCode": True}}],
        [{"engine": {"args": [a]}} for a in ("--trust-remote-code", "--trust_remote_code", "--trust-rem")]),
    OWNED: ([{"engine": {"args": ["--hostname-x", "--served-model-names", "--ports", "--api-server-count", "2"]}}],
            [{"engine": {"args": a}} for a in (["--port", "9000"], ["--port=9000"], ["--host", "::"],
                                               ["--served_model_name=x"], ["--model=other/model"], ["--api-k"])]),
    LOADERS: ([{"engine": {"args": ["--config-format", "auto", "--tool-call-parser", "hermes"]}}],
              [{"engine": {"args": [a]}} for a in ("--config=x.yaml", "--tool_parser_plugin=x", "--middleware",
                                                   "--worker-extension-cls=x", "--logits-processors=x")]),
    "gpu.productPolicy Require needs gpu.products": (
        [{"gpu": {"products": ["NVIDIA-L40S"], "productPolicy": "Require"}}, {"gpu": {"minMemoryMiB": 40000}}],
        [{"gpu": {"productPolicy": "Require"}}, {"gpu": {"products": [], "productPolicy": "Require"}}]),
    "resources cannot name GPUs (nvidia.com/*)": (
        [{"engine": {"resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"memory": "96Gi"}}}}],
        [{"engine": {"resources": r}} for r in ({"requests": {"nvidia.com/gpu": 2}},
                                                {"limits": {"nvidia.com/mig-3g.40gb": 1}})]),
    "podLabels cannot set the operator's labels": (
        [{"engine": {"podLabels": {"team": "search", "app.kubernetes.io/version": "1"}}}],
        [{"engine": {"podLabels": {k: "x"}}} for k in ("app.kubernetes.io/instance", "app.kubernetes.io/name",
                                                        "cxygpt.io/engine-access", "pod-template-hash")]),
    "podAnnotations cannot set cxygpt.io/* annotations": (
        [{"engine": {"podAnnotations": {"prometheus.io/scrape": "false"}}}],
        [{"engine": {"podAnnotations": {"cxygpt.io/config-hash": "0"}}}]),
    "env names must be unique": ([{"engine": {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}}],
                                 [{"engine": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}}]),
    "HF_HOME, HF_HUB_OFFLINE, HOME, CXYGPT_SIM_GPU_MEMORY_MIB and VLLM_ALLOW_RUNTIME_LORA_UPDATING are set by the "
    "operator": (
        [{"engine": {"env": [{"name": "HF_TOKEN", "value": "x"}]}}],
        [{"engine": {"env": [{"name": n, "value": "/x"}]}} for n in ("HF_HOME", "HOME", "CXYGPT_SIM_GPU_MEMORY_MIB",
                                                                     "VLLM_ALLOW_RUNTIME_LORA_UPDATING")]),
    "an adapter's name must differ from spec.model.name": (
        [{"model": {"name": "m", "source": "hf://a/b"}, "adapters": [{"name": "m-sql", "source": "hf://a/sql"}]}],
        [{"model": {"name": "m", "source": "hf://a/b"}, "adapters": [{"name": "m-sql", "source": "hf://a/sql"},
                                                                      {"name": "m", "source": "hf://a/m"}]}]),
    "adapter names must be unique": (
        [{"adapters": [{"name": "a", "source": "hf://o/a"}, {"name": "b", "source": "hf://o/a"}]}],
        # the list's map type refuses the duplicate first ("Duplicate value"); the rule says it in words too
        []),
    "an adapter's source must be hf://<org>/<repo>[@<revision>] or pvc://<claim>/<path>": (
        [{"adapters": [{"name": "a", "source": s}]} for s in ("hf://o/a@v2", "pvc://loras/sql/v1")],
        [{"adapters": [{"name": "a", "source": s}]} for s in ("s3://b/k", "hf://o", "/tmp/a", "pvc://Bad/x")]),
    "LD_* loader variables, PYTHON* interpreter variables but PYTHONUNBUFFERED": (
        [{"engine": {"env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "_X"}]}}],
        [{"engine": {"env": [{"name": n, "value": "/x"}]}} for n in ("LD_PRELOAD", "LD_AUDIT", "PYTHONPATH",
                                                                     "PYTHONWARNINGS", "GCONV_PATH", "HF_ENDPOINT",
                                                                     "VLLM_API_KEY")]),
}


def rules(schema: dict):
    for rule in schema.get("x-kubernetes-validations") or []:
        yield rule["message"]
    for sub in (schema.get("properties") or {}).values():
        yield from rules(sub)
    if isinstance(schema.get("items"), dict):
        yield from rules(schema["items"])


def test_every_rule_of_the_crd_has_cases():
    messages = list(rules(SCHEMA))
    assert len(messages) == 27
    uncovered = [m for m in messages if not any(m.startswith(key) for key in RULES)]
    assert uncovered == []


def as_doc(case) -> dict:
    if isinstance(case, str):  # a metadata.name
        doc = md()
        doc["metadata"]["name"] = case
        return doc
    return md(**case)


@pytest.mark.parametrize("message", list(RULES))
def test_each_rule_passes_its_valid_objects_and_refuses_its_invalid_ones_with_its_message(server, message):
    passing, refused = RULES[message]
    for case in passing:
        assert server.check(as_doc(case))[1] == [], case
    for case in refused:
        _, errors = server.check(as_doc(case))
        assert any(message in e for e in errors), (case, errors)


def _spellings(flag):
    """Every spelling vLLM's parser takes for `flag`: each abbreviation, with `-` or `_`, bare or with =value."""
    for end in range(1, len(flag) + 1):
        for name in {flag[:end], flag[:end].replace("-", "_")}:
            yield f"--{name}"
            yield f"--{name}=x"


@pytest.mark.parametrize("flag", ["port", "host", "served-model-name", "model", "api-key", "config",
                                  "tool-parser-plugin", "middleware", "worker-extension-cls", "logits-processors"])
def test_owned_args_are_refused_in_every_spelling_as_the_operator_refuses_them(server, flag):
    from cxygpt_operator.resolve import refused_arg
    for arg in _spellings(flag):
        assert server.check(md(engine={"args": [arg]}))[1], arg
        assert refused_arg(arg, trust_remote_code=True), arg
    for arg in _spellings("trust-remote-code"):
        assert server.check(md(engine={"args": [arg]}))[1] and refused_arg(arg, trust_remote_code=False), arg
        if arg.split("=")[0] == "--t":  # also --tool-parser-plugin's (and ambiguous to argparse)
            continue
        assert server.check(md(engine={"args": [arg], "trustRemoteCode": True}))[1] == [], arg
        assert not refused_arg(arg, True), arg


def test_a_full_autoscaling_status_fits(server, stored):
    status = {"autoscaling": {"scaler": "Operator", "active": True, "scaleFromZero": True, "target": 2.0,
                              "demand": 3.4, "gateways": "2/2", "desiredReplicas": 2,
                              "lastScaleTime": "2026-12-01T00:00:00Z", "reason": "ScaledUp", "message": "1 -> 2",
                              "recommendations": [{"at": "2026-12-01T00:00:00Z", "replicas": 2}]}}
    assert server.check_status(stored, status) == []


def test_a_duplicate_adapter_name_is_refused(server):
    """The list is a map keyed by name: a second entry of a name is refused whatever its source."""
    _, errors = server.check(md(adapters=[{"name": "a", "source": "hf://o/a"}, {"name": "a", "source": "hf://o/b"}]))
    assert any("spec.adapters[1]" in e and "Duplicate value" in e for e in errors), errors


def test_an_unknown_field_is_refused(server):
    _, errors = server.check(md(modee="single"))
    assert any('unknown field "spec.modee"' in e for e in errors), errors


# --- the CRD itself -----------------------------------------------------------------------------------------------------

def _spec_props(crd: dict) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


@pytest.mark.parametrize("breakage, message", [
    (lambda c: _spec_props(c)["replicas"].pop("type"), "properties[replicas].type: Required value"),
    (lambda c: _spec_props(c)["model"].update(additionalProperties=False),
     "additionalProperties and properties are mutual exclusive"),
    (lambda c: _spec_props(c)["mode"].update(anyOf=[{"type": "string", "description": "x"}]),
     "anyOf[0].description: Forbidden"),
    (lambda c: _spec_props(c)["replicas"]["x-kubernetes-validations"][0].update(rule="self >= '0'"),
     "compilation failed"),
    (lambda c: c["spec"]["versions"][0].update(printerColumns=[]), 'unknown field "spec.versions[0].printerColumns"'),
])
def test_the_server_refuses_a_broken_crd(cluster, tmp_path, breakage, message):
    crd = copy.deepcopy(CRD)
    breakage(crd)
    out = Kubectl(cluster.kubeconfig, cache=tmp_path).run("apply", "--dry-run=server", "-f", "-",
                                                          stdin=yaml.safe_dump(crd), check=False)
    assert out.returncode != 0 and message in out.stderr, out.stderr
