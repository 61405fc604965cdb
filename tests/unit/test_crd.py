"""The ModelDeployment CRD: examples pass it, bad specs fail with human messages, it agrees with profiles.yaml."""
from pathlib import Path

import pytest
import yaml

from cxygpt_dev.crdcheck import CrdValidator
from cxygpt_profiles import default_table

REPO = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((REPO / "deploy/crds/modeldeployments.cxygpt.io.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
VALIDATOR = CrdValidator(SCHEMA)


def examples():
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ModelDeployment":
                yield pytest.param(doc, id=path.name)


@pytest.mark.parametrize("doc", list(examples()))
def test_every_example_passes_the_schema(doc):
    _, errors = VALIDATOR.check(doc)
    assert errors == []


def _md(**spec):
    base = {"model": {"name": "m", "source": "hf://Org/Model"}}
    base.update(spec)
    return {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "m", "namespace": "default"}, "spec": base}


def test_defaults_are_applied():
    obj, errors = VALIDATOR.check(_md())
    assert errors == []
    assert obj["spec"]["mode"] == "multi" and obj["spec"]["profile"] == "auto" and obj["spec"]["replicas"] == 1
    assert obj["spec"]["engine"] == {"kind": "vllm", "trustRemoteCode": False}


@pytest.mark.parametrize("spec, message", [
    ({"replicas": -1}, "spec.replicas: Invalid value: replicas must be >= 0"),
    ({"profile": "SRV_99G"}, "spec.profile: Invalid value: profile must be auto or one of"),
    ({"model": {"name": "m", "source": "s3://b/k"}}, "spec.model.source: Invalid value: source must be hf://"),
    ({"model": {"name": "m", "source": "pvc://Bad_Claim/x"}}, "source must be hf://<org>/<repo>[@<revision>] or pvc://"),
    ({"mode": "solo"}, "spec.mode: Invalid value: 'solo' is not one of ['single', 'multi']"),
    ({"modee": "single"}, "'modee' was unexpected"),
    ({"engine": {"kind": "tgi"}}, "spec.engine.kind"),
    ({"model": {"name": "m"}}, "'source' is a required property"),
    ({"model": {"name": "m", "source": "hf://a/b", "variants": {"int4": "ftp://x"}}}, "variants.int4 must be"),
    ({"routing": {"policy": "random"}}, "spec.routing.policy: Invalid value: 'random' is not one of"),
    ({"routing": {"epsilon": 0}}, "spec.routing.epsilon"),
    ({"routing": {"epsilon": 4.5}}, "spec.routing.epsilon"),
    ({"model": {"name": "m", "source": "pvc://models/a/../../etc"}}, "a path inside it with no '..' segment"),
    ({"model": {"name": "m", "source": "pvc://models/.."}}, "a path inside it with no '..' segment"),
    ({"model": {"name": "m", "source": "pvc://" + "a" * 254 + "/x"}}, "a claim of at most 253 characters"),
    ({"model": {"name": "m", "source": "hf://a/b@"}}, "source must be hf://<org>/<repo>[@<revision>]"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"size": "lots"}}}, "cache.size must be a storage quantity"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"accessMode": "ReadOnlyMany"}}}, "spec.model.cache.accessMode"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"enabled": True}}, "cacheClaim": "c"},
     "spec.cacheClaim and spec.model.cache.enabled exclude each other"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"tokenSecretRef": {"key": "k"}}}}, "'name' is a required"),
    # sizes and names bounded at admission: an absurd size overflowed the download Job's deadline, a
    # namespace/name Secret failed only later
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"size": "99999999999999999999999999999Pi"}}},
     "spec.model.cache.size"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"size": "9999999Ti"}}}, "at most 6 digits"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"size": "0Gi"}}}, "cache.size must be"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"tokenSecretRef": {"name": "kube-system/hf-token"}}}},
     "without a namespace/ prefix"),
    ({"model": {"name": "m", "source": "hf://a/b", "cache": {"tokenSecretRef": {"name": "t", "key": "a b"}}}},
     "tokenSecretRef.key must be a Secret key"),
    ({"acceptFallbackFrom": ["team-a", "Team_B"]}, "acceptFallbackFrom lists namespace names or *"),
    ({"acceptFallbackFrom": [f"ns{i}" for i in range(65)]}, "spec.acceptFallbackFrom"),
])
def test_bad_specs_fail_with_a_message_naming_the_field(spec, message):
    _, errors = VALIDATOR.check(_md(**spec))
    assert any(message in e for e in errors), errors


def test_bounded_sizes_names_and_fallback_namespaces_that_pass():
    for size in ("40Gi", "1.5Ti", "500M", "999999Mi"):
        assert VALIDATOR.check(_md(model={"name": "m", "source": "hf://a/b", "cache": {"size": size}}))[1] == []
    secret = {"name": "hf-token.v2", "key": "hf_token.txt"}
    assert VALIDATOR.check(_md(model={"name": "m", "source": "hf://a/b", "cache": {"tokenSecretRef": secret}}))[1] == []
    assert VALIDATOR.check(_md(acceptFallbackFrom=["*", "team-a"]))[1] == []


def test_routing_takes_a_policy_and_an_epsilon_above_0_up_to_4():
    for routing in ({"policy": "prefix", "epsilon": 0.25}, {"policy": "least-load"}, {"epsilon": 4}, {}):
        obj, errors = VALIDATOR.check(_md(routing=routing))
        assert errors == [] and obj["spec"]["routing"] == routing  # no defaults: the gateway's apply


def test_cache_defaults_and_sources_that_pass():
    obj, errors = VALIDATOR.check(_md(model={"name": "m", "source": "hf://Org/Model@0123abc",
                                            "cache": {"enabled": True, "tokenSecretRef": {"name": "hf"}}}))
    assert errors == []
    assert obj["spec"]["model"]["cache"] == {"enabled": True, "accessMode": "ReadWriteOnce", "retain": False,
                                             "tokenSecretRef": {"name": "hf", "key": "token"}}
    for source in ("pvc://models.example/a/b..c/model", "pvc://m/x", "hf://a/b@v1.2-rc"):
        assert VALIDATOR.check(_md(model={"name": "m", "source": source}))[1] == [], source
    assert VALIDATOR.check(_md(model={"name": "m", "source": "hf://a/b"}, cacheClaim="c"))[1] == []


def test_name_must_be_a_dns_label():
    doc = _md()
    doc["metadata"]["name"] = "Qwen3.14B"
    _, errors = VALIDATOR.check(doc)
    assert errors and "DNS-1035" in errors[0]


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
    missing = [p for p, s in _walk(SCHEMA["properties"]["spec"], "spec") if not s.get("description")]
    assert missing == []


def test_subresources_printer_columns_and_short_name():
    assert VERSION["subresources"]["status"] == {}
    assert VERSION["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert [c["name"] for c in VERSION["additionalPrinterColumns"]] == ["Model", "Profile", "GPU", "Ready", "Phase", "Age"]
    assert CRD["spec"]["names"]["shortNames"] == ["md"]


def test_crd_reference_doc_is_generated_from_the_schema():
    import importlib.util
    spec = importlib.util.spec_from_file_location("crd_reference", REPO / "scripts/crd_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs/crd-reference.md").read_text() == module.render(), \
        "docs/crd-reference.md is stale: run python scripts/crd_reference.py"


def _engine(**engine):
    return _md(engine=engine)


@pytest.mark.parametrize("args", [
    ["--port", "9000"], ["--port=9000"], ["--host", "::"], ["--served-model-name", "x"], ["--served_model_name=x"],
    ["--model", "other/model"], ["--model=other/model"],
])
def test_args_the_operator_owns_are_refused(args):
    _, errors = VALIDATOR.check(_engine(args=args))
    assert any("spec.engine.args: Invalid value: --port, --host, --served-model-name, --model and --api-key are set by the operator"
               in e for e in errors), errors


def test_remote_code_needs_the_explicit_field():
    for arg in ("--trust-remote-code", "--trust_remote_code"):
        _, errors = VALIDATOR.check(_engine(args=[arg]))
        assert any("set spec.engine.trustRemoteCode: true" in e for e in errors), errors
    assert VALIDATOR.check(_engine(args=["--trust-remote-code"], trustRemoteCode=True))[1] == []
    assert VALIDATOR.check(_engine(trustRemoteCode=True))[1] == []


def _spellings(flag):
    """Every spelling vLLM's parser takes for `flag`: each abbreviation, with `-` or `_`, bare or with =value."""
    for end in range(1, len(flag) + 1):
        for name in {flag[:end], flag[:end].replace("-", "_")}:
            yield f"--{name}"
            yield f"--{name}=x"


@pytest.mark.parametrize("flag", ["port", "host", "served-model-name", "model", "api-key", "config",
                                  "tool-parser-plugin", "middleware", "worker-extension-cls", "logits-processors"])
def test_owned_args_are_refused_in_every_spelling_as_parse_spec_does(flag):
    from cxygpt_operator.resolve import refused_arg
    for arg in _spellings(flag):
        assert VALIDATOR.check(_engine(args=[arg]))[1], arg
        assert refused_arg(arg, trust_remote_code=True), arg
    for arg in _spellings("trust-remote-code"):
        assert VALIDATOR.check(_engine(args=[arg]))[1] and refused_arg(arg, trust_remote_code=False), arg
        if arg.split("=")[0] == "--t":  # also --tool-parser-plugin's (and ambiguous to argparse)
            continue
        assert VALIDATOR.check(_engine(args=[arg], trustRemoteCode=True))[1] == [] and not refused_arg(arg, True), arg


def test_other_args_pass():
    ok = ["--enable-prefix-caching", "--max-model-len", "8192", "--model-loader-extra-config={}", "--hostname-x",
          "--tensor-parallel-size", "2", "--seed", "1", "--hf-token", "x", "--tokenizer", "t", "--trust-request-chat-template",
          "-O3", "8192", "--served-model-names", "--ports", "--config-format", "auto", "--tool-call-parser", "hermes",
          "--api-server-count", "2"]
    from cxygpt_operator.resolve import refused_arg
    assert VALIDATOR.check(_engine(args=ok))[1] == []
    assert [a for a in ok if refused_arg(a, trust_remote_code=False)] == []


@pytest.mark.parametrize("env, message", [
    ([{"name": "1BAD"}], "does not match"),
    ([{"name": "A-B"}], "does not match"),
    ([{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "env names must be unique"),
    ([{"name": "HF_HOME", "value": "/x"}], "are set by the operator"),
    ([{"name": "HOME", "value": "/x"}], "are set by the operator"),
    ([{"name": "LD_PRELOAD", "value": "/x.so"}], "LD_* loader variables"),
    ([{"name": "LD_AUDIT", "value": "/x.so"}], "LD_* loader variables"),
    ([{"name": "PYTHONPATH", "value": "/x"}], "LD_* loader variables"),
    ([{"name": "PYTHONWARNINGS", "value": "ignore::mod.W"}], "PYTHON* interpreter variables"),
    ([{"name": "PYTHONUSERBASE", "value": "/x"}], "PYTHON* interpreter variables"),
    ([{"name": "GCONV_PATH", "value": "/x"}], "GCONV_PATH"),
    ([{"name": "HF_ENDPOINT", "value": "http://elsewhere"}], "HF_ENDPOINT"),
])
def test_bad_env_is_refused(env, message):
    _, errors = VALIDATOR.check(_engine(env=env))
    assert any(message in e for e in errors), errors


def test_good_env_passes():
    env = [{"name": "HF_TOKEN", "value": "x"}, {"name": "CXYGPT_SIM_ITL_MS", "value": "50"}, {"name": "_X"},
           {"name": "PYTHONUNBUFFERED", "value": "1"}]
    assert VALIDATOR.check(_engine(env=env))[1] == []


def test_replicas_are_bounded_and_rollout_defaults_to_surge():
    assert VALIDATOR.check(_md(replicas=64))[1] == []
    _, errors = VALIDATOR.check(_md(replicas=100000))
    assert any("spec.replicas" in e and "64" in e for e in errors), errors
    obj, _ = VALIDATOR.check(_md())
    assert obj["spec"]["rollout"] == {"strategy": "Surge"} and obj["spec"]["engine"]["trustRemoteCode"] is False
    assert "is not one of" in VALIDATOR.check(_md(rollout={"strategy": "Recreate"}))[1][0]


def test_autoscaling_defaults_and_rules():
    obj, errors = VALIDATOR.check(_md(autoscaling={"maxReplicas": 4}))
    assert errors == []
    assert obj["spec"]["autoscaling"] == {"enabled": True, "minReplicas": 1, "maxReplicas": 4,
                                          "scaleDownDelaySeconds": 300, "scaleUpStabilizationSeconds": 0}
    assert VALIDATOR.check(_md(autoscaling={"minReplicas": 0, "maxReplicas": 1, "targetInFlightPerReplica": 8}))[1] == []
    for bad, words in [({"minReplicas": 5, "maxReplicas": 4}, "minReplicas must be <= autoscaling.maxReplicas"),
                       ({"maxReplicas": 65}, "spec.autoscaling.maxReplicas"),
                       ({"minReplicas": 0}, "'maxReplicas' is a required property"),
                       ({"maxReplicas": 2, "targetInFlightPerReplica": 0}, "targetInFlightPerReplica"),
                       ({"maxReplicas": 2, "scaleDownDelay": 10}, "'scaleDownDelay' was unexpected")]:
        _, errors = VALIDATOR.check(_md(autoscaling=bad))
        assert any(words in e for e in errors), (bad, errors)


def test_autoscaling_status_fits_the_schema():
    status = {"autoscaling": {"scaler": "Operator", "active": True, "scaleFromZero": True, "target": 2.0,
                              "demand": 3.4, "gateways": "2/2", "desiredReplicas": 2,
                              "lastScaleTime": "2026-12-01T00:00:00Z", "reason": "ScaledUp", "message": "1 -> 2",
                              "recommendations": [{"at": "2026-12-01T00:00:00Z", "replicas": 2}]}}
    doc = {**_md(), "status": status}
    assert VALIDATOR.check(doc)[1] == []
