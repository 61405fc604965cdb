"""The Helm chart, rendered by the real helm binary: lint, Kubernetes schemas, hardening, RBAC, single sources."""
from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from harness import REPO

CHART = REPO / "deploy" / "helm" / "cxygpt"
CI = CHART / "ci"
RELEASE, NAMESPACE = "cxygpt", "cxygpt"
MONITORING_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor",
                   "monitoring.coreos.com/v1/PrometheusRule")
# custom resources kubernetes-validate has no schema for (it only warns): checked by the tests below
CUSTOM_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "KopfPeering", "ClusterKopfPeering", "ScaledObject"}
REQUIRED_SCENARIOS = {"defaults", "ha", "redis-apikeys", "servicemonitor", "openwebui", "watch-namespace", "tenants",
                      "network-policy", "keda", "engines"}


def helm_binary() -> str:
    found = shutil.which("helm") or (str(REPO / ".tools" / "bin" / "helm") if (REPO / ".tools" / "bin" / "helm").exists() else None)
    if not found:
        pytest.skip("no helm binary (run `make bootstrap`)")
    return found


def helm(*args, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
    return out


SCENARIOS = {"defaults": None, **{p.name.removesuffix("-values.yaml"): p for p in sorted(CI.glob("*-values.yaml"))}}


def template_args(values: Path | None = None, *extra: str, chart: Path = CHART) -> list[str]:
    return ["template", RELEASE, str(chart), "--namespace", NAMESPACE, *[f"--api-versions={a}" for a in MONITORING_APIS],
            *(["-f", str(values)] if values else []), *extra]


@functools.cache
def rendered_text(scenario: str, *extra: str) -> str:
    return helm(*template_args(SCENARIOS[scenario], *extra)).stdout


def render(scenario: str = "defaults", *extra: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered_text(scenario, *extra)) if d]


def render_values(tmp_path: Path, values: dict, *extra: str, check=True):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    out = helm(*template_args(path, *extra), check=check)
    return out if not check else [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs, kind, name=None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name=None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def is_hook(doc) -> bool:
    return "helm.sh/hook" in (doc["metadata"].get("annotations") or {})


def pod_specs(docs):
    """(owner, pod spec, is_hook) for every pod the chart runs."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"], is_hook(d)
        elif d["kind"] == "Pod":
            yield f"Pod/{d['metadata']['name']}", d["spec"], is_hook(d)


def container(docs, component) -> dict:
    dep = one(docs, "Deployment", f"{RELEASE}-{component}")
    return dep["spec"]["template"]["spec"]["containers"][0]


def env(c) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def test_the_required_scenarios_exist():
    assert REQUIRED_SCENARIOS <= set(SCENARIOS)


# --- helm lint, Kubernetes schemas, values schema -------------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_strict(scenario):
    values = SCENARIOS[scenario]
    out = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_passes_kubernetes_validate(scenario, tmp_path):
    manifest = tmp_path / f"{scenario}.yaml"
    manifest.write_text(rendered_text(scenario))
    out = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "-k", "1.31.0", "--strict",
                          str(manifest)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    unknown = set(re.findall(r"Couldn't find schema for kind (\w+)", out.stdout + out.stderr))
    assert unknown <= CUSTOM_KINDS, unknown
    passed = len(re.findall(r"passed for resource", out.stdout + out.stderr))
    assert passed == len([d for d in render(scenario) if d["kind"] not in CUSTOM_KINDS])
    # custom resources whose CRD the chart ships: against that CRD's schema (ServiceMonitor: see its test)
    crds = {(c["spec"]["group"], c["spec"]["names"]["kind"]): c for c in find(render(scenario), "CustomResourceDefinition")}
    for doc in render(scenario):
        crd = crds.get((doc["apiVersion"].split("/")[0], doc["kind"]))
        if crd:
            [version] = [v for v in crd["spec"]["versions"] if f"{crd['spec']['group']}/{v['name']}" == doc["apiVersion"]]
            jsonschema.validate(doc, version["schema"]["openAPIV3Schema"])
            assert ("namespace" in doc["metadata"]) == (crd["spec"]["scope"] == "Namespaced")


@pytest.mark.parametrize("values, complaint", [
    ({"gatway": {"replicaCount": 2}}, "gatway"),                                   # typo'd top-level key
    ({"gateway": {"replicas": 2}}, "replicas"),                                    # typo'd nested key
    ({"gateway": {"replicaCount": "two"}}, "replicaCount"),                        # wrong type
    ({"crds": {"enabled": "yes"}}, "enabled"),                                     # wrong type
    ({"operator": {"watchNamespaces": ["team-*"]}}, "watchNamespaces"),            # globs need RBAC it cannot give
    ({"operator": {"image": {"pullPolicy": "Sometimes"}}}, "pullPolicy"),          # not an enum value
    ({"gateway": {"redis": {"url": "localhost:6379"}}}, "url"),                    # not a redis:// URL
    ({"operator": {"networkPolicy": {"metricsNamespaces": ["Mon"]}}}, "metricsNamespaces"),  # not a namespace name
    ({"operator": {"networkPolicy": {"enable": False}}}, "enable"),               # typo'd key
    ({"modelAutoscaling": {"keda": {"models": [{"name": "m"}]}}}, "maxReplicas"),  # a required key
    ({"modelAutoscaling": {"keda": {"models": [{"name": "m", "maxReplicas": 2, "target": 3}]}}}, "target"),
    ({"gateway": {"coldStartTimeoutSeconds": 0}}, "coldStartTimeoutSeconds"),
    ({"console": {"auth": {"mode": "password"}}}, "mode"),                        # not an enum value
    ({"console": {"prometheusUrl": "prometheus:9090"}}, "prometheusUrl"),         # not an http(s) URL
    ({"console": {"replicaCount": 2}}, "replicaCount"),                           # one replica: not a value
    ({"engines": {"podLabels": {"app.kubernetes.io/instance": "x"}}}, "app.kubernetes.io/instance"),  # the operator's selector label
    ({"engines": {"podAnnotations": {"cxygpt.io/config-hash": "x"}}}, "cxygpt.io/config-hash"),
    ({"engines": {"resources": {"requests": {"nvidia.com/gpu": 2}}}}, "nvidia.com/gpu"),  # GPUs are the operator's
    ({"engines": {"resources": {"claims": [{"name": "gpu"}]}}}, "claims"),
    ({"engines": {"affinity": {"nodeAfinity": {}}}}, "nodeAfinity"),              # typo'd part
    ({"engines": {"runtimeClassName": "NVIDIA runtime"}}, "runtimeClassName"),
    ({"engines": {"tolerations": [{"key": "a", "operator": "Matches"}]}}, "operator"),
    ({"engines": {"nodeSelectr": {}}}, "nodeSelectr"),
])
def test_bad_values_fail_on_the_schema(values, complaint, tmp_path):
    out = render_values(tmp_path, values, check=False)
    assert out.returncode != 0
    assert "schema" in out.stderr and complaint in out.stderr, out.stderr
    lint = helm("lint", "--strict", str(CHART), "-f", str(tmp_path / "values.yaml"), check=False)
    assert lint.returncode != 0


@pytest.mark.parametrize("values, complaint", [
    ({"gateway": {"apiKeys": {"enabled": True}}}, "needs existingSecret"),
    ({"gateway": {"apiKeys": {"enabled": True, "existingSecret": "k", "keys": {"keys": []}}}}, "not both"),
    ({"gateway": {"apiKeys": {"existingSecret": "k"}}}, "apiKeys.enabled is false"),
    ({"gateway": {"redis": {"url": "redis://r:6379/0", "existingSecret": "r"}}}, "not both"),
    ({"gateway": {"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}}, "greater than maxReplicas"),
    ({"gateway": {"podDisruptionBudget": {"minAvailable": 1}}}, "block every node drain"),
    ({"openWebUI": {"enabled": True}, "gateway": {"apiKeys": {"enabled": True, "existingSecret": "k"}}},
     "openWebUI.apiKeySecret.name"),
    ({"operator": {"networkPolicy": {"namespacePolicy": True}}}, "needs operator.watchNamespaces"),
    ({"operator": {"watchNamespaces": ["llm"], "networkPolicy": {"namespacePolicy": True, "enabled": False}}},
     "needs operator.networkPolicy.enabled"),
    ({"modelAutoscaling": {"keda": {"enabled": True, "models": [{"name": "m", "maxReplicas": 2}]}}},
     "needs prometheusAddress"),
    ({"modelAutoscaling": {"keda": {"enabled": True, "prometheusAddress": "http://p:9090"}}}, "needs models"),
    ({"modelAutoscaling": {"keda": {"enabled": True, "prometheusAddress": "http://p:9090",
                                    "models": [{"name": "m", "minReplicas": 3, "maxReplicas": 2}]}}},
     "m: minReplicas is greater than maxReplicas"),
    ({"console": {"enabled": True, "auth": {"mode": "apiKey"}}}, "needs gateway.apiKeys.enabled"),
    ({"console": {"enabled": True, "auth": {"mode": "token"}}}, "needs console.auth.existingSecret"),
    ({"console": {"enabled": True, "auth": {"existingSecret": "t"}}}, "console.auth.mode is not token"),
])
def test_bad_combinations_fail_fast(values, complaint, tmp_path):
    out = render_values(tmp_path, values, check=False)
    assert out.returncode != 0 and complaint in out.stderr, out.stderr


def schema_paths(schema, prefix=()):
    for key, sub in schema.get("properties", {}).items():
        yield prefix + (key,), sub
        yield from schema_paths(sub, prefix + (key,))


def values_key_lines() -> dict[tuple, int]:
    """Path of every key in values.yaml → its line index (block-style YAML, two-space indents)."""
    lines, stack, paths = (CHART / "values.yaml").read_text().splitlines(), [], {}
    for n, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w-]*):", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2)]
        paths[tuple(stack)] = n
    return paths


def test_every_value_is_documented_and_typed():
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_lines = values_key_lines()
    assert schema["additionalProperties"] is False

    def commented(path) -> bool:
        return path in key_lines and lines[key_lines[path] - 1].strip().startswith("#")

    for path, sub in schema_paths(schema):
        name = ".".join(path)
        assert sub.get("description"), f"{name}: no description in values.schema.json"
        if sub.get("type") == "object" and "properties" in sub:
            assert sub.get("additionalProperties") is False, f"{name}: additionalProperties"
        if any(commented(path[:n]) for n in range(1, len(path))):
            continue  # inside a block documented as a whole (e.g. resources)
        assert path in key_lines, f"{name}: in the schema but not in values.yaml"
        if not (sub.get("type") == "object" and "properties" in sub):  # a section: its keys carry the docs
            assert commented(path), f"{name}: no comment above it in values.yaml"
    # and nothing in values.yaml escapes the schema (the defaults themselves validate)
    helm("lint", "--strict", str(CHART))


# --- single sources: the CRDs and the profile table -----------------------------------------------------

def test_crds_are_the_ones_in_deploy_crds():
    docs = render()
    sources = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "deploy" / "crds").glob("*.yaml"))]
    rendered = {d["metadata"]["name"]: d for d in find(docs, "CustomResourceDefinition")}
    assert set(rendered) == {s["metadata"]["name"] for s in sources}  # no kopf peering CRDs with one replica
    for source in sources:
        crd = rendered[source["metadata"]["name"]]
        assert crd["spec"] == source["spec"] and crd["apiVersion"] == source["apiVersion"]
        assert source["metadata"].get("labels", {}).items() <= crd["metadata"]["labels"].items()
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_crds_enabled_and_keep(tmp_path):
    assert not find(render_values(tmp_path, {"crds": {"enabled": False}}), "CustomResourceDefinition")
    kept = find(render_values(tmp_path, {"crds": {"keep": False}}), "CustomResourceDefinition")
    assert kept and all("annotations" not in c["metadata"] for c in kept)


def test_the_chart_reads_its_single_sources_through_symlinks(tmp_path):
    assert (CHART / "files" / "crds").is_symlink()
    assert (CHART / "files" / "crds").resolve() == (REPO / "deploy" / "crds").resolve()
    assert (CHART / "files" / "profiles.yaml").is_symlink()
    assert (CHART / "files" / "profiles.yaml").resolve() == (REPO / "profiles" / "profiles.yaml").resolve()
    single_sources = {"grafana-dashboard.json": REPO / "deploy" / "grafana" / "cxygpt-dashboard.json",
                      "prometheus-rules.yaml": REPO / "deploy" / "prometheus" / "cxygpt-rules.yaml"}
    for name, source in single_sources.items():
        assert (CHART / "files" / name).is_symlink() and (CHART / "files" / name).resolve() == source.resolve()
    # `helm package` stores the content (a packaged chart needs no repository)
    helm("package", str(CHART), "--destination", str(tmp_path))
    [package] = tmp_path.glob("cxygpt-*.tgz")
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
        assert "cxygpt/ci/ha-values.yaml" not in names
        stored = tar.extractfile("cxygpt/files/profiles.yaml").read()
        assert stored == (REPO / "profiles" / "profiles.yaml").read_bytes()
        for name, source in single_sources.items():
            assert tar.extractfile(f"cxygpt/files/{name}").read() == source.read_bytes()
        for crd in (REPO / "deploy" / "crds").glob("*.yaml"):
            assert tar.extractfile(f"cxygpt/files/crds/{crd.name}").read() == crd.read_bytes()


def test_the_profile_configmap_is_the_profile_table_byte_for_byte():
    cm = one(render(), "ConfigMap", f"{RELEASE}-profiles")
    assert cm["data"]["profiles.yaml"] == (REPO / "profiles" / "profiles.yaml").read_text()
    for component in ("operator", "gateway"):
        dep = one(render(), "Deployment", f"{RELEASE}-{component}")
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        assert volumes["profiles"]["configMap"]["name"] == cm["metadata"]["name"]


# --- hardening and RBAC on every scenario ---------------------------------------------------------------

@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_pod_is_hardened(scenario):
    pods = list(pod_specs(render(scenario)))
    assert pods
    for owner, spec, hook in pods:
        psc = spec.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True, owner
        assert psc.get("seccompProfile") == {"type": "RuntimeDefault"}, owner
        assert spec.get("enableServiceLinks") is False, owner  # no foreign *_PORT/*_HOST variables
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{owner} container {c['name']}"
            sc = c.get("securityContext") or {}
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities") == {"drop": ["ALL"]}, where
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("seccompProfile", psc.get("seccompProfile")) == {"type": "RuntimeDefault"}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set((c.get("resources") or {}).get(kind) or {}), f"{where}: {kind}"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith((":latest", ":main")), where
            if not hook and c in spec["containers"]:  # long-running: not init containers, not the test hook
                assert c.get("livenessProbe") and c.get("readinessProbe"), f"{where}: probes"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_no_wildcard_or_dangerous_rbac(scenario):
    roles = [d for d in render(scenario) if d["kind"] in ("Role", "ClusterRole")]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: {rule}"
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
            if "delete" in rule["verbs"]:  # only the objects the operator makes (and may have to remove): engine
                # objects, and a model cache's claim and download Job
                assert (rule["apiGroups"], rule["resources"]) in (
                    (["networking.k8s.io"], ["networkpolicies"]), (["apps"], ["deployments"]), ([""], ["services"]),
                    ([""], ["persistentvolumeclaims"]), (["batch"], ["jobs"])), rule
            assert not {"secrets", "pods/exec", "serviceaccounts/token"} & set(rule["resources"]), rule
            if "pods/log" in rule["resources"]:  # the download's progress lines: read, nothing else, alone
                assert rule["resources"] == ["pods/log"] and rule["verbs"] == ["get"], rule


def grants(role) -> set[tuple]:
    return {(g, r, v, ",".join(rule.get("resourceNames", [])))
            for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def expand(*rules) -> set[tuple]:
    return {(g, r, v, names) for g, resources, verbs, names in rules for r in resources.split() for v in verbs.split()}


# Whether the rules allow what the operator and the gateway call is checked by the real authorizer in
# tests/integration/test_kube_helm.py; here: scope, bindings and namespaces.
# cluster-scoped resources (Kubernetes' and kopf's): the only ones a ClusterRole may grant with watchNamespaces
CLUSTER_SCOPED = {"nodes", "namespaces", "customresourcedefinitions", "clusterkopfpeerings", "storageclasses"}


def test_rbac_cluster_wide_grants_through_cluster_roles_only():
    docs = render()
    # but the gateway Service's endpoints, in the release namespace only: the autoscaler lists them (the gateways'
    # demand), the gateways watch them (how many share the engines' slots)
    roles = {r["metadata"]["name"]: r for r in find(docs, "Role")}
    assert set(roles) == {f"{RELEASE}-operator-gateway-endpoints", f"{RELEASE}-gateway-peers"}
    assert grants(roles[f"{RELEASE}-operator-gateway-endpoints"]) == expand(("discovery.k8s.io", "endpointslices",
                                                                            "list", ""))
    assert grants(roles[f"{RELEASE}-gateway-peers"]) == expand(("discovery.k8s.io", "endpointslices", "list watch", ""))
    bindings = {b["metadata"]["name"]: b for b in find(docs, "RoleBinding")}
    assert set(bindings) == set(roles)
    for name, component in ((f"{RELEASE}-operator-gateway-endpoints", "operator"), (f"{RELEASE}-gateway-peers", "gateway")):
        assert roles[name]["metadata"]["namespace"] == bindings[name]["metadata"]["namespace"] == NAMESPACE
        assert bindings[name]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
        assert bindings[name]["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-{component}",
                                               "namespace": NAMESPACE}]
    for component in ("operator", "gateway"):
        [binding] = find(docs, "ClusterRoleBinding", f"{RELEASE}-{component}")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": f"{RELEASE}-{component}"}
        sa = one(docs, "Deployment", f"{RELEASE}-{component}")["spec"]["template"]["spec"]["serviceAccountName"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
        assert one(docs, "ServiceAccount", sa)["metadata"]["namespace"] == NAMESPACE
    assert not any(a.startswith("--namespace") for c in ("operator", "gateway") for a in container(docs, c)["args"])


@pytest.mark.parametrize("scenario", ["watch-namespace", "tenants", "watch-namespaces-ha", "network-policy"])
def test_rbac_with_watch_namespaces_keeps_models_namespaced(scenario):
    docs = render(scenario)
    watched = yaml.safe_load(SCENARIOS[scenario].read_text())["operator"]["watchNamespaces"]
    # cluster-wide only what is cluster-scoped; everything else in a Role per watched namespace
    assert {r for _, r, _, _ in grants(one(docs, "ClusterRole", f"{RELEASE}-operator"))} <= CLUSTER_SCOPED
    assert not find(docs, "ClusterRole", f"{RELEASE}-gateway") and not find(docs, "ClusterRoleBinding", f"{RELEASE}-gateway")
    for component in ("operator", "gateway"):
        roles = {r["metadata"]["namespace"]: r for r in find(docs, "Role", f"{RELEASE}-{component}")}
        bindings = {b["metadata"]["namespace"]: b for b in find(docs, "RoleBinding", f"{RELEASE}-{component}")}
        assert set(roles) == set(bindings) == set(watched)
        sa = one(docs, "Deployment", f"{RELEASE}-{component}")["spec"]["template"]["spec"]["serviceAccountName"]
        for namespace, binding in bindings.items():
            assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                          "name": roles[namespace]["metadata"]["name"]}
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
        # one --namespace per watched namespace, for the operator and for the gateway alike
        assert [a for a in container(docs, component)["args"] if a.startswith("--namespace")] == \
            [f"--namespace={n}" for n in watched]


def test_ha_operator_peers_through_kopf():
    docs = render("ha")
    op = one(docs, "Deployment", f"{RELEASE}-operator")
    assert op["spec"]["replicas"] == 2 and "strategy" not in op["spec"]  # rolling: the peers hand over
    peering = f"{RELEASE}-operator"
    assert f"--peering={peering}" in op["spec"]["template"]["spec"]["containers"][0]["args"]
    obj = one(docs, "ClusterKopfPeering", peering)
    assert obj["apiVersion"] == "kopf.dev/v1"
    # on upgrades (the kind is served) the chart looks the object up and leaves an existing one alone;
    # `helm template` looks up nothing, so it is rendered
    assert one(render("ha", "--api-versions", "kopf.dev/v1/ClusterKopfPeering"), "ClusterKopfPeering", peering)
    assert obj["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    crds = {c["metadata"]["name"] for c in find(docs, "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds
    # kopf's peering: all of them listed and watched, ours (by the name the operator is given) read and patched
    assert expand(("kopf.dev", "clusterkopfpeerings", "list watch", ""),
                  ("kopf.dev", "clusterkopfpeerings", "get patch", peering)) <= grants(one(docs, "ClusterRole", peering))
    assert not {g for g in grants(one(docs, "ClusterRole", peering)) if g[0] == "kopf.dev" and g[1] != "clusterkopfpeerings"}
    # the gateway: no replicas field under the HPA, which targets it; the PDB selects its pods
    gw = one(docs, "Deployment", f"{RELEASE}-gateway")
    assert "replicas" not in gw["spec"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": gw["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 6)
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 2, "selector": gw["spec"]["selector"]}
    assert env(container(docs, "gateway"))["REDIS_URL"] == "redis://redis.cxygpt.svc:6379/0"


def test_ha_in_watched_namespaces_uses_namespaced_peering_objects():
    docs = render("watch-namespaces-ha")
    peering = f"{RELEASE}-operator"
    assert {p["metadata"]["namespace"] for p in find(docs, "KopfPeering", peering)} == {"llm", "team-b"}
    assert not find(docs, "ClusterKopfPeering")
    assert {r["metadata"]["namespace"] for r in find(docs, "Role", peering)} == {"llm", "team-b"}
    for role in find(docs, "Role", peering):
        assert expand(("kopf.dev", "kopfpeerings", "list watch", ""),
                      ("kopf.dev", "kopfpeerings", "get patch", peering)) <= grants(role)
    assert not {g for g in grants(one(docs, "ClusterRole", peering)) if g[0] == "kopf.dev"}


# --- selector labels ------------------------------------------------------------------------------------

def selectors(docs) -> dict:
    return {d["metadata"]["name"]: d["spec"]["selector"]["matchLabels"] for d in find(docs, "Deployment")}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_selectors_are_the_stable_subset_and_select_the_pods(scenario):
    docs = render(scenario)
    for name, selector in selectors(docs).items():
        component = name.removeprefix(f"{RELEASE}-")
        assert selector == {"app.kubernetes.io/name": "cxygpt", "app.kubernetes.io/instance": RELEASE,
                            "app.kubernetes.io/component": component}
        pod_labels = one(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        assert pod_labels["app.kubernetes.io/version"]  # the full set is on the pods, not in the selector
    for svc in find(docs, "Service"):
        assert svc["spec"]["selector"] in selectors(docs).values(), svc["metadata"]["name"]


def test_selectors_do_not_change_on_upgrade(tmp_path):
    """A new chart version, app version and extra labels leave every selector as it was (selectors are immutable)."""
    before = selectors(render())
    upgraded = tmp_path / "cxygpt"
    shutil.copytree(CHART, upgraded, symlinks=False)  # the copy carries the symlinks' content
    chart = yaml.safe_load((upgraded / "Chart.yaml").read_text())
    chart.update(version="9.9.9", appVersion="9.9.9")
    (upgraded / "Chart.yaml").write_text(yaml.safe_dump(chart))
    out = helm(*template_args(None, "--set", "commonLabels.team=ml", "--set", "operator.podLabels.tier=control",
                              "--set", "gateway.podLabels.tier=edge", chart=upgraded)).stdout
    after_docs = [d for d in yaml.safe_load_all(out) if d]
    assert selectors(after_docs) == before
    assert one(after_docs, "Deployment", f"{RELEASE}-gateway")["metadata"]["labels"]["app.kubernetes.io/version"] == "9.9.9"


# --- what each component is given -----------------------------------------------------------------------

def test_operator_args_are_flags_the_operator_has():
    from cxygpt_operator.main import parse_args

    for scenario in SCENARIOS:
        args = container(render(scenario), "operator")["args"]
        parsed = parse_args(args)  # argparse exits on an unknown flag
        assert parsed.sim_image == "cxygpt/cxygpt-sim:0.1.0" and parsed.profiles == "/etc/cxygpt/profiles/profiles.yaml"
        assert parsed.liveness == "http://0.0.0.0:8080/healthz" and parsed.vllm_image is None
        assert parsed.metrics_port == 8081 and parsed.log_format == "json"
    op = container(render(), "operator")
    assert op["command"] == ["cxygpt-operator"]
    assert {"mountPath": "/etc/cxygpt/profiles", "name": "profiles", "readOnly": True} in op["volumeMounts"]
    assert {"mountPath": "/etc/cxygpt/engines", "name": "engine-defaults", "readOnly": True} in op["volumeMounts"]
    assert "--engine-defaults=/etc/cxygpt/engines/engines.yaml" in op["args"]


def test_engine_defaults_reach_the_operator_as_it_reads_them(tmp_path):
    from cxygpt_operator.placement import PodSettings, load_defaults
    from cxygpt_operator.resolve import parse_spec

    def defaults(docs) -> PodSettings:
        path = tmp_path / "engines.yaml"
        path.write_text(one(docs, "ConfigMap", f"{RELEASE}-engine-defaults")["data"]["engines.yaml"])
        return load_defaults(path)

    assert defaults(render()) == PodSettings()  # none given: none rendered
    given = defaults(render("engines"))
    assert given.runtime_class == "nvidia" and given.priority_class == "llm-serving"
    assert given.node_selector == {"cloud.example.com/pool": "gpu"} and given.labels == {"cost-center": "ml-platform"}
    assert given.requests == {"ephemeral-storage": "50Gi"} and list(given.affinity) == ["podAntiAffinity"]
    # a ModelDeployment overrides them
    spec = parse_spec({"model": {"name": "m", "source": "hf://a/b"},
                       "engine": {"runtimeClassName": "nvidia-cdi", "nodeSelector": {"zone": "a"}}}, given)
    assert spec.pod.runtime_class == "nvidia-cdi" and spec.pod.priority_class == "llm-serving"
    assert spec.pod.node_selector == {"cloud.example.com/pool": "gpu", "zone": "a"}
    # a change restarts the operator, which reads them once
    before = one(render(), "Deployment", f"{RELEASE}-operator")["spec"]["template"]["metadata"]["annotations"]
    after = one(render("engines"), "Deployment", f"{RELEASE}-operator")["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/engine-defaults"] != after["checksum/engine-defaults"]
    assert one(render(), "Deployment", f"{RELEASE}-operator")["spec"]["strategy"] == {"type": "Recreate"}


def test_network_policy_values_become_operator_flags(tmp_path):
    assert not {a for a in container(render(), "operator")["args"] if "network-policy" in a or "metrics-namespace" in a}
    args = container(render("network-policy"), "operator")["args"]
    assert "--metrics-namespace=monitoring" in args and "--no-network-policy" not in args
    assert f"--gateway-namespace={NAMESPACE}" in args  # the per-model policies trust the label in ours only
    args = container(render_values(tmp_path, {"operator": {"networkPolicy": {
        "enabled": False, "metricsNamespaces": ["monitoring", "obs"]}}}), "operator")["args"]
    assert "--no-network-policy" in args and not any(a.startswith("--gateway-namespace") for a in args)
    assert [a for a in args if a.startswith("--metrics-namespace")] == ["--metrics-namespace=monitoring",
                                                                          "--metrics-namespace=obs"]
    from cxygpt_operator.main import parse_args

    parsed = parse_args(args)
    assert parsed.metrics_namespace == ["monitoring", "obs"] and parsed.no_network_policy


def engine_pod_templates() -> list[dict]:
    """Pod templates of engine Deployments as the operator builds them (its golden files, not a copy)."""
    docs = [d for p in sorted((REPO / "tests" / "unit" / "golden").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    templates = [d["spec"]["template"] for d in docs if d and d["kind"] == "Deployment"]
    assert templates
    return templates


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # no matchExpressions used here
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_gateway_pods_carry_the_engine_access_label_outside_the_selector():
    for scenario in SCENARIOS:
        gw = one(render(scenario), "Deployment", f"{RELEASE}-gateway")
        assert gw["spec"]["template"]["metadata"]["labels"]["cxygpt.io/engine-access"] == "true"
        assert "cxygpt.io/engine-access" not in gw["spec"]["selector"]["matchLabels"]
        # the operator's too: it loads LoRA adapters through the engines' runtime endpoints
        op = one(render(scenario), "Deployment", f"{RELEASE}-operator")
        assert op["spec"]["template"]["metadata"]["labels"]["cxygpt.io/engine-access"] == "true"
        assert "cxygpt.io/engine-access" not in op["spec"]["selector"]["matchLabels"]
        for name in (f"{RELEASE}-openwebui", f"{RELEASE}-test"):  # nobody else but the console
            for doc in find(render(scenario), "Deployment", name) + find(render(scenario), "Pod", name):
                labels = (doc["spec"].get("template") or doc)["metadata"]["labels"]
                assert "cxygpt.io/engine-access" not in labels, name


def test_namespace_network_policy_admits_only_the_gateway_and_metrics_namespaces(tmp_path):
    for scenario in SCENARIOS:
        if scenario != "network-policy":
            assert not find(render(scenario), "NetworkPolicy"), scenario
    docs = render("network-policy")
    [policy] = find(docs, "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "llm"
    spec = policy["spec"]
    assert all(selects(spec["podSelector"], t["metadata"]["labels"]) for t in engine_pod_templates())
    assert spec["policyTypes"] == ["Ingress"]
    [rule] = spec["ingress"]
    gateway, metrics = rule["from"]
    gw_pod = one(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["metadata"]["labels"]
    assert selects(gateway["podSelector"], gw_pod)
    assert not selects(gateway["podSelector"], one(docs, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["metadata"]["labels"])
    assert gateway["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    assert metrics == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    # the engine container's port, by the name the operator gives it
    [port] = rule["ports"]
    assert port["protocol"] == "TCP"
    for template in engine_pod_templates():
        [engine] = [c for c in template["spec"]["containers"] if c["name"] == "engine"]
        assert port["port"] in [p["name"] for p in engine["ports"]]
    # one per watched namespace
    docs = render_values(tmp_path, {"operator": {"watchNamespaces": ["a", "b"], "networkPolicy": {"namespacePolicy": True}}})
    assert sorted(p["metadata"]["namespace"] for p in find(docs, "NetworkPolicy")) == ["a", "b"]
    assert all(len(p["spec"]["ingress"][0]["from"]) == 1 for p in find(docs, "NetworkPolicy"))


def test_engine_images_from_values(tmp_path):
    docs = render_values(tmp_path, {"operator": {"simImage": {"repository": "reg.example/sim", "tag": "t1"},
                                                 "vllmImage": "vllm/vllm-openai:v0.33.0"}})
    args = container(docs, "operator")["args"]
    assert "--sim-image=reg.example/sim:t1" in args and "--vllm-image=vllm/vllm-openai:v0.33.0" in args


def test_gateway_args_env_and_keys():
    gw = container(render(), "gateway")
    assert gw["command"] == ["cxygpt-gateway"]
    assert gw["args"] == ["--kubernetes", "--host=0.0.0.0", "--port=8080"]
    assert "REDIS_URL" not in env(gw) and env(gw)["CXYGPT_PROFILES"] == "/etc/cxygpt/profiles/profiles.yaml"
    help_text = subprocess.run([str(Path(sys.executable).parent / "cxygpt-gateway"), "--help"],
                               capture_output=True, text=True, timeout=30).stdout
    for flag in ("--kubernetes", "--host", "--port", "--namespace", "--keys-file"):
        assert flag in help_text

    docs = render("redis-apikeys")
    gw = container(docs, "gateway")
    assert env(gw)["REDIS_URL"] == {"secretKeyRef": {"name": "cxygpt-redis", "key": "url"}}
    assert "--keys-file=/etc/cxygpt/keys/keys.yaml" in gw["args"]
    assert {"name": "keys", "mountPath": "/etc/cxygpt/keys", "readOnly": True} in gw["volumeMounts"]
    secret = one(docs, "Secret", f"{RELEASE}-gateway-keys")
    keys = yaml.safe_load(secret["stringData"]["keys.yaml"])
    assert keys["allow_anonymous"] is False and keys["keys"][0]["id"] == "team-a"
    volumes = {v["name"]: v for v in one(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == secret["metadata"]["name"]

    docs = render("existing-keys")
    volumes = {v["name"]: v for v in one(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "team-keys" and not find(docs, "Secret")


def pod_annotations(docs, component) -> dict:
    return one(docs, "Deployment", f"{RELEASE}-{component}")["spec"]["template"]["metadata"]["annotations"]


def test_service_monitors_or_scrape_annotations():
    docs = render()
    for component, port in (("operator", "8081"), ("gateway", "8080")):
        assert pod_annotations(docs, component)["prometheus.io/scrape"] == "true"
        assert pod_annotations(docs, component)["prometheus.io/port"] == port
    assert not find(docs, "ServiceMonitor")

    docs = render("servicemonitor")
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for component, port_name in (("operator", "metrics"), ("gateway", "http")):
        sm = one(docs, "ServiceMonitor", f"{RELEASE}-{component}")
        assert sm["spec"]["endpoints"] == [{"port": port_name, "path": "/metrics", "interval": "15s"}]
        assert sm["metadata"]["labels"]["release"] == "prometheus"
        # the Service it selects exposes that port, and selects this component's pods
        [svc] = [s for s in services.values() if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert port_name in [p["name"] for p in svc["spec"]["ports"]]
        assert svc["spec"]["selector"] == selectors(docs)[f"{RELEASE}-{component}"]
        assert "prometheus.io/scrape" not in pod_annotations(docs, component)
    # the engines the operator creates: selected by the labels manifests.py gives them, on their http port
    pm = one(docs, "PodMonitor", f"{RELEASE}-engines")
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "cxygpt-engine",
                                                     "app.kubernetes.io/managed-by": "cxygpt-operator"}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    ports = {p["name"]: p["containerPort"] for p in container(docs, "operator")["ports"]}
    assert ports == {"health": 8080, "metrics": 8081}
    assert "--metrics-port=8081" in container(docs, "operator")["args"]

    # without the Prometheus Operator's API the chart falls back to the annotations
    out = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(SCENARIOS["servicemonitor"])).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert not find(docs, "ServiceMonitor") and not find(docs, "Service", f"{RELEASE}-operator-metrics")
    assert not find(docs, "PodMonitor")
    assert "prometheus.io/scrape" in pod_annotations(docs, "gateway")


def test_grafana_dashboard_is_the_one_in_deploy_grafana():
    assert not find(render(), "ConfigMap", f"{RELEASE}-dashboard")
    cm = one(render("servicemonitor"), "ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert cm["data"]["cxygpt-dashboard.json"] == (REPO / "deploy" / "grafana" / "cxygpt-dashboard.json").read_text()


def test_prometheus_rule_is_the_rule_file_in_deploy_prometheus():
    assert not find(render(), "PrometheusRule")
    rule = one(render("servicemonitor"), "PrometheusRule")
    source = yaml.safe_load((REPO / "deploy" / "prometheus" / "cxygpt-rules.yaml").read_text())
    assert rule["spec"] == {"groups": source["groups"]}
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    # without the Prometheus Operator's API: no PrometheusRule (NOTES points at the rule file)
    out = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(SCENARIOS["servicemonitor"])).stdout
    assert "kind: PrometheusRule" not in out


def test_open_webui_points_at_the_gateway():
    assert not find(render(), "Deployment", f"{RELEASE}-openwebui")
    docs = render("openwebui")
    ui = container(docs, "openwebui")
    svc = one(docs, "Service", f"{RELEASE}-gateway")
    assert env(ui)["OPENAI_API_BASE_URL"] == f"http://{svc['metadata']['name']}.{NAMESPACE}.svc:{svc['spec']['ports'][0]['port']}/v1"
    assert env(ui)["ENABLE_OLLAMA_API"] == "false" and env(ui)["OPENAI_API_KEY"] == "none"
    assert re.fullmatch(r"ghcr\.io/open-webui/open-webui:v\d+\.\d+\.\d+", ui["image"])
    pvc = one(docs, "PersistentVolumeClaim", f"{RELEASE}-openwebui")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert one(docs, "Secret", f"{RELEASE}-openwebui")["data"]["webui-secret-key"]
    assert one(docs, "Service", f"{RELEASE}-openwebui")["spec"]["ports"][0]["targetPort"] == "http"


def test_open_webui_sends_its_key_when_the_gateway_wants_keys(tmp_path):
    docs = render_values(tmp_path, {"openWebUI": {"enabled": True, "apiKeySecret": {"name": "webui-key"}},
                                    "gateway": {"apiKeys": {"enabled": True, "existingSecret": "keys"}}})
    assert env(container(docs, "openwebui"))["OPENAI_API_KEY"] == {"secretKeyRef": {"name": "webui-key", "key": "api-key"}}


# --- the console ---------------------------------------------------------------------------------------------

CONSOLE_READS = expand(("cxygpt.io", "modeldeployments", "list watch", ""), ("", "pods events", "list watch", ""),
                       ("", "pods/log", "get", ""), ("discovery.k8s.io", "endpointslices", "list watch", ""))
NODES = expand(("", "nodes", "list watch", ""))


def console_objects(docs) -> list[dict]:
    return [d for d in docs if (d["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "console"]


def test_the_console_is_off_by_default():
    for scenario in SCENARIOS:
        if not scenario.startswith("console"):
            assert not console_objects(render(scenario)), scenario


def test_the_console_reads_and_never_writes():
    """Exactly these grants, bound to the console's own account; whether the console uses each of them and nothing
    more is checked against its real calls in tests/integration/test_console_rbac.py."""
    docs = render("console")
    sa = one(docs, "Deployment", f"{RELEASE}-console")["spec"]["template"]["spec"]["serviceAccountName"]
    assert sa == f"{RELEASE}-console" and one(docs, "ServiceAccount", sa)
    assert grants(one(docs, "ClusterRole", f"{RELEASE}-console")) == CONSOLE_READS | NODES
    [binding] = find(docs, "ClusterRoleBinding", f"{RELEASE}-console")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    assert not [d for d in console_objects(docs) if d["kind"] in ("Role", "RoleBinding")]
    # watching namespaces: a Role in each, nodes alone cluster-wide, the gateway Service's slices in the release's
    docs = render("console-namespaces")
    roles = {(r["metadata"]["name"], r["metadata"].get("namespace")): grants(r)
             for r in console_objects(docs) if r["kind"] in ("Role", "ClusterRole")}
    assert roles == {(f"{RELEASE}-console", "llm"): CONSOLE_READS, (f"{RELEASE}-console", "team-b"): CONSOLE_READS,
                     (f"{RELEASE}-console-nodes", None): NODES,
                     (f"{RELEASE}-console-gateways", NAMESPACE): expand(("discovery.k8s.io", "endpointslices",
                                                                        "list watch", ""))}
    bindings = [b for b in console_objects(docs) if b["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert len(bindings) == len(roles)
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-console", "namespace": NAMESPACE}]
        assert (binding["roleRef"]["name"], binding["metadata"].get("namespace")) in roles
    for scenario in ("console", "console-namespaces"):
        for role in (r for r in console_objects(render(scenario)) if r["kind"] in ("Role", "ClusterRole")):
            assert {v for _, _, v, _ in grants(role)} <= {"get", "list", "watch"}, role
            assert not any(r.startswith("secrets") for _, r, _, _ in grants(role)), role


def test_the_console_is_configured_from_values():
    from cxygpt_console.main import parser

    docs = render("console")
    c = container(docs, "console")
    args = parser().parse_args(c["args"])  # argparse exits on an unknown flag
    assert c["command"] == ["cxygpt-console"] and c["image"] == "cxygpt/cxygpt-console:0.1.0"
    assert args.gateway_url == f"http://{RELEASE}-gateway.{NAMESPACE}.svc:80"
    assert args.gateway_service == (NAMESPACE, f"{RELEASE}-gateway") and not args.namespace
    assert args.auth == "api-key" and args.prometheus_url == "http://prometheus-server.monitoring.svc:80"
    assert args.port == 8090 and args.host == "0.0.0.0" and not args.secure_cookies and "env" not in c
    svc = one(docs, "Service", f"{RELEASE}-console")
    assert svc["spec"]["ports"][0]["targetPort"] == "http" and svc["spec"]["type"] == "ClusterIP"
    deployment = one(docs, "Deployment", f"{RELEASE}-console")
    assert deployment["spec"]["replicas"] == 1  # sessions are signed by the process
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["cxygpt.io/engine-access"] == "true"  # it counts tokens with the engines' /tokenize
    assert "cxygpt.io/engine-access" not in deployment["spec"]["selector"]["matchLabels"]
    c = container(render("console-namespaces"), "console")
    args = parser().parse_args(c["args"])
    assert args.namespace == ["llm", "team-b"] and args.auth == "token" and args.secure_cookies
    assert not args.prometheus_url and args.token_file is None
    assert c["env"] == [{"name": "CXYGPT_CONSOLE_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "console-token", "key": "token"}}}]


def test_helm_test_hook_calls_healthz_and_models():
    pod = one(render(), "Pod", f"{RELEASE}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    script, url = c["args"]
    assert url == f"http://{RELEASE}-gateway.{NAMESPACE}.svc:80"
    assert '"/healthz"' in script and '"/v1/models"' in script
    assert c["image"] == container(render(), "gateway")["image"]


def test_notes_give_the_next_commands():
    out = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", "-f", str(SCENARIOS["openwebui"])).stdout
    notes = out.split("NOTES:", 1)[1]
    assert f"deployment/{RELEASE}-operator deployment/{RELEASE}-gateway" in notes
    assert f"port-forward service/{RELEASE}-gateway 8080:80" in notes
    assert f"port-forward service/{RELEASE}-openwebui" in notes
    assert f"port-forward service/{RELEASE}-console" not in notes
    out = helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", "-f", str(SCENARIOS["console"])).stdout
    assert f"port-forward service/{RELEASE}-console 8090:80" in out.split("NOTES:", 1)[1]
    assert f"helm test {RELEASE} -n {NAMESPACE}" in notes
    assert "engine: {kind: sim}" in notes


def test_notes_say_when_prometheus_cannot_reach_the_engines():
    def notes(*args):
        return helm("install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", *args).stdout.split("NOTES:", 1)[1]

    assert "operator.networkPolicy.metricsNamespaces" in notes()  # engines carry scrape annotations: blocked
    assert "metricsNamespaces" not in notes("-f", str(SCENARIOS["network-policy"]))
    assert "metricsNamespaces" not in notes("--set", "operator.networkPolicy.enabled=false")


# --- autoscaling: the operator's, or KEDA ----------------------------------------------------------------

def test_autoscaling_rbac_args_and_gateway_settings(monkeypatch):
    docs = render()
    gateway = grants(one(docs, "ClusterRole", f"{RELEASE}-gateway"))
    # the gateway writes the scale subresource only (a wake from zero), nothing else of a model
    assert {g for g in gateway if g[2] not in ("get", "list", "watch")} == \
        expand(("cxygpt.io", "modeldeployments/scale", "patch", ""))
    operator = grants(one(docs, "ClusterRole", f"{RELEASE}-operator"))
    assert expand(("cxygpt.io", "modeldeployments/scale", "patch", ""),
                  ("autoscaling", "horizontalpodautoscalers", "list watch", ""),
                  ("keda.sh", "scaledobjects", "list watch", "")) <= operator
    args = container(docs, "operator")["args"]
    assert f"--gateway-service={NAMESPACE}/{RELEASE}-gateway" in args and "--autoscale-interval=5" in args
    assert one(docs, "Service", f"{RELEASE}-gateway")["metadata"]["namespace"] == NAMESPACE
    gateway_env = env(container(docs, "gateway"))
    for name in ("CXYGPT_COLD_START_TIMEOUT_S", "CXYGPT_DEMAND_WINDOW_S"):   # settings the gateway reads
        monkeypatch.setenv(name, gateway_env[name])
    from cxygpt_gateway.settings import GatewaySettings
    settings = GatewaySettings()
    assert (settings.cold_start_timeout_s, settings.demand_window_s) == (600, 10)
    # with watched namespaces the scale rules come with the namespaced ones
    watched = render("watch-namespace")
    for role in find(watched, "Role", f"{RELEASE}-gateway"):
        assert ("cxygpt.io", "modeldeployments/scale", "patch", "") in grants(role)
    for role in find(watched, "Role", f"{RELEASE}-operator"):
        assert ("autoscaling", "horizontalpodautoscalers", "list", "") in grants(role)


def test_routing_values_reach_the_gateway_as_its_settings(tmp_path, monkeypatch):
    from cxygpt_gateway.settings import GatewaySettings

    def settings(docs):
        monkeypatch.delenv("CXYGPT_ROUTING", raising=False)
        for name, value in env(container(docs, "gateway")).items():
            if name.startswith("CXYGPT_") and isinstance(value, str):
                monkeypatch.setenv(name, value)
        return GatewaySettings()

    default = settings(render())                   # nothing set: the gateway's own defaults per model's mode
    assert (default.routing.policy, default.routing.epsilon, default.engine_metrics_interval_s) == (None, None, 1)
    assert default.gateway_replicas == 1 and default.gateway_service == f"{NAMESPACE}/{RELEASE}-gateway"
    assert settings(render_values(tmp_path, {"gateway": {"replicaCount": 3}})).gateway_replicas == 3
    scaled = {"gateway": {"replicaCount": 3, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}}}
    assert settings(render_values(tmp_path, scaled)).gateway_replicas == 6   # the HPA's most
    chosen = settings(render_values(tmp_path, {"gateway": {"routing": {"policy": "least-load", "epsilon": 0.5},
                                                           "engineMetricsIntervalSeconds": 0}}))
    assert (chosen.routing.policy, chosen.routing.epsilon, chosen.engine_metrics_interval_s) == ("least-load", 0.5, 0)
    only_epsilon = settings(render_values(tmp_path, {"gateway": {"routing": {"epsilon": 1}}}))
    assert (only_epsilon.routing.policy, only_epsilon.routing.epsilon) == (None, 1)
    refused = render_values(tmp_path, {"gateway": {"routing": {"policy": "random"}}}, check=False)
    assert refused.returncode != 0 and "/gateway/routing/policy" in refused.stderr
    # the connection bounds
    assert (default.max_connections, default.max_connections_per_client, default.health_connections,
            default.header_timeout_s, default.body_timeout_s, default.keepalive_timeout_s) == (4096, 512, 64, 10, 30, 5)
    bounded = settings(render_values(tmp_path, {"gateway": {"connections": {
        "max": 100, "perClient": 10, "healthRoom": 5, "headerTimeoutSeconds": 2, "bodyTimeoutSeconds": 3,
        "keepAliveTimeoutSeconds": 4}}}))
    assert (bounded.max_connections, bounded.max_connections_per_client, bounded.health_connections,
            bounded.header_timeout_s, bounded.body_timeout_s, bounded.keepalive_timeout_s) == (100, 10, 5, 2, 3, 4)
    refused = render_values(tmp_path, {"gateway": {"connections": {"max": 0}}}, check=False)
    assert refused.returncode != 0 and "/gateway/connections/max" in refused.stderr


# KEDA v2's ScaledObject as its CRD has it, for the fields the chart sets (kubernetes-validate has no schema for it)
SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
                 "properties": {
                     "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                       "name": {"type": "string"}, "envSourceContainerName": {"type": "string"}}},
                     "minReplicaCount": {"type": "integer", "minimum": 0}, "maxReplicaCount": {"type": "integer", "minimum": 1},
                     "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                     "idleReplicaCount": {"type": "integer"}, "advanced": {"type": "object"}, "fallback": {"type": "object"},
                     "triggers": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                         "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                        "useCachedMetrics": {"type": "boolean"},
                                        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                        "authenticationRef": {"type": "object"}}}}}}}}


def test_keda_scaled_objects_scale_the_listed_models_on_the_gateway_demand():
    assert not find(render(), "ScaledObject")
    docs = render("keda")
    objects = {o["metadata"]["name"]: o for o in find(docs, "ScaledObject")}
    assert set(objects) == {"qwen3-14b", "qwen3-small"}
    for obj in objects.values():
        jsonschema.validate(obj, SCALED_OBJECT)
        assert obj["spec"]["scaleTargetRef"] == {"apiVersion": "cxygpt.io/v1alpha1", "kind": "ModelDeployment",
                                                 "name": obj["metadata"]["name"]}
        [trigger] = obj["spec"]["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert trigger["metadata"]["serverAddress"] == "http://prometheus-server.monitoring.svc:80"
        assert trigger["metadata"]["activationThreshold"] == "0"   # from zero as soon as a request waits
    big, small = objects["qwen3-14b"], objects["qwen3-small"]
    assert big["metadata"]["namespace"] == "llm" and small["metadata"]["namespace"] == NAMESPACE
    assert (big["spec"]["minReplicaCount"], big["spec"]["maxReplicaCount"]) == (0, 4)
    assert (small["spec"]["minReplicaCount"], small["spec"]["maxReplicaCount"]) == (1, 2)
    assert big["spec"]["triggers"][0]["metadata"]["query"] == 'sum(cxygpt_gateway_demand{model="qwen3-14b"})'
    assert small["spec"]["triggers"][0]["metadata"]["query"] == 'sum(cxygpt_gateway_demand{model="qwen3-0.6b"})'
    assert (big["spec"]["triggers"][0]["metadata"]["threshold"], small["spec"]["triggers"][0]["metadata"]["threshold"]) \
        == ("16", "8")
    # the metric the query reads is the one the gateway exports, under that name
    from cxygpt_operator.autoscaling.demand import DEMAND_METRIC
    assert DEMAND_METRIC == "cxygpt_gateway_demand"

